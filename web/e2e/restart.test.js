// The server restarts while the inbox is open: the page notices the outage,
// reconnects by itself, and every mail shows exactly once.
//
// What the page sees: on SIGTERM the server answers the held poll with c=0 and
// closes its listener, so the next poll (500 ms later) is refused: a network
// failure, retried after a short jittered backoff. On SIGKILL the held poll
// itself fails. The server is started again only once the page shows
// "reconnecting", so the recovery always goes through the network path, and
// never through the 120 s server-error wait.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { PnsServer } from '../e2e-support/server.js';
import { launch, watch, openInbox, mails, unread, mailShown, recordStates, recordedStates } from '../e2e-support/browser.js';

let server;
let browser;

before(async () => {
  server = await PnsServer.start();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.dispose();
});

const reconnecting = (page) => page.locator('#state[data-state="reconnecting"]').waitFor({ timeout: 10_000 });
const connected = (page) => page.locator('#state[data-state="connected"]').waitFor({ timeout: 10_000 });

test('the inbox recovers from server restarts by itself and loses or repeats no mail', { timeout: 90_000 }, async () => {
  const page = await browser.newPage();
  const w = watch(page);
  await openInbox(page, server.url);
  await recordStates(page);
  const port = server.public;
  const ids = [];

  await server.waitForStats((s) => s.pollsHeld === 1, 'the page to hold a poll');
  ids.unshift(await server.mail({ from: 'Ops <ops@example.com>', subject: 'Before the restart', snippet: 'one' }));
  await mailShown(page, ids[0], 2_000);

  // 1. A graceful restart (SIGTERM drains: the held poll is answered c=0).
  await server.waitForStats((s) => s.pollsHeld === 1, 'the page to hold a poll again');
  await server.stop('SIGTERM');
  await reconnecting(page);
  await server.start();
  assert.equal(server.public, port, 'the server is back on the same address');
  await connected(page);
  ids.unshift(await server.mail({ from: 'Ops <ops@example.com>', subject: 'After a graceful restart', snippet: 'two' }));
  await mailShown(page, ids[0], 2_000);

  // 2. A crash. A mail accepted (202) right before kill -9 is shown, once,
  // whether or not the page got it before the kill; so is a mail accepted
  // right after the restart, most likely while the page still waits to retry.
  await server.waitForStats((s) => s.pollsHeld === 1, 'the page to hold a poll again');
  ids.unshift(await server.mail({ from: 'Ops <ops@example.com>', subject: 'Sent right before the crash', snippet: 'three' }));
  await server.stop('SIGKILL');
  await reconnecting(page);
  await server.start();
  assert.equal(server.public, port);
  ids.unshift(await server.mail({ from: 'Ops <ops@example.com>', subject: 'Sent while the page reconnects', snippet: 'four' }));
  await mailShown(page, ids[1], 10_000);
  await mailShown(page, ids[0], 10_000);
  await connected(page);
  ids.unshift(await server.mail({ from: 'Ops <ops@example.com>', subject: 'After the crash', snippet: 'five' }));
  await mailShown(page, ids[0], 2_000);

  // Every mail once, newest first, and the badge agrees.
  const list = await mails(page);
  assert.deepEqual(list.map((m) => m.id), ids);
  assert.deepEqual(list.map((m) => m.snippet), ['five', 'four', 'three', 'two', 'one']);
  assert.equal(await unread(page), 5);
  // Nothing more trickles in afterwards (a late duplicate would).
  await page.waitForTimeout(1_000);
  assert.deepEqual((await mails(page)).map((m) => m.id), ids);

  // The outages were network failures, retried within seconds, never a server-error wait.
  const states = await recordedStates(page);
  const backoffs = states.filter((s) => s.state === 'backoff');
  assert.ok(backoffs.length >= 2, `the page went into backoff for each outage: ${JSON.stringify(states)}`);
  assert.deepEqual([...new Set(backoffs.map((s) => s.reason))], ['network']);
  assert.equal(await page.locator('#state').getAttribute('data-state'), 'connected');
  assert.deepEqual(w.errors, []);
  await page.close();
});
