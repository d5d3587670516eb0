//! vhdkit's integration tests, as one test binary: the modules share one
//! build of the helpers and one link step (seven binaries took most of the
//! test build's time). Run a part with `cargo test --test it MODULE::`.

// The declared MSRV (1.88) has `is_multiple_of`; older tests use `%`.
#![allow(clippy::manual_is_multiple_of)]

mod common;
#[path = "../../examples/make_testdata.rs"]
#[allow(dead_code)]
mod make_testdata;

#[cfg(feature = "cli")]
mod api;
#[cfg(all(feature = "azure", feature = "cli"))]
mod azure;
mod cli;
mod convert;
mod corpus;
mod create;
mod durability;
mod errors;
mod formats;
mod hostile;
mod ops;
mod resolver;
// FIFOs, device nodes, loop devices and /proc: Linux.
#[cfg(target_os = "linux")]
mod security;
mod structures;
mod testdata;
mod vhdx;
