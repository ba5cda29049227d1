// Revoking the session signs the open inbox out: the page says so, stops
// polling, and can start a new session.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { PnsServer, answersTotal, sleep } from '../e2e-support/server.js';
import { launch, watch, openInbox, mails, mailShown } from '../e2e-support/browser.js';

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

test('a revoked session shows the page signed out and ends its polling', { timeout: 60_000 }, async () => {
  const page = await browser.newPage();
  const w = watch(page);
  await openInbox(page, server.url);
  await server.waitForStats((s) => s.pollsHeld === 1, 'the page to hold a poll');
  const before = await server.mail({ from: 'Alice <alice@example.org>', subject: 'Still signed in', snippet: 'x' });
  await mailShown(page, before, 2_000);
  await server.waitForStats((s) => s.pollsHeld === 1, 'the page to hold a poll again');

  assert.deepEqual(await server.revokeUser('demo@example.com'), { revoked: true });
  await page.locator('#state[data-state="signed-out"]').waitFor({ timeout: 5_000 });
  assert.equal(await page.locator('#state .label').textContent(), 'signed out');
  assert.ok(await page.locator('#signed-out').isVisible(), 'the signed-out notice shows');
  assert.ok(await page.locator('#inbox').isHidden(), 'the inbox is hidden');
  assert.equal(await page.evaluate(() => window.pnsClient.state), 'expired');

  // No poll reaches the server any more, and the page sends none.
  const pollsAtSignOut = w.polls.length;
  const stats = await server.stats();
  assert.equal(stats.pollsHeld, 0);
  await sleep(3_000);
  const later = await server.stats();
  assert.equal(later.pollsHeld, 0, 'no poll is held for the revoked session');
  assert.equal(answersTotal(later), answersTotal(stats), `no poll was answered after the sign-out: ${JSON.stringify([stats.pollAnswers, later.pollAnswers])}`);
  assert.equal(w.polls.length, pollsAtSignOut, `the page sent no poll after the sign-out: ${w.polls.length - pollsAtSignOut} more`);

  // "Start a new session" gets a fresh session that receives mail again.
  await page.locator('#sign-in-again').click();
  await page.locator('#inbox').waitFor({ state: 'visible', timeout: 10_000 });
  await page.locator('#state[data-state="connected"]').waitFor({ timeout: 10_000 });
  await server.waitForStats((s) => s.pollsHeld === 1, 'the new session to hold a poll');
  const after = await server.mail({ from: 'Bob <bob@example.org>', subject: 'Welcome back', snippet: 'y' });
  await mailShown(page, after, 2_000);
  assert.deepEqual((await mails(page)).map((m) => m.id), [after]);
  assert.deepEqual(w.errors, []);
  await page.close();
});
