//! sticky-cluster-bench: the hash benchmark in the npm module's format, and the handoff and stream benchmarks of
//! our master against no master, the npm peers, nginx and HAProxy, with the load generator and workers they use.

pub mod handoff;
pub mod handoff_report;
pub mod hash_bench;
pub mod hashing;
pub mod load;
pub mod master_cost;
pub mod node;
pub mod procs;
pub mod proxy;
pub mod ready;
pub mod stream;
pub mod worker;
