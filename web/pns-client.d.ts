// Types for pns-client.js, the PNS browser client.

/** Connection state, as reported by the 'state' event. */
export type PnsState =
  /** constructed, start() not called yet */
  | 'idle'
  /** started; no answer yet (first poll, a retry, or waiting for the leading tab) */
  | 'connecting'
  /** the last poll succeeded; a poll is held open (or follows within 500 ms) */
  | 'connected'
  /** waiting to retry after a network failure or a server error (see detail.reason) */
  | 'backoff'
  /** the server answered 401: the session is dead, nothing more is polled */
  | 'expired'
  /** stop() was called */
  | 'stopped';

/** 'leader': this tab polls for every tab of the browser; 'follower': another tab does. */
export type PnsRole = 'leader' | 'follower';

export interface PnsStateDetail {
  state: PnsState;
  role: PnsRole | null;
  /** backoff only: why */
  reason?: 'network' | 'server';
  /** backoff only: how long until the retry, ms */
  delayMs?: number;
  /** backoff only: when the retry happens (epoch ms) */
  retryAt?: number;
  /** backoff only: consecutive network failures so far */
  attempt?: number;
  /** HTTP status of the failed answer (server errors, expired) */
  status?: number;
  errorCode?: string;
}

/** `data` of a type 70 (new mail) message; fields are present where known. */
export interface MailData {
  folder?: string;
  uid?: number;
  uidValidity?: number;
  from?: string;
  subject?: string;
  snippet?: string;
  unseen?: number;
  messageId?: string;
  [key: string]: unknown;
}

export interface PnsMessage<D = Record<string, unknown>> {
  id: string;
  type: number;
  /** when the message was accepted, unix ms */
  time: number;
  data: D;
}

export type PnsMailMessage = PnsMessage<MailData> & { type: 70 };

export declare class PnsError extends Error {
  constructor(message: string, fields?: Partial<Pick<PnsError, 'kind' | 'status' | 'errorCode' | 'retryInMs' | 'cause'>>);
  name: 'PnsError';
  /** 'network' (fetch failed), 'timeout' (no answer within holdSecs + 15 s), 'server' (errorCode or non-2xx), 'expired' (401) */
  kind: 'network' | 'timeout' | 'server' | 'expired';
  status?: number;
  errorCode?: string;
  /** when the client polls again, ms */
  retryInMs?: number;
  cause?: unknown;
}

export interface PnsStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface PnsLockManager {
  request<T>(name: string, options: { ifAvailable?: boolean; signal?: AbortSignal }, callback: (lock: unknown | null) => T | Promise<T>): Promise<T>;
}

export interface PnsBroadcastChannel {
  onmessage: ((ev: { data: any }) => void) | null;
  postMessage(data: any): void;
  close(): void;
}

export interface PnsEventTarget {
  addEventListener(type: string, listener: (ev: any) => void): void;
  removeEventListener(type: string, listener: (ev: any) => void): void;
}

export interface PnsClientOptions {
  /** Base URL of the PNS server, e.g. "https://pns.example.com" (default "": same origin). Polls `{url}/pns/poll`. */
  url?: string;
  /** Session token. Without it the server looks for the pns_sid cookie. */
  sid?: string;
  /** Client tag shown in the server's session metrics. */
  comeFrom?: string;
  /** The server's hold (PNS_HOLD_SECS), whole seconds, default 30, max 110. Sent as `timeout`; the request timeout is holdSecs + 15 s. */
  holdSecs?: number;
  /** fetch credentials mode (e.g. 'include' for cookie sessions across origins). */
  credentials?: RequestCredentials;
  /** Share one poll between the tabs of this browser that use the same sid (default true). */
  shareTabs?: boolean;
  /** Lock and BroadcastChannel name (default "pns:" + a hash of the sid). */
  lockName?: string;
  /** How many message ids to remember for dedupe (default 1000). */
  seenMax?: number;

  // Injection points, defaults are the browser globals (resolved lazily).
  fetch?: typeof fetch;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: any) => void;
  now?: () => number;
  random?: () => number;
  /** Where the cursor and seen ids survive a reload (default sessionStorage; null: nowhere). */
  storage?: PnsStorage | null;
  /** Web Locks (default navigator.locks; null: use the BroadcastChannel heartbeat election). */
  locks?: PnsLockManager | null;
  /** BroadcastChannel constructor (default globalThis.BroadcastChannel; null: every tab polls). */
  BroadcastChannel?: (new (name: string) => PnsBroadcastChannel) | null;
  /** Source of pagehide/pageshow/online events (default window; null: none). */
  window?: PnsEventTarget | null;
  /** Where exceptions thrown by listeners go (default reportError or console.error). */
  reportError?: (error: unknown) => void;
  /** Tuning of the fallback election (ms). */
  election?: { heartbeatMs?: number; timeoutMs?: number; claimWaitMs?: number; byeJitterMs?: number };
}

