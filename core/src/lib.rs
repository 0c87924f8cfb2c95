//! sticky-cluster: a sticky-session connection router. The master hashes each client address the way the
//! npm `sticky-cluster` module does and hands the accepted socket itself to the worker with that index.
//!
//! - [`master::run`] runs a cluster (listen, route, supervise, shut down);
//! - [`Worker`] is the worker side (`from_env`, `ready`, `accept`);
//! - [`hash`] is the routing contract, [`protocol`] the channel between the two;
//! - [`ready`] is the binary's `--ready-fd` lines, the contract for programs that drive a master.

pub mod activation;
pub mod attach;
pub mod client_address;
pub mod closer;
pub mod config;
pub mod error;
pub mod hash;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod protocol;
pub mod ready;
/// Kernel routing: the `SO_REUSEPORT` group and the classic BPF program that computes the routing hash.
pub mod reuseport;
pub mod signals;
pub mod supervisor;
pub mod upgrade;
pub mod worker;

pub use config::{Config, WorkerSource};
pub use error::{Error, Result};
pub use worker::{Connection, Worker};
