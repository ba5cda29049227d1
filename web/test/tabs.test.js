// One poll per browser: tabs with the same sid share the leader's poll.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PnsClient } from '../pns-client.js';
import { FakeClock, FakeFetch, FakeLocks, FakeStorage, createBroadcastHub, flush, mail, record } from '../test-support/fakes.js';

const OK = (msg = [], cursor = undefined) => ({ c: msg.length, msg, ...(cursor ? { cursor } : {}) });

/** One simulated browser: shared clock, network, locks and BroadcastChannel. */
function browser({ locks = true } = {}) {
  const clock = new FakeClock();
  const net = new FakeFetch();
  const hub = createBroadcastHub();
  const lockManager = locks ? new FakeLocks() : null;
  let seq = 0;
  const tab = (extra = {}) => {
    const n = ++seq;
    const win = new EventTarget();
    win.document = new EventTarget(); // 'freeze' and 'resume' fire on document
    const client = new PnsClient({
      url: 'http://pns.test',
      sid: 'SID-A',
      holdSecs: 30,
      fetch: net.fetch,
      setTimeout: clock.setTimeout,
      clearTimeout: clock.clearTimeout,
      now: clock.now,
      random: () => (n * 0.1) % 1, // distinct ids per tab
      storage: new FakeStorage(), // sessionStorage is per tab
      locks: lockManager,
      BroadcastChannel: hub.BroadcastChannel,
      window: win,
      ...extra,
    });
    return { client, ev: record(client), win, channel: () => hub.instances.filter((c) => !c.closed).at(-1) };
  };
  return { clock, net, hub, locks: lockManager, tab };
}

const pagehide = (persisted) => Object.assign(new Event('pagehide'), { persisted });
const pageshow = (persisted) => Object.assign(new Event('pageshow'), { persisted });

test('Web Locks: two tabs, one poll; the follower gets messages, state and cursor', async () => {
  const b = browser();
  const A = b.tab();
  const B = b.tab();
  A.client.start();
  await flush();
  B.client.start();
  await flush();
  assert.equal(b.net.count, 1, 'only the leader polls');
  assert.equal(A.client.role, 'leader');
  assert.equal(B.client.role, 'follower');

  b.net.last.respond(200, OK([mail(1), mail(2)], 'c1'));
  await flush();
  assert.deepEqual(A.ev.mail.map((m) => m.id), ['1', '2']);
  assert.deepEqual(B.ev.mail.map((m) => m.id), ['1', '2']);
  assert.deepEqual(B.ev.message.map((m) => m.id), ['1', '2']);
  assert.equal(B.client.state, 'connected');
  assert.equal(B.ev.state.at(-1).role, 'follower');
  assert.equal(B.client.cursor, 'c1');

  await b.clock.tick(500);
  assert.equal(b.net.count, 2, 'still one poll at a time');
  assert.equal(b.net.open().length, 1);
});

test('Web Locks: a tab opened later learns the current state and cursor', async () => {
  const b = browser();
  const A = b.tab();
  A.client.start();
  await flush();
  b.net.last.respond(200, OK([mail(1)], 'c1'));
  await flush();
  const B = b.tab();
  B.client.start();
  await flush();
  assert.equal(B.client.role, 'follower');
  assert.equal(B.client.state, 'connected');
  assert.equal(B.client.cursor, 'c1');
  assert.equal(B.ev.mail.length, 0, 'old news is not replayed to a new tab');
});

test('Web Locks: when the leader goes, the next tab takes over at once with the cursor', async () => {
  const b = browser();
  const A = b.tab();
  const B = b.tab();
  const C = b.tab();
  for (const t of [A, B, C]) {
    t.client.start();
    await flush();
  }
  b.net.last.respond(200, OK([mail(1)], 'c1'));
  await b.clock.tick(500);
  const held = b.net.last;
  assert.equal(b.net.count, 2);

  A.win.dispatchEvent(pagehide(false)); // the leading tab closes
  await flush();
  assert.equal(held.aborted, true);
  assert.equal(B.client.role, 'leader', 'first waiter leads, no time passed');
  assert.equal(C.client.role, 'follower');
  assert.equal(b.net.count, 3);
  assert.equal(b.net.last.params.get('cursor'), 'c1');
  assert.equal(b.net.last.params.get('timeout'), '0');

  // The server repeats message 1 (at least once): nobody sees it twice.
  b.net.last.respond(200, OK([mail(1), mail(2)], 'c2'));
  await flush();
  assert.deepEqual(B.ev.mail.map((m) => m.id), ['1', '2']);
  assert.deepEqual(C.ev.mail.map((m) => m.id), ['1', '2']);
  assert.deepEqual(A.ev.mail.map((m) => m.id), ['1'], 'the closed tab hears nothing more');
});

test('Web Locks: stop() hands over too; a back/forward-cache return rejoins as follower', async () => {
  const b = browser();
  const A = b.tab();
  const B = b.tab();
  A.client.start();
  await flush();
  B.client.start();
  await flush();
  A.win.dispatchEvent(pagehide(true));
  await flush();
  assert.equal(B.client.role, 'leader');
  A.win.dispatchEvent(pageshow(true));
  await flush();
  assert.equal(A.client.role, 'follower');
  B.client.stop();
  await flush();
  assert.equal(A.client.role, 'leader');
  assert.equal(b.net.open().length, 1);
});

