// Poll timing, errors, expiry, cursor and dedupe of one client (one tab).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PnsClient } from '../pns-client.js';
import { FakeClock, FakeFetch, FakeStorage, flush, mail, record } from '../test-support/fakes.js';

const OK = (msg = [], cursor = undefined, more = undefined) => ({ c: msg.length, msg, ...(cursor ? { cursor } : {}), ...(more ? { more } : {}) });

function setup(extra = {}) {
  const clock = new FakeClock();
  const net = new FakeFetch();
  const storage = extra.storage ?? new FakeStorage();
  const reported = [];
  const client = new PnsClient({
    url: 'http://pns.test:8080/',
    sid: 'SID-1',
    comeFrom: 'unit',
    holdSecs: 30,
    fetch: net.fetch,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0.5,
    storage,
    locks: null,
    BroadcastChannel: null,
    window: null,
    reportError: (e) => reported.push(e),
    ...extra,
  });
  const ev = record(client);
  return { clock, net, storage, client, ev, reported };
}

/** Starts the client and answers the first (timeout=0) poll with `body`. */
async function startConnected(ctx, body = OK([], 'c0')) {
  ctx.client.start();
  await flush();
  assert.equal(ctx.net.count, 1, 'first poll sent on start');
  ctx.net.last.respond(200, body);
  await flush();
}

/** Asserts that exactly `ms` pass before the next poll goes out. */
async function expectNextPollAfter({ clock, net }, ms) {
  const before = net.count;
  if (ms > 0) {
    await clock.tick(ms - 1);
    assert.equal(net.count, before, `no poll before ${ms} ms`);
    await clock.tick(1);
  } else {
    await flush();
  }
  assert.equal(net.count, before + 1, `a poll exactly ${ms} ms later`);
}

test('first poll: URL, query, answer-at-once probe; then held polls', async () => {
  const ctx = setup();
  ctx.client.start();
  await flush();
  const first = ctx.net.last;
  assert.equal(new URL(first.url).origin + new URL(first.url).pathname, 'http://pns.test:8080/pns/poll');
  assert.equal(first.params.get('sid'), 'SID-1');
  assert.equal(first.params.get('comeFrom'), 'unit');
  assert.equal(first.params.get('cursor'), null);
  assert.equal(first.params.get('timeout'), '0');
  assert.equal(first.init.method, 'GET');
  assert.ok(first.init.signal, 'has an abort signal');
  first.respond(200, OK([], 'c1'));
  await expectNextPollAfter(ctx, 500);
  assert.equal(ctx.net.last.params.get('timeout'), '30');
  assert.equal(ctx.net.last.params.get('cursor'), 'c1');
  assert.equal(ctx.client.state, 'connected');
  assert.equal(ctx.client.role, 'leader');
});

test('polls again 500 ms after every successful answer', async () => {
  const ctx = setup();
  await startConnected(ctx);
  await expectNextPollAfter(ctx, 500);
  await ctx.clock.tick(29_000);
  await flush();
  ctx.net.last.respond(200, OK([mail(1)], 'c2'));
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.respond(200, OK([], 'c3'));
  await expectNextPollAfter(ctx, 500);
});

test('polls at once when the answer says more', async () => {
  const ctx = setup();
  await startConnected(ctx, OK([mail(1)], 'c1', true));
  assert.equal(ctx.net.count, 2, 'second poll without any time passing');
  assert.equal(ctx.net.last.params.get('cursor'), 'c1');
  ctx.net.last.respond(200, OK([mail(2)], 'c2', false));
  await expectNextPollAfter(ctx, 500);
});

test('120 s after a 503 without Retry-After, then a probe poll', async () => {
  const ctx = setup();
  await startConnected(ctx);
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.respond(503, { c: 0, msg: [], errorCode: 'UNAVAILABLE', error: 'store down' });
  await expectNextPollAfter(ctx, 120_000);
  assert.equal(ctx.net.last.params.get('timeout'), '0');
  const err = ctx.ev.error.at(-1);
  assert.equal(err.kind, 'server');
  assert.equal(err.status, 503);
  assert.equal(err.errorCode, 'UNAVAILABLE');
  assert.equal(err.retryInMs, 120_000);
  const backoff = ctx.ev.state.find((s) => s.state === 'backoff');
  assert.equal(backoff.reason, 'server');
  assert.equal(backoff.delayMs, 120_000);
});

