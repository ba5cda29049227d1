//! End-to-end tests: each starts the real `pns` binary and talks HTTP to it.

mod support;

mod cli;
mod delivery;
mod internal_api;
mod lifecycle;
mod ops;
mod sessions;
