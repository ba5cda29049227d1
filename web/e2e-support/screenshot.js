// e2e-support/screenshot.js — takes the demo page's screenshots for the docs.
//
//   cargo build && cd web && node e2e-support/screenshot.js [OUT_DIR]
//
// Starts the real server, opens the demo inbox in headless Chromium at desktop
// width and at 375 px (a phone), sends a few mails through the internal API,
// and writes OUT_DIR/demo.png and OUT_DIR/demo-phone.png (default: docs/ at
// the repo root). Everything on the pictures is what the page itself shows.

import { join, resolve } from 'node:path';
import { PnsServer, REPO_ROOT, sleep } from './server.js';
import { launch, openInbox, mailShown } from './browser.js';

const outDir = resolve(process.argv[2] ?? join(REPO_ROOT, 'docs'));

// Oldest first: the page lists the newest on top.
const MAILS = [
  { from: 'Priya Natarajan <priya@example.in>', subject: 'Lunch on Thursday?', snippet: 'There is a new dosa place two streets from the office. Shall we try it at 12:30?' },
  { from: 'Kenji Sato <kenji.sato@example.jp>', subject: 'Re: Flight to Tokyo', snippet: 'Your seat is confirmed: 34A, leaving at 10:40 from Terminal 2. I will pick you up at Haneda.' },
  { from: 'Build server <ci@example.com>', subject: 'main: all 212 checks passed', snippet: 'Pipeline #4821 finished in 6 min 12 s. No new warnings.' },
  { from: '"Zoë Ångström" <zoe@example.se>', subject: 'Fika på fredag? ☕', snippet: 'Hej! Vi ses kl. 15 på Café Ågatan, jag bjuder på kanelbullar.' },
  { from: 'Alice Martin <alice.martin@example.org>', subject: 'Quarterly report: final numbers', snippet: 'Hi all, the Q3 figures are in: revenue is up 12 % on last quarter. Details in the attached sheet.' },
];
const READ = 2; // the two oldest are shown as read

const server = await PnsServer.start();
const browser = await launch();
try {
  const views = [
    { file: 'demo.png', options: { viewport: { width: 1100, height: 640 } } },
    { file: 'demo-phone.png', options: { viewport: { width: 375, height: 720 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true } },
  ];
  const pages = [];
  for (const v of views) {
    // Light scheme and no animation, so the picture is the settled page.
    const context = await browser.newContext({ ...v.options, colorScheme: 'light', reducedMotion: 'reduce' });
    const page = await context.newPage();
    await openInbox(page, server.url);
    pages.push({ ...v, page });
  }
  await server.waitForStats((s) => s.pollsHeld === pages.length, 'every page to hold a poll');

  const ids = [];
  for (const mail of MAILS) {
    ids.push(await server.mail(mail));
    await sleep(250);
  }
  for (const { file, page } of pages) {
    for (const id of ids) await mailShown(page, id, 5_000);
    for (const id of ids.slice(0, READ)) await page.locator(`#mail-list li.mail[data-id="${id}"]`).click();
    await page.mouse.move(0, 0); // no hover highlight
    await page.locator(':focus').evaluate((e) => e.blur()).catch(() => {});
    const path = join(outDir, file);
    await page.screenshot({ path });
    console.log(`wrote ${path}`);
  }
} finally {
  await browser.close();
  await server.dispose();
}