test('120 s after any 5xx, even without a JSON body', async () => {
  const ctx = setup();
  ctx.client.start();
  await flush();
  ctx.net.last.respond(502, '<html>Bad Gateway</html>');
  await expectNextPollAfter(ctx, 120_000);
});

test('120 s after a 200 whose body carries an errorCode', async () => {
  const ctx = setup();
  await startConnected(ctx);
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.respond(200, { c: 0, msg: [], errorCode: 'UNAVAILABLE' });
  await expectNextPollAfter(ctx, 120_000);
  assert.equal(ctx.ev.error.length, 1);
});

test('Retry-After wins, shorter or longer than 120 s', async () => {
  const ctx = setup();
  await startConnected(ctx);
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.respond(503, { c: 0, msg: [], errorCode: 'UNAVAILABLE' }, { 'Retry-After': '7' });
  await expectNextPollAfter(ctx, 7_000);
  ctx.net.last.respond(429, { c: 0, msg: [], errorCode: 'RATE_LIMITED' }, { 'Retry-After': '3' });
  await expectNextPollAfter(ctx, 3_000);
  ctx.net.last.respond(503, { c: 0, msg: [], errorCode: 'UNAVAILABLE' }, { 'Retry-After': '200' });
  await expectNextPollAfter(ctx, 200_000);
  ctx.net.last.respond(200, OK());
  await expectNextPollAfter(ctx, 500);
});

test('network failures: full-jitter exponential backoff capped at 120 s', async () => {
  const randoms = [0.1, 0.9, 0.5, 0.25, 0.75, 0.99, 0.3, 0.6, 0.999, 0.999, 0.999];
  let i = -1; // the constructor draws once for the tab id
  const ctx = setup({ random: () => (i < 0 ? 0.5 : randoms[i++]) });
  i = 0;
  ctx.client.start();
  await flush();
  const expected = randoms.map((r, attempt) => Math.floor(r * Math.min(120_000, 500 * 2 ** attempt)));
  assert.deepEqual(expected.slice(0, 4), [50, 900, 1000, 1000]);
  assert.equal(expected.at(-1), 119_880);
  for (const delay of expected) {
    ctx.net.last.fail(new TypeError('Failed to fetch'));
    await expectNextPollAfter(ctx, delay);
  }
  assert.equal(ctx.ev.error.length, randoms.length);
  assert.ok(ctx.ev.error.every((e) => e.kind === 'network'));
  assert.deepEqual(
    ctx.ev.state.filter((s) => s.state === 'backoff').map((s) => s.attempt),
    randoms.map((_, n) => n + 1),
  );
});

test('backoff never exceeds 120 s however many failures', async () => {
  const ctx = setup({ random: () => 0.9999999 });
  ctx.client.start();
  await flush();
  for (let n = 0; n < 25; n++) {
    ctx.net.last.fail();
    await flush();
    const [delay] = ctx.clock.pending();
    assert.ok(delay < 120_000, `failure ${n}: ${delay}`);
    await ctx.clock.tick(delay);
  }
  assert.equal(ctx.net.count, 26);
});

test('a success resets the network backoff', async () => {
  const ctx = setup({ random: () => 0.5 });
  ctx.client.start();
  await flush();
  for (const delay of [250, 500, 1000, 2000]) {
    ctx.net.last.fail();
    await expectNextPollAfter(ctx, delay);
  }
  ctx.net.last.respond(200, OK());
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.fail();
  await expectNextPollAfter(ctx, 250); // back to attempt 0
});

test('a server error does not reset the network backoff', async () => {
  const ctx = setup({ random: () => 0.5 });
  ctx.client.start();
  await flush();
  ctx.net.last.fail();
  await expectNextPollAfter(ctx, 250);
  ctx.net.last.fail();
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.respond(503, { errorCode: 'UNAVAILABLE' }, { 'Retry-After': '1' });
  await expectNextPollAfter(ctx, 1000);
  ctx.net.last.fail();
  await expectNextPollAfter(ctx, 1000); // attempt 2
});

test('request timeout is holdSecs + 15 s and counts as a network failure', async () => {
  const ctx = setup({ holdSecs: 30, random: () => 0.5 });
  await startConnected(ctx);
  await expectNextPollAfter(ctx, 500);
  const held = ctx.net.last;
  await ctx.clock.tick(44_999);
  assert.equal(held.aborted, false);
  await ctx.clock.tick(1);
  assert.equal(held.aborted, true, 'aborted at 45 s');
  assert.equal(ctx.ev.error.at(-1).kind, 'timeout');
  await expectNextPollAfter(ctx, 250);
});

