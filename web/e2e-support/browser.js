// e2e-support/browser.js — headless Chromium (the system's) and the demo page's
// view as a user sees it.

import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

// Without the background-networking flags Chromium's own connections (updates,
// sync, field trials) fail on a closed network and can stall page loads.
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export async function launch() {
  if (!existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM} (set CHROMIUM, or apt-get install chromium)`);
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
}

/**
 * Watches a page for script errors and for its poll requests.
 * `errors`: uncaught exceptions and console errors (a refused poll while the
 * server is down logs a console error, so those are kept apart in `netErrors`).
 */
export function watch(page) {
  const w = { errors: [], netErrors: [], polls: [] };
  page.on('pageerror', (e) => w.errors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    if (/ERR_CONNECTION_|Failed to load resource|net::/.test(m.text())) w.netErrors.push(m.text());
    else w.errors.push(`console: ${m.text()}`);
  });
  page.on('request', (r) => {
    if (new URL(r.url()).pathname === '/pns/poll') w.polls.push(r.url());
  });
  return w;
}

/** Opens the demo inbox and waits until it shows it is connected. */
export async function openInbox(page, url) {
  await page.goto(url);
  await page.locator('#inbox').waitFor({ state: 'visible', timeout: 10_000 });
  await page.locator('#state[data-state="connected"]').waitFor({ timeout: 10_000 });
}

/** The mails the page lists, top to bottom, as the user reads them. */
export function mails(page) {
  return page.$$eval('#mail-list li.mail', (items) =>
    items.map((li) => ({
      id: li.dataset.id,
      from: li.querySelector('.from').textContent,
      subject: li.querySelector('.subject').textContent,
      snippet: li.querySelector('.snippet').textContent,
      unread: li.classList.contains('unread'),
    })),
  );
}

/** The number in the unread badge. */
export async function unread(page) {
  return Number(await page.locator('#unread').textContent());
}

/** Waits until the mail with `id` is listed. */
export function mailShown(page, id, timeout) {
  return page.locator(`#mail-list li.mail[data-id="${id}"]`).waitFor({ timeout });
}

/**
 * Records every client state change of the page in `window.__pnsStates`
 * (the page's own client: `window.pnsClient`).
 */
export async function recordStates(page) {
  await page.waitForFunction(() => window.pnsClient);
  await page.evaluate(() => {
    window.__pnsStates = [];
    window.pnsClient.on('state', (state, detail) => window.__pnsStates.push({ state, reason: detail.reason ?? null, role: detail.role }));
  });
}

export function recordedStates(page) {
  return page.evaluate(() => window.__pnsStates.slice());
}
