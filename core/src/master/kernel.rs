//! Kernel routing in the master: it holds the `SO_REUSEPORT` group for its whole life, gives listener i to
//! worker i (inherited or sent over the attach socket), accepts nothing itself, and reports queue depths.

use std::fmt::Write as _;
use std::os::fd::BorrowedFd;

use tracing::info;

use super::Master;
use crate::error::{Error, Result};
use crate::reuseport::{accept_queue, ReuseportGroup};

/// Checks that the group has one listener per worker and says in the log what the kernel hashes.
pub(super) fn checked(group: ReuseportGroup, concurrency: u32) -> Result<ReuseportGroup> {
    if group.concurrency() != concurrency {
        return Err(Error::Config(format!(
            "concurrency: the listener group has {} listeners for {concurrency} workers",
            group.concurrency()
        )));
    }
    info!("routing: kernel ({} instructions); {}", group.program().instructions.len(), group.text_form().describe());
    Ok(group)
}

impl Master {
    /// Worker `index`'s listener in kernel mode (`None` in handoff mode).
    pub(super) fn kernel_listener(&self, index: u32) -> Option<BorrowedFd<'_>> {
        self.group.as_ref().and_then(|group| group.listener(index))
    }

    /// `sticky_cluster_accept_queue_depth{worker="i"}`: connections the kernel completed on worker i's
    /// listener that no `accept()` has taken yet (empty in handoff mode).
    pub(super) fn accept_queue_metrics(&self) -> String {
        let Some(group) = &self.group else { return String::new() };
        let name = "sticky_cluster_accept_queue_depth";
        let mut page = format!(
            "# HELP {name} Connections waiting in a worker's kernel accept queue (routing: kernel).\n\
             # TYPE {name} gauge\n"
        );
        for index in 0..group.concurrency() {
            if let Some(Ok(queue)) = group.listener(index).map(accept_queue) {
                let _ = writeln!(page, "{name}{{worker=\"{index}\"}} {}", queue.waiting);
            }
        }
        page
    }
}