export interface PnsClientEvents {
  /** every new message, each once, in the order the server accepted them */
  message: (message: PnsMessage) => void;
  /** new mail (type 70) only; fired right after its 'message' */
  mail: (message: PnsMailMessage) => void;
  /** a failed poll (network, timeout or server error); the client retries by itself */
  error: (error: PnsError) => void;
  /** 401: the session is dead; the client has stopped */
  sessionExpired: (error: PnsError) => void;
  /** the connection state or this tab's role changed (backoff: on every failure) */
  state: (state: PnsState, detail: PnsStateDetail) => void;
}

export type PnsEventName = keyof PnsClientEvents;

export declare class PnsClient {
  constructor(options?: PnsClientOptions);
  readonly state: PnsState;
  readonly stateDetail: PnsStateDetail;
  readonly role: PnsRole | null;
  readonly cursor: string | null;
  readonly running: boolean;
  /** Adds a listener; returns a function that removes it. Throws TypeError for an unknown event. */
  on<E extends PnsEventName>(type: E, listener: PnsClientEvents[E]): () => void;
  off<E extends PnsEventName>(type: E, listener: PnsClientEvents[E]): this;
  /** Starts polling (or following the tab that polls). Idempotent. */
  start(): this;
  /** Stops, aborts the poll in flight and lets another tab lead. Idempotent. */
  stop(): this;
}

export default PnsClient;

// Lower-level pieces, exported for tests and custom integrations.

export declare const TIMING: Readonly<{
  okDelayMs: 500;
  serverErrorDelayMs: 120000;
  backoffBaseMs: 500;
  backoffMaxMs: 120000;
  timeoutExtraSecs: 15;
  retryAfterMinMs: number;
  retryAfterMaxMs: number;
}>;
export declare const STATES: readonly PnsState[];
export declare const EVENTS: readonly PnsEventName[];
export declare const MAIL_TYPE: 70;

export type PollOutcome =
  | { kind: 'ok'; status?: number; body: { c?: number; msg: PnsMessage[]; cursor?: string; more?: boolean } }
  | { kind: 'server'; status?: number; errorCode?: string; reason?: string; retryAfterMs: number | null }
  | { kind: 'network'; error?: unknown; timeout?: boolean }
  | { kind: 'expired'; status?: number; errorCode?: string; reason?: string };

/** random(0, min(120000, 500 * 2^attempt)), floored. */
export declare function backoffDelay(attempt: number, random?: () => number): number;
/** Retry-After (seconds or HTTP date) in ms, clamped to [500 ms, 1 h]; null if absent or invalid. */
export declare function parseRetryAfter(value: string | null | undefined, now?: number): number | null;
/** When to poll next; delayMs null = never. */
export declare function planNext(outcome: PollOutcome, attempt?: number, random?: () => number): { delayMs: number | null; attempt: number };
export declare function readOutcome(res: Response, now?: number): Promise<PollOutcome>;

export interface PollLoopOptions {
  url?: string;
  sid?: string;
  comeFrom?: string;
  holdSecs?: number;
  credentials?: RequestCredentials;
  fetch?: typeof fetch;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: any) => void;
  now?: () => number;
  random?: () => number;
  cursor?: () => string | null;
  onState?: (state: PnsState, detail: Partial<PnsStateDetail>) => void;
  onAnswer?: (body: { msg: PnsMessage[]; cursor?: string; more?: boolean }) => void;
  onError?: (error: PnsError) => void;
  onExpired?: (error: PnsError) => void;
}

/** One poll loop with the contract's timing; PnsClient runs one in the leading tab. */
export declare class PollLoop {
  constructor(options: PollLoopOptions);
  readonly state: PnsState;
  readonly running: boolean;
  readonly attempt: number;
  start(): void;
  stop(): void;
  /** Ends a network-failure backoff now. */
  wake(): void;
  pollUrl(timeoutSecs: number): string;
}

export declare class WebLocksElection {
  constructor(locks: PnsLockManager, name: string, hooks: { onLead(): void; onFollow(): void; onFailed(error: unknown): void });
  start(): void;
  stop(): void;
  handle(message: unknown): void;
}

export declare class BroadcastElection {
  constructor(options: {
    id: string;
    post(message: object): void;
    setTimeout(fn: () => void, ms: number): unknown;
    clearTimeout(handle: any): void;
    now(): number;
    random(): number;
    onLead(): void;
    onFollow(): void;
    heartbeatMs?: number;
    timeoutMs?: number;
    claimWaitMs?: number;
    byeJitterMs?: number;
  });
  readonly role: PnsRole | null;
  start(): void;
  stop(): void;
  handle(message: { t: string; from?: string }): void;
}

declare global {
  // Set when the module is loaded.
  var PnsClient: typeof import('./pns-client.js').PnsClient;
}
