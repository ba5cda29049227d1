// The demo inbox in headless Chromium against the real server: a notify shows
// up in the open page at once, with its sender, subject and snippet, and the
// unread badge counts it.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { PnsServer } from '../e2e-support/server.js';
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

test('a notified mail appears in the open inbox within 2 s and the badge counts it', { timeout: 60_000 }, async () => {
  const page = await browser.newPage();
  const w = watch(page);
  await openInbox(page, server.url);
  assert.equal(await page.locator('#user').textContent(), 'demo@example.com');
  assert.equal(await unread(page), 0);
  assert.ok(await page.locator('#empty').isVisible(), 'the empty-inbox hint shows before any mail');
  // The page's poll is held, so the mail travels the wake-up path.
  await server.waitForStats((s) => s.pollsHeld === 1, 'the page to hold a poll');

  const first = await server.mail({
    from: 'Alice Martin <alice@example.org>',
    subject: 'Quarterly report',
    snippet: 'Hi, the numbers for Q3 are in the attached sheet.',
  });
  await mailShown(page, first, 2_000);
  assert.deepEqual(await mails(page), [
    { id: first, from: 'Alice Martin', subject: 'Quarterly report', snippet: 'Hi, the numbers for Q3 are in the attached sheet.', unread: true },
  ]);
  assert.equal(await unread(page), 1);
  assert.equal(await page.title(), '(1) PNS demo');
  assert.ok(await page.locator('#empty').isHidden(), 'the empty-inbox hint is gone');

  const second = await server.mail({
    from: '"Zoë Ångström" <zoe@example.se>',
    subject: 'Grüße aus Malmö — fika på fredag? ☕',
    snippet: 'Hej! Vi ses kl. 15 på Café Ågatan.',
  });
  await mailShown(page, second, 2_000);
  const list = await mails(page);
  assert.deepEqual(list.map((m) => m.id), [second, first], 'newest mail on top, each once');
  assert.deepEqual(list[0], {
    id: second,
    from: 'Zoë Ångström',
    subject: 'Grüße aus Malmö — fika på fredag? ☕',
    snippet: 'Hej! Vi ses kl. 15 på Café Ågatan.',
    unread: true,
  });
  assert.equal(await unread(page), 2);

  // Opening a mail marks it read.
  await page.locator(`#mail-list li.mail[data-id="${first}"]`).click();
  assert.equal(await unread(page), 1);
  assert.equal(await page.title(), '(1) PNS demo');

  // Markup in mail data is shown as text, never run.
  const html = await server.mail({ from: 'Mallory <m@example.net>', subject: '<img src=x onerror="window.__owned=1">', snippet: '<b>bold?</b>' });
  await mailShown(page, html, 2_000);
  const top = (await mails(page))[0];
  assert.equal(top.subject, '<img src=x onerror="window.__owned=1">');
  assert.equal(top.snippet, '<b>bold?</b>');
  assert.equal(await page.evaluate(() => window.__owned), undefined);
  assert.equal(await page.locator('#mail-list img, #mail-list b').count(), 0);

  assert.equal(await page.locator('#state').getAttribute('data-state'), 'connected');
  assert.deepEqual(w.errors, []);
  await page.close();
});
