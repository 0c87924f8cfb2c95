//! napi binding of sticky-cluster: the master (bind, run on its own thread, stop) for the Node primary
//! process, and the worker side (ready, accept thread handing fds to JS) for each re-launched worker.
//!
//! `index.js` in this folder turns these functions into the npm `sticky-cluster` API; logic stays in core.

mod master;
mod worker;

pub use master::{check_options, start_cluster, Cluster, ClusterEnd, ClusterOptions, ListenFailure, StartResult};
pub use worker::{open_worker, RoutedConnection, Taken, WorkerEnd, WorkerHandle};