test('holdSecs is honoured in the timeout and the held poll', async () => {
  const ctx = setup({ holdSecs: 60 });
  await startConnected(ctx);
  await expectNextPollAfter(ctx, 500);
  assert.equal(ctx.net.last.params.get('timeout'), '60');
  const held = ctx.net.last;
  await ctx.clock.tick(74_999);
  assert.equal(held.aborted, false);
  await ctx.clock.tick(1);
  assert.equal(held.aborted, true);
});

test('401: sessionExpired once, state expired, no further poll, no timer left', async () => {
  const ctx = setup();
  await startConnected(ctx, OK([mail(1)], 'c1'));
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.respond(401, { c: 0, msg: [], errorCode: 'SESSION_INVALID', error: 'revoked' });
  await flush();
  assert.equal(ctx.ev.sessionExpired.length, 1);
  assert.equal(ctx.ev.sessionExpired[0].status, 401);
  assert.equal(ctx.ev.sessionExpired[0].errorCode, 'SESSION_INVALID');
  assert.equal(ctx.ev.error.length, 0, '401 is not reported as an error');
  assert.equal(ctx.client.state, 'expired');
  assert.equal(ctx.ev.state.at(-1).state, 'expired');
  assert.deepEqual(ctx.clock.pending(), []);
  const count = ctx.net.count;
  await ctx.clock.tick(3_600_000);
  assert.equal(ctx.net.count, count);
  assert.equal(ctx.storage.length, 0, 'stored cursor of the dead session removed');
});

test('401 on the very first poll', async () => {
  const ctx = setup();
  ctx.client.start();
  await flush();
  ctx.net.last.respond(401, { c: 0, msg: [], errorCode: 'SESSION_INVALID' });
  await ctx.clock.tick(600_000);
  assert.equal(ctx.net.count, 1);
  assert.equal(ctx.ev.sessionExpired.length, 1);
});

test('message for every new message, mail for type 70 only, in order', async () => {
  const ctx = setup();
  const other = { id: 'x1', type: 71, time: 1, data: { text: 'hi' } };
  await startConnected(ctx, OK([mail(1), other, mail(2)], 'c1'));
  assert.deepEqual(ctx.ev.message.map((m) => m.id), ['1', 'x1', '2']);
  assert.deepEqual(ctx.ev.mail.map((m) => m.id), ['1', '2']);
  assert.equal(ctx.ev.mail[0].data.subject, 'Subject 1');
});

test('drops messages already seen', async () => {
  const ctx = setup();
  await startConnected(ctx, OK([mail(1), mail(2)], 'c1'));
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.respond(200, OK([mail(2), mail(3), mail(1)], 'c2'));
  await flush();
  assert.deepEqual(ctx.ev.message.map((m) => m.id), ['1', '2', '3']);
  assert.deepEqual(ctx.ev.mail.map((m) => m.id), ['1', '2', '3']);
});

test('the seen-set is bounded', async () => {
  const ctx = setup({ seenMax: 3 });
  await startConnected(ctx, OK([mail(1), mail(2), mail(3), mail(4)], 'c1'));
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.respond(200, OK([mail(4), mail(1)], 'c2')); // 1 was evicted, 4 was not
  await flush();
  assert.deepEqual(ctx.ev.message.map((m) => m.id), ['1', '2', '3', '4', '1']);
  assert.equal(JSON.parse([...ctx.storage.map.values()][0]).seen.length, 3);
});

test('cursor is sent on the next poll and kept in storage; a reload continues', async () => {
  const storage = new FakeStorage();
  const ctx = setup({ storage });
  await startConnected(ctx, OK([mail(1)], 'cur-1'));
  await expectNextPollAfter(ctx, 500);
  assert.equal(ctx.net.last.params.get('cursor'), 'cur-1');
  ctx.net.last.respond(200, OK([], 'cur-2'));
  await expectNextPollAfter(ctx, 500);
  assert.equal(ctx.net.last.params.get('cursor'), 'cur-2');
  assert.equal(ctx.client.cursor, 'cur-2');
  const [key, raw] = [...storage.map.entries()][0];
  assert.ok(!key.includes('SID-1'), 'the storage key does not carry the sid itself');
  assert.equal(JSON.parse(raw).cursor, 'cur-2');

  // "Reload": a new client on the same storage and sid.
  ctx.client.stop();
  const again = setup({ storage });
  again.client.start();
  await flush();
  assert.equal(again.net.last.params.get('cursor'), 'cur-2');
  again.net.last.respond(200, OK([mail(1), mail(5)], 'cur-3'));
  await flush();
  assert.deepEqual(again.ev.message.map((m) => m.id), ['5'], 'ids seen before the reload are dropped');

  // Another session does not reuse it.
  const other = setup({ storage, sid: 'SID-2' });
  other.client.start();
  await flush();
  assert.equal(other.net.last.params.get('cursor'), null);
});

