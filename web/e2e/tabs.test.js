// Two tabs of one browser on the same session share one held poll; both show
// the mail; when the leading tab closes, the other takes over.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { PnsServer, answersTotal, sleep } from '../e2e-support/server.js';
import { launch, watch, openInbox, mails, unread, mailShown } from '../e2e-support/browser.js';

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

const role = (page) => page.locator('#role').getAttribute('data-role');
const sid = (page) => page.evaluate(() => JSON.parse(localStorage.getItem('pns-demo-session')).sid);

test('two tabs hold one poll between them, both show the mail, and the other tab takes over', { timeout: 60_000 }, async () => {
  const context = await browser.newContext();
  const first = await context.newPage();
  const second = await context.newPage();
  const w1 = watch(first);
  const w2 = watch(second);
  await openInbox(first, server.url);
  await openInbox(second, server.url);
  assert.equal(await sid(first), await sid(second), 'both tabs use the same session');

  await first.locator('#role[data-role="leader"]').waitFor({ timeout: 5_000 });
  await second.locator('#role[data-role="follower"]').waitFor({ timeout: 5_000 });
  assert.match(await second.locator('#role').textContent(), /Another tab holds the connection/);

  // One poll held for both tabs. Had both tabs polled the same session, each
  // new poll would release the other's (an answer counted as superseded),
  // and the answer counters would keep moving.
  const held = await server.waitForStats((s) => s.pollsHeld === 1, 'one held poll');
  const secondPolls = w2.polls.length;
  await sleep(1_500);
  const still = await server.stats();
  assert.equal(still.pollsHeld, 1);
  assert.equal(still.pollAnswers.superseded, 0, 'no poll pushed another out');
  assert.equal(answersTotal(still), answersTotal(held), 'the one held poll is all the traffic');
  assert.equal(w2.polls.length, 0, 'the follower tab sends no polls');
  assert.equal(secondPolls, 0);

  const m1 = await server.mail({ from: 'Carol <carol@example.org>', subject: 'For both tabs', snippet: 'seen twice, once per tab' });
  await Promise.all([mailShown(first, m1, 2_000), mailShown(second, m1, 2_000)]);
  for (const page of [first, second]) {
    assert.deepEqual((await mails(page)).map((m) => m.subject), ['For both tabs']);
    assert.equal(await unread(page), 1);
  }

  // Closing the leading tab hands the poll to the other one.
  const leader = (await role(first)) === 'leader' ? first : second;
  const other = leader === first ? second : first;
  const otherWatch = other === first ? w1 : w2;
  await leader.close();
  await other.locator('#role[data-role="leader"]').waitFor({ timeout: 5_000 });
  await other.locator('#state[data-state="connected"]').waitFor({ timeout: 5_000 });
  await server.waitForStats((s) => s.pollsHeld === 1, 'the new leader to hold a poll');
  assert.ok(otherWatch.polls.length > 0, 'the remaining tab polls now');

  const m2 = await server.mail({ from: 'Dave <dave@example.org>', subject: 'After the handover', snippet: 'z' });
  await mailShown(other, m2, 2_000);
  assert.deepEqual((await mails(other)).map((m) => m.id), [m2, m1], 'each mail once');
  assert.equal(await unread(other), 2);
  assert.deepEqual([...w1.errors, ...w2.errors], []);
  await context.close();
});
