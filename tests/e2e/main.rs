//! End-to-end tests: each starts the real `pns` binary and talks HTTP to it.

mod support;

mod cli;
mod cluster;
mod delivery;
mod dovecot;
mod http1;
mod internal_api;
mod lifecycle;
mod maildir;
mod ops;
mod sessions;
mod throughput;
