//! The bounds of the configuration, written once: the validation, `Config::default` and the other
//! front ends (C, Node) read them from here.

/// The fewest workers a cluster can have.
pub const MIN_CONCURRENCY: u32 = 1;
/// The most workers a cluster can have: each one is a process, a channel and a queue in the master.
pub const MAX_CONCURRENCY: u32 = 1024;
/// The longest `hardShutdownDelay` in milliseconds: Node's largest timer (2^31 - 1), so every front end
/// (the JavaScript master's `setTimeout` too) means the same thing by it.
pub const MAX_HARD_SHUTDOWN_DELAY_MS: u64 = 2_147_483_647;
