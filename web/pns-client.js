// pns-client.js — browser client for PNS (push notifications for webmail).
//
// An ES module with no dependencies and no build step. It also assigns
// `globalThis.PnsClient`, so a page can load it with
//   <script type="module" src="/pns/client.js"></script>
// and use `window.PnsClient` from later module scripts (or from classic scripts
// that run after the `load` event: module scripts are deferred). The file uses
// `export`, so it must be loaded as a module; a classic <script> cannot load it.
//
// Layers, each usable and testable on its own:
//   planNext(), parseRetryAfter(), backoffDelay()  pure timing rules
//   readOutcome()                                   HTTP response -> outcome
//   PollLoop                                        one poll loop (the leader's)
//   WebLocksElection / BroadcastElection            one poller per browser
//   PnsClient                                       public API: events, cursor, dedupe, tabs
// Every browser global it touches (fetch, timers, clock, random, storage,
// locks, BroadcastChannel, window events) can be injected through options.

/** Timing contract (SPEC "Bundled JS client"). */
export const TIMING = Object.freeze({
  okDelayMs: 500, // next poll after a successful answer
  serverErrorDelayMs: 120_000, // after an errorCode or a 5xx (Retry-After wins)
  backoffBaseMs: 500, // network failures: full jitter in [0, min(max, base * 2^attempt))
  backoffMaxMs: 120_000,
  timeoutExtraSecs: 15, // request timeout = holdSecs + this
  retryAfterMinMs: 500, // a Retry-After of 0 still waits the normal re-poll gap
  retryAfterMaxMs: 3_600_000, // and an absurd one is capped at an hour
});

/** Connection states, in the order a healthy client usually meets them. */
export const STATES = Object.freeze(['idle', 'connecting', 'connected', 'backoff', 'expired', 'stopped']);
/** Event names accepted by `PnsClient#on`. */
export const EVENTS = Object.freeze(['message', 'mail', 'error', 'sessionExpired', 'state']);
/** Message type of "new mail". */
export const MAIL_TYPE = 70;

const MAX_HOLD_SECS = 110; // SPEC: PNS_HOLD_SECS is capped at 110

// ---------------------------------------------------------------------------
// Pure timing rules
// ---------------------------------------------------------------------------

/**
 * Full-jitter exponential backoff: random(0, min(max, base * 2^attempt)).
 * `attempt` counts the network failures before this one (0 for the first).
 */
