// Test doubles for pns-client.js: a fake clock, a scriptable fetch, storage,
// Web Locks and BroadcastChannel. Kept outside test/ because `node --test test/`
// runs every .js file under a directory named "test" as a test file.

/** Lets pending promise chains (fetch -> text() -> JSON -> next timer) settle. */
export async function flush(rounds = 10) {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}

/** A manual clock; timers run only inside tick(). */
export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.t = start;
    this.timers = new Map();
    this.seq = 0;
    this.now = () => this.t;
    this.setTimeout = (fn, ms = 0) => {
      const id = ++this.seq;
      this.timers.set(id, { id, at: this.t + Math.max(0, Number(ms) || 0), ms, fn });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
  }

  /** Advances time by ms, running due timers in order and settling promises after each. */
  async tick(ms) {
    const end = this.t + ms;
    await flush();
    for (;;) {
      let next = null;
      for (const tm of this.timers.values()) {
        if (tm.at <= end && (!next || tm.at < next.at || (tm.at === next.at && tm.id < next.id))) next = tm;
      }
      if (!next) break;
      this.timers.delete(next.id);
      this.t = next.at;
      next.fn();
      await flush();
    }
    this.t = end;
    await flush();
  }

  /** Pending timers, soonest first, as delays from now. */
  pending() {
    return [...this.timers.values()].sort((a, b) => a.at - b.at).map((tm) => tm.at - this.t);
  }
}

/** A fetch whose calls stay pending until the test answers them. */
export class FakeFetch {
  constructor() {
    this.calls = [];
    this.fetch = (url, init = {}) =>
      new Promise((resolve, reject) => {
        const call = {
          url: String(url),
          params: new URL(String(url)).searchParams,
          init,
          settled: false,
          aborted: false,
          respond(status = 200, body = { c: 0, msg: [] }, headers = {}) {
            if (call.settled) throw new Error('call already settled');
            call.settled = true;
            const text = typeof body === 'string' ? body : JSON.stringify(body);
            resolve(new Response(text, { status, headers: { 'content-type': 'application/json', ...headers } }));
          },
          fail(error = new TypeError('Failed to fetch')) {
            if (call.settled) throw new Error('call already settled');
            call.settled = true;
            reject(error);
          },
        };
        const signal = init.signal;
        if (signal) {
          const onAbort = () => {
            if (call.settled) return;
            call.settled = true;
            call.aborted = true;
            reject(signal.reason ?? new DOMException('The operation was aborted.', 'AbortError'));
          };
          if (signal.aborted) onAbort();
          else signal.addEventListener('abort', onAbort, { once: true });
        }
        this.calls.push(call);
      });
  }

  get count() {
    return this.calls.length;
  }

  get last() {
    return this.calls[this.calls.length - 1];
  }

  /** Calls not answered, failed or aborted yet. */
  open() {
    return this.calls.filter((c) => !c.settled);
  }
}

/** sessionStorage stand-in. */
export class FakeStorage {
  constructor() {
    this.map = new Map();
  }
  getItem(k) {
    return this.map.has(k) ? this.map.get(k) : null;
  }
  setItem(k, v) {
    this.map.set(k, String(v));
  }
  removeItem(k) {
    this.map.delete(k);
  }
  get length() {
    return this.map.size;
  }
}

/** navigator.locks stand-in: exclusive locks, FIFO queue, ifAvailable and signal. */
export class FakeLocks {
  constructor() {
    this.held = new Set();
    this.queues = new Map();
  }

  request(name, options, cb) {
    if (typeof options === 'function') {
      cb = options;
      options = {};
    }
    return new Promise((resolve, reject) => {
      const queue = this.#queue(name);
      if (options.signal && options.signal.aborted) {
        reject(new DOMException('aborted', 'AbortError'));
        return;
      }
      if (!this.held.has(name) && queue.length === 0) {
        this.#grant(name, cb, resolve, reject);
        return;
      }
      if (options.ifAvailable) {
        Promise.resolve()
          .then(() => cb(null))
          .then(resolve, reject);
        return;
      }
      const waiter = { cb, resolve, reject };
      queue.push(waiter);
      if (options.signal) {
        options.signal.addEventListener('abort', () => {
          const i = queue.indexOf(waiter);
          if (i >= 0) {
            queue.splice(i, 1);
            reject(new DOMException('aborted', 'AbortError'));
          }
        });
      }
    });
  }

  waiting(name) {
    return this.#queue(name).length;
  }

  #queue(name) {
    if (!this.queues.has(name)) this.queues.set(name, []);
    return this.queues.get(name);
  }

  #grant(name, cb, resolve, reject) {
    this.held.add(name);
    Promise.resolve()
      .then(() => cb({ name, mode: 'exclusive' }))
      .then(
        (v) => {
          this.#release(name);
          resolve(v);
        },
        (e) => {
          this.#release(name);
          reject(e);
        },
      );
  }

  #release(name) {
    this.held.delete(name);
    const next = this.#queue(name).shift();
    if (next) this.#grant(name, next.cb, next.resolve, next.reject);
  }
}

/** A BroadcastChannel class bound to one simulated browser. */
export function createBroadcastHub() {
  const hub = { instances: [] };
  class FakeBroadcastChannel {
    constructor(name) {
      this.name = String(name);
      this.onmessage = null;
      this.closed = false;
      this.muted = false; // a "crashed" tab: sends and receives nothing
      hub.instances.push(this);
    }
    postMessage(data) {
      if (this.closed) throw new DOMException('closed', 'InvalidStateError');
      if (this.muted) return;
      const copy = structuredClone(data);
      for (const ch of hub.instances) {
        if (ch === this || ch.name !== this.name) continue;
        const deliver = () => {
          if (!ch.closed && !ch.muted && typeof ch.onmessage === 'function') ch.onmessage({ data: structuredClone(copy) });
        };
        // Delivered as a separate step, like a real task; or held back to stage races.
        if (hub.holding) hub.held.push(deliver);
        else Promise.resolve().then(deliver);
      }
    }
    close() {
      this.closed = true;
    }
  }
  hub.holding = false;
  hub.held = [];
  /** Delivers the messages held back while `holding` was true. */
  hub.release = () => {
    hub.holding = false;
    for (const deliver of hub.held.splice(0)) deliver();
  };
  hub.BroadcastChannel = FakeBroadcastChannel;
  hub.open = () => hub.instances.filter((c) => !c.closed);
  return hub;
}

/** Records every event of a client. */
export function record(client) {
  const ev = { message: [], mail: [], error: [], sessionExpired: [], state: [] };
  client.on('message', (m) => ev.message.push(m));
  client.on('mail', (m) => ev.mail.push(m));
  client.on('error', (e) => ev.error.push(e));
  client.on('sessionExpired', (e) => ev.sessionExpired.push(e));
  client.on('state', (s, d) => ev.state.push({ state: s, ...d }));
  return ev;
}

/** A new-mail message as the server sends it. */
export function mail(id, extra = {}) {
  return {
    id: String(id),
    type: 70,
    time: 1_700_000_000_000,
    data: { folder: 'INBOX', uid: Number(id) || 1, uidValidity: 1, from: 'Bob <bob@example.com>', subject: `Subject ${id}`, snippet: 'Hi', unseen: 1 },
    ...extra,
  };
}
