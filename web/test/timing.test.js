// Pure timing rules: planNext, backoffDelay, parseRetryAfter, readOutcome.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TIMING, backoffDelay, parseRetryAfter, planNext, readOutcome } from '../pns-client.js';

const json = (status, body, headers = {}) =>
  new Response(typeof body === 'string' ? body : JSON.stringify(body), { status, headers });

test('contract constants', () => {
  assert.equal(TIMING.okDelayMs, 500);
  assert.equal(TIMING.serverErrorDelayMs, 120_000);
  assert.equal(TIMING.backoffBaseMs, 500);
  assert.equal(TIMING.backoffMaxMs, 120_000);
  assert.equal(TIMING.timeoutExtraSecs, 15);
});

test('backoffDelay: full jitter in [0, min(120000, 500 * 2^attempt))', () => {
  const half = () => 0.5;
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 40].map((a) => backoffDelay(a, half)),
    [250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000],
  );
  const top = () => 0.9999999;
  assert.equal(backoffDelay(0, top), 499);
  assert.equal(backoffDelay(7, top), 63999);
  assert.equal(backoffDelay(8, top), 119999); // 500 * 2^8 = 128000, capped
  assert.equal(backoffDelay(1000, top), 119999); // no overflow to Infinity/NaN
  assert.equal(backoffDelay(3, () => 0), 0);
});

test('planNext: 500 ms after success, at once with more, reset of the backoff', () => {
  assert.deepEqual(planNext({ kind: 'ok', body: { msg: [] } }, 5), { delayMs: 500, attempt: 0 });
  assert.deepEqual(planNext({ kind: 'ok', body: { msg: [], more: true } }, 0), { delayMs: 0, attempt: 0 });
  assert.deepEqual(planNext({ kind: 'ok', body: { msg: [], more: 'yes' } }, 0), { delayMs: 500, attempt: 0 });
});

test('planNext: 120 s after a server error unless Retry-After', () => {
  assert.deepEqual(planNext({ kind: 'server', retryAfterMs: null }, 2), { delayMs: 120_000, attempt: 2 });
  assert.deepEqual(planNext({ kind: 'server', retryAfterMs: 7000 }, 0), { delayMs: 7000, attempt: 0 });
  assert.deepEqual(planNext({ kind: 'server', retryAfterMs: 300_000 }, 0), { delayMs: 300_000, attempt: 0 });
});

test('planNext: network failures grow the attempt; 401 never polls again', () => {
  assert.deepEqual(planNext({ kind: 'network' }, 0, () => 0.5), { delayMs: 250, attempt: 1 });
  assert.deepEqual(planNext({ kind: 'network' }, 3, () => 0.5), { delayMs: 2000, attempt: 4 });
  assert.equal(planNext({ kind: 'expired' }, 3).delayMs, null);
  assert.throws(() => planNext({ kind: 'nope' }, 0));
});

test('parseRetryAfter: seconds, HTTP date, junk, clamps', () => {
  const now = Date.parse('2025-01-01T00:00:00Z');
  assert.equal(parseRetryAfter('7', now), 7000);
  assert.equal(parseRetryAfter(' 120 ', now), 120_000);
  assert.equal(parseRetryAfter('1.5', now), 1500);
  assert.equal(parseRetryAfter('Wed, 01 Jan 2025 00:00:30 GMT', now), 30_000);
  assert.equal(parseRetryAfter('0', now), 500); // never a tight loop
  assert.equal(parseRetryAfter('Tue, 31 Dec 2024 00:00:00 GMT', now), 500); // in the past
  assert.equal(parseRetryAfter('999999', now), 3_600_000);
  assert.equal(parseRetryAfter(null, now), null);
  assert.equal(parseRetryAfter('', now), null);
  assert.equal(parseRetryAfter('soon', now), null);
  assert.equal(parseRetryAfter('-5', now), null);
});

test('readOutcome classifies answers', async () => {
  const ok = await readOutcome(json(200, { c: 1, msg: [{ id: '1' }], cursor: 'x', more: true }));
  assert.equal(ok.kind, 'ok');
  assert.deepEqual(ok.body.msg, [{ id: '1' }]);
  assert.equal(ok.body.cursor, 'x');
  assert.equal(ok.body.more, true);

  assert.equal((await readOutcome(json(200, { c: 0 }))).body.msg.length, 0);

  const errBody = await readOutcome(json(200, { c: 0, msg: [], errorCode: 'UNAVAILABLE', error: 'draining' }));
  assert.equal(errBody.kind, 'server');
  assert.equal(errBody.errorCode, 'UNAVAILABLE');

  const s503 = await readOutcome(json(503, { c: 0, msg: [], errorCode: 'UNAVAILABLE' }, { 'Retry-After': '9' }));
  assert.deepEqual([s503.kind, s503.status, s503.retryAfterMs], ['server', 503, 9000]);

  const bare502 = await readOutcome(json(502, '<html>Bad gateway</html>'));
  assert.deepEqual([bare502.kind, bare502.status, bare502.retryAfterMs], ['server', 502, null]);

  const r429 = await readOutcome(json(429, { errorCode: 'RATE_LIMITED' }, { 'Retry-After': '3' }));
  assert.deepEqual([r429.kind, r429.retryAfterMs], ['server', 3000]);

  const expired = await readOutcome(json(401, { c: 0, msg: [], errorCode: 'SESSION_INVALID', error: 'revoked' }));
  assert.deepEqual([expired.kind, expired.errorCode, expired.reason], ['expired', 'SESSION_INVALID', 'revoked']);

  const portal = await readOutcome(json(200, '<html>Sign in to Wi-Fi</html>'));
  assert.equal(portal.kind, 'server');

  const broken = { status: 200, ok: true, headers: new Headers(), text: () => Promise.reject(new TypeError('network')) };
  assert.equal((await readOutcome(broken)).kind, 'network');
});