test('a frozen leader steps down; on resume it follows', async () => {
  const b = browser();
  const A = b.tab();
  const B = b.tab();
  A.client.start();
  await flush();
  B.client.start();
  await flush();
  A.win.document.dispatchEvent(new Event('freeze'));
  await flush();
  assert.equal(B.client.role, 'leader');
  assert.equal(b.net.open().length, 1);
  A.win.document.dispatchEvent(new Event('resume'));
  await flush();
  assert.equal(A.client.role, 'follower');
  assert.equal(b.net.open().length, 1);
  A.client.stop();
  await flush();
  A.win.dispatchEvent(pageshow(true));
  await flush();
  assert.equal(A.client.state, 'stopped', 'events after stop() are ignored');
  assert.equal(b.net.open().length, 1);
});

test('tabs with different sids poll separately', async () => {
  const b = browser();
  const A = b.tab();
  const B = b.tab({ sid: 'SID-B' });
  A.client.start();
  B.client.start();
  await flush();
  assert.equal(b.net.count, 2);
  assert.equal(A.client.role, 'leader');
  assert.equal(B.client.role, 'leader');
  assert.deepEqual(b.net.calls.map((c) => c.params.get('sid')).sort(), ['SID-A', 'SID-B']);
});

test('errors reach followers; 401 expires every tab and nobody polls again', async () => {
  const b = browser();
  const A = b.tab();
  const B = b.tab();
  const C = b.tab();
  for (const t of [A, B, C]) {
    t.client.start();
    await flush();
  }
  b.net.last.respond(503, { c: 0, msg: [], errorCode: 'UNAVAILABLE' }, { 'Retry-After': '5' });
  await flush();
  assert.equal(B.ev.error.length, 1);
  assert.equal(B.ev.error[0].errorCode, 'UNAVAILABLE');
  assert.equal(B.client.state, 'backoff');
  assert.equal(B.client.stateDetail.delayMs, 5000);

  await b.clock.tick(5000);
  b.net.last.respond(401, { c: 0, msg: [], errorCode: 'SESSION_INVALID' });
  await flush();
  for (const t of [A, B, C]) {
    assert.equal(t.ev.sessionExpired.length, 1);
    assert.equal(t.client.state, 'expired');
  }
  const count = b.net.count;
  await b.clock.tick(600_000);
  assert.equal(b.net.count, count, 'no tab took over with the dead session');
});

test('fallback without Web Locks: one leader elected over BroadcastChannel', async () => {
  const b = browser({ locks: false });
  const A = b.tab();
  const B = b.tab();
  A.client.start();
  await b.clock.tick(200);
  assert.equal(A.client.role, 'leader');
  assert.equal(b.net.count, 1);
  B.client.start();
  await b.clock.tick(1000);
  assert.equal(B.client.role, 'follower');
  assert.equal(b.net.count, 1);
  b.net.last.respond(200, OK([mail(1)], 'c1'));
  await flush();
  assert.deepEqual(B.ev.mail.map((m) => m.id), ['1']);
  await b.clock.tick(10_000);
  assert.equal(B.client.role, 'follower', 'heartbeats keep the follower quiet');
  assert.equal(b.net.open().length, 1);
});

test('fallback: a leader leaving says bye and a follower takes over at once', async () => {
  const b = browser({ locks: false });
  const A = b.tab();
  const B = b.tab();
  A.client.start();
  await b.clock.tick(200);
  B.client.start();
  await b.clock.tick(200);
  b.net.last.respond(200, OK([], 'c1'));
  await b.clock.tick(500);
  A.client.stop();
  await b.clock.tick(100);
  assert.equal(B.client.role, 'leader');
  assert.equal(b.net.last.params.get('cursor'), 'c1');
  assert.equal(b.net.open().length, 1);
});

test('fallback: a crashed leader is replaced within ~2 s', async () => {
  const b = browser({ locks: false });
  const A = b.tab();
  const B = b.tab();
  A.client.start();
  await b.clock.tick(200);
  B.client.start();
  await b.clock.tick(1234);
  assert.equal(B.client.role, 'follower');
  const countBefore = b.net.count;
  b.hub.instances.find((c) => !c.closed && b.hub.instances.indexOf(c) === 0).muted = true; // A goes silent
  await b.clock.tick(1000);
  assert.equal(B.client.role, 'follower', 'not before the timeout');
  await b.clock.tick(1000);
  assert.equal(B.client.role, 'leader', 'within 2 s');
  assert.equal(b.net.count, countBefore + 1);
});

test('fallback: two tabs that both claim settle on one leader (the older id)', async () => {
  const b = browser({ locks: false });
  const A = b.tab();
  const B = b.tab();
  A.client.start();
  B.client.start();
  b.hub.holding = true; // neither hears the other in time: both claim
  await b.clock.tick(200);
  assert.equal(A.client.role, 'leader');
  assert.equal(B.client.role, 'leader');
  assert.equal(b.net.open().length, 2);
  b.hub.release();
  await b.clock.tick(600);
  const roles = [A.client.role, B.client.role].sort();
  assert.deepEqual(roles, ['follower', 'leader']);
  assert.equal(b.net.open().length, 1, 'the loser aborted its poll');
});

test('shareTabs: false polls in every tab', async () => {
  const b = browser();
  const A = b.tab({ shareTabs: false });
  const B = b.tab({ shareTabs: false });
  A.client.start();
  B.client.start();
  await flush();
  assert.equal(b.net.count, 2);
});