test('an answer without a cursor keeps the previous one', async () => {
  const ctx = setup();
  await startConnected(ctx, OK([], 'keep'));
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.respond(200, { c: 0, msg: [] });
  await expectNextPollAfter(ctx, 500);
  assert.equal(ctx.net.last.params.get('cursor'), 'keep');
});

test('stop(): aborts the held poll, state stopped, nothing more', async () => {
  const ctx = setup();
  await startConnected(ctx);
  await expectNextPollAfter(ctx, 500);
  const held = ctx.net.last;
  ctx.client.stop();
  await flush();
  assert.equal(held.aborted, true);
  assert.equal(ctx.client.state, 'stopped');
  assert.equal(ctx.client.role, null);
  assert.deepEqual(ctx.clock.pending(), []);
  await ctx.clock.tick(600_000);
  assert.equal(ctx.net.count, 2);
  assert.equal(ctx.ev.error.length, 0, 'an abort by stop() is not an error');
  // and it can start again
  ctx.client.start();
  await flush();
  assert.equal(ctx.net.count, 3);
});

test('stop() during a backoff cancels the retry', async () => {
  const ctx = setup();
  ctx.client.start();
  await flush();
  ctx.net.last.respond(503, { errorCode: 'UNAVAILABLE' });
  await flush();
  ctx.client.stop();
  await ctx.clock.tick(200_000);
  assert.equal(ctx.net.count, 1);
});

test('state events: connecting -> connected -> backoff -> connecting -> connected', async () => {
  const ctx = setup();
  await startConnected(ctx);
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.fail();
  await flush();
  await ctx.clock.tick(250);
  ctx.net.last.respond(200, OK());
  await flush();
  const seq = ctx.ev.state.map((s) => s.state);
  assert.deepEqual(seq.filter((s, n) => s !== seq[n - 1]), ['connecting', 'connected', 'backoff', 'connecting', 'connected']);
  assert.equal(ctx.ev.state.at(-1).role, 'leader');
});

test('on() returns an unsubscribe function; unknown events throw', async () => {
  const ctx = setup();
  const got = [];
  const off = ctx.client.on('message', (m) => got.push(m.id));
  assert.throws(() => ctx.client.on('mails', () => {}), TypeError);
  assert.throws(() => ctx.client.on('message', 'nope'), TypeError);
  await startConnected(ctx, OK([mail(1)], 'c1'));
  off();
  await expectNextPollAfter(ctx, 500);
  ctx.net.last.respond(200, OK([mail(2)], 'c2'));
  await flush();
  assert.deepEqual(got, ['1']);
  assert.equal(ctx.ev.message.length, 2);
});

test('a throwing listener does not break delivery or the loop', async () => {
  const ctx = setup();
  ctx.client.on('mail', () => {
    throw new Error('listener bug');
  });
  await startConnected(ctx, OK([mail(1)], 'c1'));
  assert.equal(ctx.reported.length, 1);
  assert.equal(ctx.ev.mail.length, 1, 'the other listener still ran');
  await expectNextPollAfter(ctx, 500);
});

test("the browser's online event cuts a network backoff short", async () => {
  const win = new EventTarget();
  const ctx = setup({ window: win, random: () => 0.99 });
  ctx.client.start();
  await flush();
  for (let n = 0; n < 6; n++) {
    ctx.net.last.fail();
    await flush();
    await ctx.clock.tick(ctx.clock.pending()[0]);
  }
  ctx.net.last.fail();
  await flush();
  const count = ctx.net.count;
  win.dispatchEvent(new Event('online'));
  await flush();
  assert.equal(ctx.net.count, count + 1);
});

test('start() is idempotent and returns the client', async () => {
  const ctx = setup();
  assert.equal(ctx.client.start(), ctx.client);
  ctx.client.start();
  await flush();
  assert.equal(ctx.net.count, 1);
});

test('module exports: default, named and global', async () => {
  const mod = await import('../pns-client.js');
  assert.equal(mod.default, mod.PnsClient);
  assert.equal(globalThis.PnsClient, mod.PnsClient);
});
