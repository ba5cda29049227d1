//! End-to-end tests: each starts the real `pns` binary and talks HTTP to it.

mod support;

mod delivery;
mod ops;
