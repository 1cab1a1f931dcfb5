//! Integration tests, all in one binary (ripgrep's layout): real hyper origins on 127.0.0.x at
//! port 0, parasol in process or as a child process, real files in temp dirs.

// They time real processes and sockets (children, origins, viewers): wall-clock by design,
// where parasol's own code uses tokio's clock (`.clippy.toml`).
#![allow(clippy::disallowed_types)]

mod admin;
mod cli;
mod compat;
mod dns;
mod durability;
mod feeds;
mod hostile;
mod lemmy;
mod media;
mod moderation;
mod origins;
mod pool;
mod privacy;
mod prometheus;
mod proxy;
mod recipes;
mod shared;
mod stream;
mod tls;
mod traces;
mod upstream;
mod util;
mod variants;