export function backoffDelay(attempt, random = Math.random) {
  const cap = Math.min(TIMING.backoffMaxMs, TIMING.backoffBaseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/**
 * Parses a Retry-After header (delta-seconds, or an HTTP date) into ms.
 * Returns null when absent or unparsable; clamps to [retryAfterMinMs, retryAfterMaxMs].
 */
export function parseRetryAfter(value, now = Date.now()) {
  if (value == null) return null;
  const text = String(value).trim();
  if (text === '') return null;
  let ms;
  if (/^\d+(\.\d+)?$/.test(text)) ms = Number(text) * 1000;
  else {
    // An HTTP date always has letters; Date.parse('-5') would read a year.
    if (!/[a-z]/i.test(text)) return null;
    const at = Date.parse(text);
    if (Number.isNaN(at)) return null;
    ms = at - now;
  }
  return Math.round(Math.min(TIMING.retryAfterMaxMs, Math.max(TIMING.retryAfterMinMs, ms)));
}

/**
 * Decides when to poll next.
 * @param outcome  {kind:'ok', body} | {kind:'server', retryAfterMs} | {kind:'network'} | {kind:'expired'}
 * @param attempt  consecutive network failures so far
 * @returns {{delayMs: number|null, attempt: number}}  delayMs null = never poll again
 */
export function planNext(outcome, attempt = 0, random = Math.random) {
  switch (outcome.kind) {
    case 'ok':
      // A success resets the network backoff.
      return { delayMs: outcome.body && outcome.body.more === true ? 0 : TIMING.okDelayMs, attempt: 0 };
    case 'server':
      // The server answered, so the backoff counter is left alone: only a success resets it.
      return { delayMs: outcome.retryAfterMs ?? TIMING.serverErrorDelayMs, attempt };
    case 'network':
      return { delayMs: backoffDelay(attempt, random), attempt: attempt + 1 };
    case 'expired':
      return { delayMs: null, attempt };
    default:
      throw new TypeError(`planNext: unknown outcome kind ${outcome.kind}`);
  }
}

/**
 * Turns a fetch Response into an outcome for planNext().
 * 401 -> expired; 2xx JSON without errorCode -> ok; anything else the server
 * said (errorCode, 5xx, other 4xx, a body that is not JSON) -> server error.
 * A failure while reading the body is a network failure.
 */
export async function readOutcome(res, now = Date.now()) {
  const status = res.status;
  const retryAfterMs = parseRetryAfter(res.headers && res.headers.get ? res.headers.get('Retry-After') : null, now);
  let text;
  try {
    text = await res.text();
  } catch (error) {
    return { kind: 'network', error, timeout: false };
  }
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  const isObject = body !== null && typeof body === 'object' && !Array.isArray(body);
  const errorCode = isObject && body.errorCode != null ? String(body.errorCode) : undefined;
  const reason = isObject && typeof body.error === 'string' ? body.error : undefined;
  if (status === 401) return { kind: 'expired', status, errorCode: errorCode ?? 'SESSION_INVALID', reason };
  if (res.ok && isObject && errorCode === undefined) {
    const msg = Array.isArray(body.msg) ? body.msg : [];
    return { kind: 'ok', status, body: { ...body, msg } };
  }
  return {
    kind: 'server',
    status,
    errorCode,
    reason: reason ?? (res.ok && !isObject ? 'malformed answer' : `HTTP ${status}`),
    retryAfterMs,
  };
}

/** Error passed to 'error' and 'sessionExpired' listeners. */
export class PnsError extends Error {
  constructor(message, { kind, status, errorCode, retryInMs, cause } = {}) {
    super(message);
    this.name = 'PnsError';
    /** 'network' | 'timeout' | 'server' | 'expired' */
    this.kind = kind;
    this.status = status;
    this.errorCode = errorCode;
    this.retryInMs = retryInMs;
    if (cause !== undefined) this.cause = cause;
  }
}

function errorFromOutcome(outcome, retryInMs) {
  if (outcome.kind === 'network') {
    const kind = outcome.timeout ? 'timeout' : 'network';
    const what = outcome.timeout ? 'poll timed out' : `network failure${outcome.error && outcome.error.message ? `: ${outcome.error.message}` : ''}`;
    return new PnsError(what, { kind, retryInMs, cause: outcome.error });
  }
  const message = outcome.errorCode ? `${outcome.errorCode}: ${outcome.reason ?? `HTTP ${outcome.status}`}` : outcome.reason ?? `HTTP ${outcome.status}`;
  return new PnsError(message, { kind: outcome.kind, status: outcome.status, errorCode: outcome.errorCode, retryInMs });
}

// Errors cross the BroadcastChannel as plain objects (custom fields do not survive structured clone).
function errorToWire(e) {
  return { message: e.message, kind: e.kind, status: e.status, errorCode: e.errorCode, retryInMs: e.retryInMs };
}
function errorFromWire(w = {}) {
  return new PnsError(String(w.message ?? 'error'), w);
}

// ---------------------------------------------------------------------------
// PollLoop — the poll loop run by the leading tab
// ---------------------------------------------------------------------------

/**
 * Polls `GET {url}/pns/poll` until stopped or the session expires.
 *
 * Requests: the first poll (and the first after any failure) is sent with
 * `timeout=0`, so the server answers at once and the UI shows "connected"
 * without waiting a whole hold; the following polls send `timeout=holdSecs`,
 * so the server never holds longer than our request timeout
 * (holdSecs + 15 s) allows.
 *
 * Background tabs: every wait is ONE setTimeout created when a fetch settles
 * (a network task), never from inside another timer callback. Chrome's
 * "intensive throttling" (1 wake-up per minute in tabs hidden > 5 min) only
 * hits timer chains nested >= 5 deep, which this loop never builds, so the
 * 500 ms re-poll stretches to ~1 s at worst under normal hidden-tab
 * throttling; the long poll itself is a fetch and is not throttled at all.
 * A dedicated Worker was rejected: it needs a same-origin script URL (webmail
 * pages usually load this file from the PNS origin, and cross-origin Workers
 * are refused) and a worker-src CSP, for a gain of at most ~0.5 s.
 *
 * hooks: cursor() -> string|null, onState(state, detail), onAnswer(body),
 *        onError(PnsError), onExpired(PnsError)
 */
export class PollLoop {
  #o;
  #gen = 0; // bumped by stop(); an async step whose generation is stale just returns
  #running = false;
  #attempt = 0; // consecutive network failures
  #ctrl = null; // AbortController of the poll in flight
  #sleeper = null; // {timer, resolve, reason} of the current wait
  #state = 'idle';

  constructor(options) {
    const o = { ...options };
    o.url = String(o.url ?? '').replace(/\/+$/, '');
    o.holdSecs = normalizeHold(o.holdSecs);
    o.setTimeout ??= (fn, ms) => globalThis.setTimeout(fn, ms);
    o.clearTimeout ??= (t) => globalThis.clearTimeout(t);
    o.now ??= () => Date.now();
    o.random ??= () => Math.random();
    o.fetch ??= (...a) => globalThis.fetch(...a);
    o.cursor ??= () => null;
    for (const h of ['onState', 'onAnswer', 'onError', 'onExpired']) o[h] ??= () => {};
    this.#o = o;
  }

  get state() { return this.#state; }
  get running() { return this.#running; }
  /** Consecutive network failures (the backoff exponent of the next failure). */
  get attempt() { return this.#attempt; }

  start() {
    if (this.#running) return;
    this.#running = true;
    const gen = ++this.#gen;
    this.#run(gen).catch((e) => {
      // Only a bug can land here; do not leave an unhandled rejection behind.
      if (gen === this.#gen) this.#o.onError(new PnsError(`poll loop failed: ${e && e.message}`, { kind: 'network', cause: e }));
    });
  }

  stop() {
    if (!this.#running) return;
    this.#running = false;
    this.#gen++;
    if (this.#ctrl) this.#ctrl.abort();
    this.#ctrl = null;
    this.#endSleep(true);
  }

  /** Cuts a network-failure backoff short (e.g. on the browser's 'online' event). */
  wake() {
    if (this.#sleeper && this.#sleeper.reason === 'network') this.#endSleep(true);
  }

  /** The URL of the next poll (exposed for tests and debugging). */
  pollUrl(timeoutSecs) {
    const { url, sid, comeFrom } = this.#o;
    const q = new URLSearchParams();
    if (sid) q.set('sid', sid);
    if (comeFrom) q.set('comeFrom', comeFrom);
    const cursor = this.#o.cursor();
    if (cursor) q.set('cursor', cursor);
    q.set('timeout', String(timeoutSecs));
    return `${url}/pns/poll?${q}`;
  }

  async #run(gen) {
    let probe = true; // answer-at-once poll after (re)connecting
    this.#setState('connecting');
    while (gen === this.#gen) {
      const outcome = await this.#pollOnce(probe ? 0 : this.#o.holdSecs);
      if (gen !== this.#gen) return; // stopped while the poll was in flight
      const plan = planNext(outcome, this.#attempt, this.#o.random);
      this.#attempt = plan.attempt;

      if (outcome.kind === 'ok') {
        probe = false;
        this.#setState('connected');
        this.#o.onAnswer(outcome.body);
      } else if (outcome.kind === 'expired') {
        this.#running = false;
        this.#gen++;
        this.#setState('expired', { status: outcome.status, errorCode: outcome.errorCode });
        this.#o.onExpired(errorFromOutcome(outcome));
        return;
      } else {
        probe = true;
        const reason = outcome.kind; // 'server' | 'network'
        this.#setState('backoff', {
          reason,
          delayMs: plan.delayMs,
          retryAt: this.#o.now() + plan.delayMs,
          attempt: this.#attempt,
          status: outcome.status,
          errorCode: outcome.errorCode,
        });
        this.#o.onError(errorFromOutcome(outcome, plan.delayMs));
      }
      if (gen !== this.#gen) return; // a hook called stop()
      if (plan.delayMs > 0) {
        await this.#sleep(plan.delayMs, outcome.kind);
        if (gen !== this.#gen) return;
      }
      if (probe) this.#setState('connecting');
    }
  }

  async #pollOnce(timeoutSecs) {
    const { fetch, setTimeout, clearTimeout, now, holdSecs, credentials } = this.#o;
    const ctrl = new AbortController();
    this.#ctrl = ctrl;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      ctrl.abort();
    }, (holdSecs + TIMING.timeoutExtraSecs) * 1000);
    try {
      const init = { method: 'GET', signal: ctrl.signal, cache: 'no-store' };
      if (credentials) init.credentials = credentials;
      const res = await fetch(this.pollUrl(timeoutSecs), init);
      const outcome = await readOutcome(res, now());
      // The body read can also be cut by the timeout.
      if (outcome.kind === 'network') outcome.timeout = timedOut;
      return outcome;
    } catch (error) {
      return { kind: 'network', error, timeout: timedOut };
    } finally {
      clearTimeout(timer);
      if (this.#ctrl === ctrl) this.#ctrl = null;
    }
  }

  #sleep(ms, reason) {
    return new Promise((resolve) => {
      const timer = this.#o.setTimeout(() => this.#endSleep(false), ms);
      this.#sleeper = { timer, resolve, reason };
    });
  }

  #endSleep(cancelTimer) {
    const s = this.#sleeper;
    if (!s) return;
    this.#sleeper = null;
    if (cancelTimer) this.#o.clearTimeout(s.timer);
    s.resolve();
  }

  #setState(state, detail = {}) {
    this.#state = state;
    this.#o.onState(state, detail);
  }
}

function normalizeHold(v) {
  const n = Number(v ?? 30);
  if (!Number.isFinite(n) || n < 0) return 30;
  return Math.min(MAX_HOLD_SECS, Math.floor(n));
}

// ---------------------------------------------------------------------------
// Leader election: exactly one tab per (browser, sid) polls
// ---------------------------------------------------------------------------

/** Single tab, no sharing: this instance always leads. */
class SoloElection {
  #hooks;
  #on = false;
  constructor(hooks) { this.#hooks = hooks; }
  start() {
    this.#on = true;
    // Async like the others, so start() returns before the first poll.
    Promise.resolve().then(() => this.#on && this.#hooks.onLead());
  }
  stop() { this.#on = false; }
  handle() {}
}

/**
 * Web Locks: the leader holds the lock for the whole of its leadership;
 * the other tabs wait in the lock queue. When the leading tab closes (or
 * crashes), the browser hands the lock to the next waiter at once. A tab
 * that the browser freezes steps down first (see PnsClient's 'freeze' handler).
 */
export class WebLocksElection {
  #locks; #name; #hooks;
  #abort = null;
  #release = null;
  #stopped = false;

  constructor(locks, name, hooks) {
    this.#locks = locks;
    this.#name = name;
    this.#hooks = hooks; // onLead(), onFollow(), onFailed(error)
  }

  start() {
    this.#abort = new AbortController();
    const NOT_AVAILABLE = {};
    const hold = (lock) => {
      if (!lock) return NOT_AVAILABLE;
      if (this.#stopped) return undefined; // released right away
      return new Promise((release) => {
        this.#release = release;
        this.#hooks.onLead();
      });
    };
    const failed = (e) => {
      if (!this.#stopped && !(e && e.name === 'AbortError')) this.#hooks.onFailed(e);
    };
    try {
      // Try without waiting first, so a tab that will not lead learns it at once.
      this.#locks
        .request(this.#name, { ifAvailable: true }, hold)
        .then((r) => {
          if (r !== NOT_AVAILABLE || this.#stopped) return undefined;
          this.#hooks.onFollow();
          return this.#locks.request(this.#name, { signal: this.#abort.signal }, hold);
        })
        .catch(failed);
    } catch (e) {
      failed(e); // e.g. SecurityError in an opaque origin
    }
  }

  stop() {
    this.#stopped = true;
    if (this.#abort) this.#abort.abort();
    if (this.#release) this.#release();
    this.#release = null;
  }

  handle() {}
}

/**
 * Fallback for browsers without Web Locks: a heartbeat over the
 * BroadcastChannel. The leader sends 'hb' every heartbeatMs; a follower that
 * hears none for timeoutMs claims leadership; a leader that hears another
 * leader yields if its id is larger (ids start with the start time, so the
 * older tab wins). A leader that goes away cleanly says 'bye' and a follower
 * takes over almost at once; one that crashes is replaced after timeoutMs.
 */
export class BroadcastElection {
  #o;
  #role = null; // 'leader' | 'follower' | null
  #leaderId = null;
  #lastHb = -Infinity;
  #timer = null;
  #stopped = false;

  constructor(o) {
    // o: id, post(msg), setTimeout, clearTimeout, now, random, onLead(), onFollow(),
    //    heartbeatMs, timeoutMs, claimWaitMs, byeJitterMs
    this.#o = { heartbeatMs: 500, timeoutMs: 2000, claimWaitMs: 200, byeJitterMs: 100, ...o };
  }

  get role() { return this.#role; }

  start() {
    this.#o.post({ t: 'ask' }); // a living leader answers with 'hb' at once
    this.#schedule(this.#o.claimWaitMs);
  }

  stop() {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#clear();
    if (this.#role === 'leader') this.#o.post({ t: 'bye' });
    this.#role = null;
  }

  handle(msg) {
    if (this.#stopped) return;
    const { id, now } = this.#o;
    if (msg.t === 'ask') {
      if (this.#role === 'leader') this.#o.post({ t: 'hb' });
    } else if (msg.t === 'hb') {
      if (msg.from === id) return;
      if (this.#role === 'leader') {
        // Two leaders: the smaller id wins; the other yields when it hears
        // the winner's next regular heartbeat (no instant reply: no ping-pong).
        if (String(msg.from) < id) this.#follow(msg.from);
        return;
      }
      this.#lastHb = now();
      this.#leaderId = msg.from;
      if (this.#role !== 'follower') this.#follow(msg.from);
    } else if (msg.t === 'bye') {
      if (this.#role === 'leader' || msg.from !== this.#leaderId) return;
      this.#leaderId = null;
      this.#lastHb = -Infinity;
      // Small random delay so that several followers rarely claim together.
      this.#schedule(Math.floor(this.#o.random() * this.#o.byeJitterMs));
    }
  }

  #follow(leaderId) {
    this.#role = 'follower';
    this.#leaderId = leaderId;
    this.#lastHb = this.#o.now();
    this.#schedule(this.#o.timeoutMs);
    this.#o.onFollow();
  }

  #tick() {
    this.#timer = null;
    if (this.#stopped) return;
    if (this.#role === 'leader') {
      this.#o.post({ t: 'hb' });
      this.#schedule(this.#o.heartbeatMs);
      return;
    }
    const silentFor = this.#o.now() - this.#lastHb;
    if (silentFor >= this.#o.timeoutMs) {
      this.#role = 'leader';
      this.#leaderId = this.#o.id;
      this.#o.post({ t: 'hb' });
      this.#schedule(this.#o.heartbeatMs);
      this.#o.onLead();
    } else {
      this.#schedule(this.#o.timeoutMs - silentFor);
    }
  }

  #schedule(ms) {
    this.#clear();
    this.#timer = this.#o.setTimeout(() => this.#tick(), ms);
  }

  #clear() {
    if (this.#timer !== null) this.#o.clearTimeout(this.#timer);
    this.#timer = null;
  }
}

// ---------------------------------------------------------------------------
// PnsClient — the public API
// ---------------------------------------------------------------------------

// cyrb53: a short, stable hash so lock, channel and storage names do not
// carry the session token itself.
function hashString(str) {
  let h1 = 0xdeadbeef;
  let h2 = 0x41c6ce57;
  for (let i = 0; i < str.length; i++) {
    const ch = str.charCodeAt(i);
    h1 = Math.imul(h1 ^ ch, 2654435761);
    h2 = Math.imul(h2 ^ ch, 1597334677);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return (4294967296 * (2097151 & h2) + (h1 >>> 0)).toString(36);
}

function defaultSessionStorage() {
  try {
    return globalThis.sessionStorage ?? null; // the getter throws in some sandboxed frames
  } catch {
    return null;
  }
}

function defaultReportError(e) {
  if (typeof globalThis.reportError === 'function') globalThis.reportError(e);
  else if (typeof console !== 'undefined') console.error(e);
}

/**
 * The PNS browser client. See pns-client.d.ts and README.md.
 *
 * Tabs of one browser that use the same sid share one poll: one tab (the
 * leader) polls and re-broadcasts every message, state, error and expiry over
 * a BroadcastChannel; the others (followers) hand them to their listeners.
 * Every tab keeps its own copy of the cursor and of the seen-id set, so any
 * of them can take over where the last leader stopped.
 */
export class PnsClient {
  #o;
  #id;
  #name; // lock and channel name
  #storageKey;
  #listeners = new Map(EVENTS.map((e) => [e, new Set()]));
  #running = false;
  #suspended = false; // torn down by pagehide/freeze, to be set up again by pageshow/resume
  #state = 'idle';
  #detail = { state: 'idle', role: null };
  #emittedRole = null;
  #role = null;
  #cursor = null;
  #seen = new Set(); // insertion-ordered, so the oldest ids are dropped first
  #channel = null;
  #election = null;
  #loop = null;
  #hooks = null; // election callbacks of the current setup
  #unbind = [];

  constructor(options = {}) {
    const has = (k) => Object.prototype.hasOwnProperty.call(options, k) && options[k] !== undefined;
    const g = globalThis;
    const sid = options.sid == null ? '' : String(options.sid);
    const key = hashString(sid);
    this.#o = {
      url: String(options.url ?? '').replace(/\/+$/, ''),
      sid,
      comeFrom: options.comeFrom == null ? undefined : String(options.comeFrom),
      holdSecs: normalizeHold(options.holdSecs),
      credentials: options.credentials,
      shareTabs: options.shareTabs !== false,
      seenMax: Math.max(1, Math.floor(options.seenMax ?? 1000)),
      // Defaults resolve the globals lazily, so test fakes installed later still apply.
      fetch: has('fetch') ? options.fetch : (...a) => g.fetch(...a),
      setTimeout: has('setTimeout') ? options.setTimeout : (fn, ms) => g.setTimeout(fn, ms),
      clearTimeout: has('clearTimeout') ? options.clearTimeout : (t) => g.clearTimeout(t),
      now: has('now') ? options.now : () => Date.now(),
      random: has('random') ? options.random : () => Math.random(),
      storage: has('storage') ? options.storage : defaultSessionStorage(),
      locks: has('locks') ? options.locks : g.navigator && g.navigator.locks ? g.navigator.locks : null,
      BroadcastChannel: has('BroadcastChannel') ? options.BroadcastChannel : typeof g.BroadcastChannel === 'function' ? g.BroadcastChannel : null,
      window: has('window') ? options.window : typeof g.addEventListener === 'function' ? g : null,
      reportError: has('reportError') ? options.reportError : defaultReportError,
      election: options.election ?? {},
    };
    this.#name = has('lockName') ? String(options.lockName) : `pns:${key}`;
    this.#storageKey = `pns:cursor:${key}`;
    // Ids start with the start time so that the older tab wins a BroadcastElection tie.
    this.#id = `${Math.floor(this.#o.now()).toString(36).padStart(10, '0')}-${Math.floor(this.#o.random() * 2 ** 32).toString(36)}`;
    this.#restore();
  }

  /** Current connection state (see STATES). */
  get state() { return this.#state; }
  /** The latest 'state' detail: {state, role, reason?, delayMs?, retryAt?, attempt?, status?, errorCode?}. */
  get stateDetail() { return { ...this.#detail }; }
  /** 'leader' (this tab polls), 'follower' (another tab polls for it) or null (not running). */
  get role() { return this.#role; }
  /** The cursor the next poll will send, or null. */
  get cursor() { return this.#cursor; }
  get running() { return this.#running; }

  /** Adds a listener; returns a function that removes it. */
  on(type, fn) {
    const set = this.#listeners.get(type);
    if (!set) throw new TypeError(`PnsClient: unknown event "${type}" (expected ${EVENTS.join(', ')})`);
    if (typeof fn !== 'function') throw new TypeError('PnsClient: listener must be a function');
    set.add(fn);
    return () => this.off(type, fn);
  }

  /** Removes a listener added with on(). */
  off(type, fn) {
    const set = this.#listeners.get(type);
    if (set) set.delete(fn);
    return this;
  }

  /** Starts polling (or following the tab that polls). Idempotent. */
  start() {
    if (this.#running) return this;
    if (typeof this.#o.fetch !== 'function') throw new Error('PnsClient: no fetch() available');
    this.#running = true;
    this.#suspended = false;
    this.#bindWindow();
    this.#setup();
    return this;
  }

  /** Stops polling, aborts the poll in flight, hands leadership to another tab. Idempotent. */
  stop() {
    if (!this.#running) return this;
    this.#running = false;
    this.#suspended = false;
    this.#teardown();
    this.#unbindWindow();
    this.#setState('stopped');
    return this;
  }

  // -- lifecycle ------------------------------------------------------------

  #setup() {
    const o = this.#o;
    this.#role = null;
    this.#setState('connecting');
    if (o.shareTabs && o.BroadcastChannel) {
      try {
        this.#channel = new o.BroadcastChannel(this.#name);
        this.#channel.onmessage = (ev) => this.#onChannel(ev && ev.data);
      } catch {
        this.#channel = null;
      }
    }
    const hooks = {
      onLead: () => this.#lead(),
      onFollow: () => this.#follow(),
      onFailed: () => this.#startElection(false), // Web Locks unusable: use the heartbeat
    };
    this.#hooks = hooks;
    this.#startElection(Boolean(this.#channel && o.locks));
  }

  #startElection(useLocks) {
    if (this.#election) this.#election.stop();
    const o = this.#o;
    if (!this.#channel) this.#election = new SoloElection(this.#hooks);
    else if (useLocks) this.#election = new WebLocksElection(o.locks, this.#name, this.#hooks);
    else {
      this.#election = new BroadcastElection({
        ...o.election,
        id: this.#id,
        post: (m) => this.#post(m),
        setTimeout: o.setTimeout,
        clearTimeout: o.clearTimeout,
        now: o.now,
        random: o.random,
        onLead: this.#hooks.onLead,
        onFollow: this.#hooks.onFollow,
      });
    }
    this.#election.start();
  }

  #teardown() {
    if (this.#loop) this.#loop.stop();
    this.#loop = null;
    if (this.#election) this.#election.stop(); // may still post 'bye'
    this.#election = null;
    if (this.#channel) {
      this.#channel.onmessage = null;
      try { this.#channel.close(); } catch { /* already closed */ }
    }
    this.#channel = null;
    this.#role = null;
  }

  #bindWindow() {
    const w = this.#o.window;
    const on = (target, type, fn) => {
      if (!target || typeof target.addEventListener !== 'function') return;
      target.addEventListener(type, fn);
      this.#unbind.push(() => target.removeEventListener(type, fn));
    };
    // Leaving the page or entering the back/forward cache (pagehide), or being
    // frozen by the browser (freeze, on document): step down now, so that
    // another tab leads instead of waiting behind a tab that cannot run.
    const suspend = () => {
      if (!this.#running || this.#suspended) return;
      this.#suspended = true;
      this.#teardown();
    };
    const resume = () => {
      if (!this.#running || !this.#suspended) return;
      this.#suspended = false;
      this.#setup();
    };
    on(w, 'pagehide', suspend);
    on(w, 'pageshow', resume);
    const doc = w && w.document;
    on(doc, 'freeze', suspend);
    on(doc, 'resume', resume);
    // Back online: do not sit out the rest of a network backoff.
    on(w, 'online', () => this.#loop && this.#loop.wake());
  }

  #unbindWindow() {
    for (const off of this.#unbind.splice(0)) off();
  }

  // -- roles ----------------------------------------------------------------

  #lead() {
    if (!this.#running || this.#suspended) return;
    this.#role = 'leader';
    const o = this.#o;
    this.#loop = new PollLoop({
      url: o.url,
      sid: o.sid,
      comeFrom: o.comeFrom,
      holdSecs: o.holdSecs,
      credentials: o.credentials,
      fetch: o.fetch,
      setTimeout: o.setTimeout,
      clearTimeout: o.clearTimeout,
      now: o.now,
      random: o.random,
      cursor: () => this.#cursor,
      onState: (state, detail) => {
        this.#setState(state, detail);
        this.#post({ t: 'state', state, detail, cursor: this.#cursor });
      },
      onAnswer: (body) => this.#onAnswer(body),
      onError: (err) => {
        this.#post({ t: 'error', error: errorToWire(err) });
        this.#emit('error', err);
      },
      onExpired: (err) => this.#expire(err, true),
    });
    this.#loop.start();
  }

  #follow() {
    if (!this.#running) return;
    if (this.#loop) this.#loop.stop(); // a BroadcastElection leader stepping down
    this.#loop = null;
    this.#role = 'follower';
    this.#post({ t: 'hello' }); // the leader answers with its state and cursor
    this.#setState(this.#state === 'idle' ? 'connecting' : this.#state, this.#detail);
  }

  #onAnswer(body) {
    const before = this.#cursor;
    const fresh = this.#ingest(body.msg, body.cursor);
    if (fresh.length > 0 || this.#cursor !== before) this.#post({ t: 'msgs', msgs: fresh, cursor: this.#cursor });
    for (const m of fresh) this.#deliver(m);
  }

  #onChannel(m) {
    if (!this.#running || !m || typeof m !== 'object' || m.pns !== 1 || m.from === this.#id) return;
    if (this.#election) this.#election.handle(m);
    const follower = this.#role !== 'leader';
    switch (m.t) {
      case 'hello':
        if (this.#role === 'leader') this.#post({ t: 'state', state: this.#state, detail: this.#detail, cursor: this.#cursor });
        break;
      case 'state':
        if (!follower) break;
        if (typeof m.cursor === 'string' && m.cursor && m.cursor !== this.#cursor) {
          this.#cursor = m.cursor;
          this.#persist();
        }
        if (STATES.includes(m.state) && m.state !== 'expired') this.#setState(m.state, m.detail || {});
        break;
      case 'msgs': {
        // Even a leader takes them (two fallback leaders for a moment): dedupe makes it safe.
        const fresh = this.#ingest(m.msgs, follower ? m.cursor : undefined);
        for (const msg of fresh) this.#deliver(msg);
        break;
      }
      case 'error':
        if (follower) this.#emit('error', errorFromWire(m.error));
        break;
      case 'expired':
        this.#expire(errorFromWire(m.error), false);
        break;
      default:
        break;
    }
  }

  #expire(err, broadcast) {
    if (!this.#running) return;
    if (broadcast) this.#post({ t: 'expired', error: errorToWire(err) });
    this.#running = false;
    this.#suspended = false;
    this.#teardown();
    this.#unbindWindow();
    this.#cursor = null;
    this.#seen.clear();
    try {
      if (this.#o.storage) this.#o.storage.removeItem(this.#storageKey);
    } catch { /* storage unavailable */ }
    this.#setState('expired', { status: err.status, errorCode: err.errorCode });
    this.#emit('sessionExpired', err);
  }

  // -- messages, cursor, dedupe --------------------------------------------

  /** Drops seen ids, records the rest, adopts the cursor; returns the new messages. */
  #ingest(list, cursor) {
    const fresh = [];
    for (const m of Array.isArray(list) ? list : []) {
      if (m === null || typeof m !== 'object') continue;
      if (m.id != null) {
        const id = String(m.id);
        if (this.#seen.has(id)) continue;
        this.#remember(id);
      }
      fresh.push(m);
    }
    let changed = fresh.length > 0;
    if (typeof cursor === 'string' && cursor !== '' && cursor !== this.#cursor) {
      this.#cursor = cursor;
      changed = true;
    }
    if (changed) this.#persist();
    return fresh;
  }

  #deliver(m) {
    this.#emit('message', m);
    if (Number(m.type) === MAIL_TYPE) this.#emit('mail', m);
  }

  #remember(id) {
    this.#seen.add(id);
    if (this.#seen.size > this.#o.seenMax) this.#seen.delete(this.#seen.values().next().value);
  }

  #restore() {
    const s = this.#o.storage;
    if (!s) return;
    try {
      const raw = s.getItem(this.#storageKey);
      if (!raw) return;
      const saved = JSON.parse(raw);
      if (typeof saved.cursor === 'string' && saved.cursor) this.#cursor = saved.cursor;
      if (Array.isArray(saved.seen)) for (const id of saved.seen) this.#remember(String(id));
    } catch { /* unreadable: start fresh */ }
  }

  #persist() {
    const s = this.#o.storage;
    if (!s) return;
    try {
      s.setItem(this.#storageKey, JSON.stringify({ cursor: this.#cursor, seen: [...this.#seen] }));
    } catch { /* quota or privacy mode: the in-memory copy still works */ }
  }

  // -- plumbing -------------------------------------------------------------

  #post(msg) {
    if (!this.#channel) return;
    try {
      this.#channel.postMessage({ pns: 1, from: this.#id, ...msg });
    } catch { /* channel closed */ }
  }

  #setState(state, detail = {}) {
    const prev = this.#state;
    this.#state = state;
    this.#detail = { ...detail, state, role: this.#role };
    // 'backoff' repeats carry new timing; other repeats are noise.
    if (prev === state && this.#emittedRole === this.#role && state !== 'backoff') return;
    this.#emittedRole = this.#role;
    this.#emit('state', state, { ...this.#detail });
  }

  #emit(type, ...args) {
    for (const fn of [...this.#listeners.get(type)]) {
      try {
        fn.apply(this, args);
      } catch (e) {
        // A broken listener must not break the poll loop or the other listeners.
        this.#o.reportError(e);
      }
    }
  }
}

globalThis.PnsClient = PnsClient;

export default PnsClient;
