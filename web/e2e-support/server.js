// e2e-support/server.js — runs the real `pns` binary for the browser tests.
//
// Each server gets its own temp dir (SQLite file and generated secrets) and
// ephemeral ports, read back from its "pns listening" log line. A restart
// keeps the dir and the public port, as an operator's restart would, so an
// open page reconnects to the same address and finds its messages.
//
// The binary is target/debug/pns at the repo root, or $PNS_BIN. Set
// PNS_TEST_LOG=1 to see the server's log on stderr.

import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const PNS_BIN = process.env.PNS_BIN || join(REPO_ROOT, 'target', 'debug', 'pns');
export const DEMO_USER = 'demo@example.com';

const START_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 35_000; // the server's drain waits 30 s at most

export class PnsServer {
  /** @type {string} */ dir;
  /** @type {string} host:port of the public listener */ public = '';
  /** @type {string} host:port of the internal listener */ internal = '';
  /** Every log line of every run, for failure messages. */ log = [];
  #env;
  #child = null;
  #exited = null; // promise of {code, signal} of the current child
  #token = null;

  constructor(dir, env) {
    this.dir = dir;
    this.#env = env;
  }

  /** Starts a server on fresh data and ephemeral ports. `env` adds PNS_* settings. */
  static async start({ env = {} } = {}) {
    if (!existsSync(PNS_BIN)) throw new Error(`${PNS_BIN} does not exist: run \`cargo build\` at the repo root first`);
    const dir = await mkdtemp(join(tmpdir(), 'pns-web-e2e-'));
    const server = new PnsServer(dir, env);
    try {
      await server.#spawn('127.0.0.1:0', '127.0.0.1:0');
    } catch (e) {
      await rm(dir, { recursive: true, force: true });
      throw e;
    }
    return server;
  }

  /** Base URL of the public listener, e.g. http://127.0.0.1:41234 */
  get url() { return `http://${this.public}`; }
  get internalUrl() { return `http://${this.internal}`; }
  get running() { return this.#child !== null; }

  async #spawn(listen, internalListen) {
    const child = spawn(PNS_BIN, ['serve'], {
      cwd: this.dir,
      env: {
        PATH: process.env.PATH ?? '/usr/bin:/bin',
        PNS_LOG: 'info',
        ...this.#env,
        PNS_LISTEN: listen,
        PNS_INTERNAL_LISTEN: internalListen,
        PNS_DATABASE_URL: `sqlite://${this.dir}/pns.db`,
      },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.#child = child;
    this.#exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    const echo = Boolean(process.env.PNS_TEST_LOG);
    const started = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`pns did not start within ${START_TIMEOUT_MS} ms:\n${this.tail()}`)), START_TIMEOUT_MS);
      createInterface({ input: child.stderr }).on('line', (line) => {
        this.log.push(line);
        if (echo) process.stderr.write(`[pns] ${line}\n`);
        const m = line.match(/pns listening public=(\S+) internal=(\S+)/);
        if (m) {
          clearTimeout(timer);
          resolve(m);
        }
      });
      child.once('error', (e) => { clearTimeout(timer); reject(e); });
      this.#exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`pns exited (code ${code}, signal ${signal}) before listening:\n${this.tail()}`));
      });
    });
    try {
      const m = await started;
      this.public = m[1];
      this.internal = m[2];
    } catch (e) {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      this.#child = null;
      throw e;
    }
  }

  /** The last lines of the server's log. */
  tail(n = 20) {
    return this.log.slice(-n).join('\n');
  }

  /**
   * Stops the server with `signal` (SIGTERM drains: held polls are answered
   * c=0 first; SIGKILL cuts them) and waits until the process is gone.
   */
  async stop(signal = 'SIGTERM') {
    const child = this.#child;
    if (!child) return null;
    child.kill(signal);
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`pns did not exit within ${STOP_TIMEOUT_MS} ms of ${signal}`)), STOP_TIMEOUT_MS);
    });
    try {
      return await Promise.race([this.#exited, timeout]);
    } finally {
      clearTimeout(timer);
      this.#child = null;
    }
  }

  /** Starts the server again on the same data and the same public port. */
  async start() {
    if (this.#child) throw new Error('pns is already running');
    // The internal port is fresh: nothing open in a browser points at it.
    await this.#spawn(this.public, '127.0.0.1:0');
  }

  /** Stops (SIGTERM) and removes the data dir. */
  async dispose() {
    try {
      await this.stop('SIGTERM');
    } finally {
      await rm(this.dir, { recursive: true, force: true });
    }
  }

  /** The internal API token the server generated in its data dir. */
  async token() {
    this.#token ??= (await readFile(join(this.dir, 'internal_token'), 'utf8')).trim();
    return this.#token;
  }

  async #internal(method, path, body) {
    const res = await fetch(`${this.internalUrl}${path}`, {
      method,
      headers: {
        Authorization: `Bearer ${await this.token()}`,
        ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, body: json ?? text };
  }

  /** `POST /internal/v1/notify`; throws unless the server answers 202. */
  async notify(message) {
    const a = await this.#internal('POST', '/internal/v1/notify', message);
    if (a.status !== 202) throw new Error(`notify answered ${a.status}: ${JSON.stringify(a.body)}`);
    return a.body;
  }

  /**
   * Sends one new-mail message (type 70) for `user`; returns its id.
   * `mail` holds the data fields: from, subject, snippet, ...
   */
  async mail(mail, user = DEMO_USER) {
    const a = await this.notify({ user, type: 70, data: { folder: 'INBOX', unseen: 1, ...mail } });
    return a.ids[0];
  }

  /** `POST /internal/v1/sessions/revoke` with `{"user"}`. */
  async revokeUser(user = DEMO_USER) {
    const a = await this.#internal('POST', '/internal/v1/sessions/revoke', { user });
    if (a.status !== 200) throw new Error(`revoke answered ${a.status}: ${JSON.stringify(a.body)}`);
    return a.body;
  }

  /** `GET /internal/v1/stats`: pollsHeld, pollAnswers {message, timeout, superseded, shutdown, error}, … */
  async stats() {
    const a = await this.#internal('GET', '/internal/v1/stats');
    if (a.status !== 200) throw new Error(`stats answered ${a.status}: ${JSON.stringify(a.body)}`);
    return a.body;
  }

  /** Polls the stats until `pred(stats)` holds; returns those stats. */
  async waitForStats(pred, what, timeoutMs = 10_000) {
    const until = Date.now() + timeoutMs;
    let last;
    for (;;) {
      last = await this.stats();
      if (pred(last)) return last;
      if (Date.now() > until) throw new Error(`timed out waiting for ${what}; last stats: ${JSON.stringify(last)}`);
      await sleep(50);
    }
  }
}

/** Total poll answers of every outcome, from `stats().pollAnswers`. */
export function answersTotal(stats) {
  return Object.values(stats.pollAnswers).reduce((a, b) => a + b, 0);
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
