//! PNS: a push notification service for webmail.
//!
//! Browsers long-poll `GET /pns/poll`; the server holds each request until a
//! message for that user exists or the hold ends. Messages come in over the
//! internal HTTP API, from Dovecot's push_notification driver and from a
//! Maildir watcher. See
//! `SPEC.md` for the contract and `docs/` for the guides.
//!
//! # Layout
//!
//! A message travels down this list:
//!
//! - [`http`]: the two HTTP surfaces; thin handlers, one error type.
//! - [`wire`]: the request and response JSON, side by side with SPEC.
//! - [`ingest`]: where every way in ends: store, then wake. Beside it the
//!   Maildir watcher (`ingest::maildir`) and raw mail parsing (`ingest::mime`).
//! - [`store`]: the message store trait, with SQLite (default) and
//!   PostgreSQL (several nodes) behind it.
//! - [`scheduler`]: makes delayed messages visible when due.
//! - [`hub`]: parks held polls and wakes them.
//! - [`cluster`]: applies what other nodes sharing the store did (wakes,
//!   revocations, poll starts) to this node.
//! - [`poll`]: answers a poll from the store and the hub.
//! - [`session`]: validates sids (JWT; HS256 by its own lean check) and
//!   keeps revocations.
//! - [`opaque`]: webmail sids that are not JWTs, registered over the API.
//!
//! Around them:
//!
//! - [`app`]: the shared state and `pns serve`'s start and stop.
//! - [`server`]: the accept loop with limits and graceful drain, the public
//!   listener's own HTTP/1 front, and each listener's direct route, offered
//!   every request before the router (`http::DirectPoll`,
//!   `http::DirectNotify`).
//! - [`closed_loop`]: whether a request's sender waits for each answer
//!   before it sends again, which the SQLite store's log sync heeds.
//! - [`address`]: the client address, through trusted reverse proxies.
//! - [`limits`]: per-session and per-address poll rate limits.
//! - [`registry`]: who polls this node, for the session list and metrics.
//! - [`config`]: settings from file, environment and flags; generated secrets.
//! - [`retention`]: the background purge.
//! - [`metrics`]: counters, Prometheus text.
//! - [`shutdown`]: the token every task watches.
//! - [`runs_to_end`]: work that goes on when the client that began it goes
//!   away (a notify's ingest, a revocation).
//! - [`threads`]: the jobs that run beside the main runtime, and why.
//! - [`cli`]: the `pns` command line.

pub mod address;
pub mod app;
pub mod cli;
pub mod clock;
pub mod closed_loop;
pub mod cluster;
pub mod config;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod opaque;
pub mod poll;
pub mod registry;
pub mod retention;
pub mod runs_to_end;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod threads;
pub mod wire;
