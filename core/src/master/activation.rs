//! Workers that never speak the channel (`worker.protocol: none`): on every tick the master looks at the
//! listener of each one that is starting (or replacing another in a reload) and takes it as ready at the
//! first sign that it accepts, as if it had said ready.

use std::time::Duration;

use tracing::{debug, info, warn};

use super::slot::Life;
use super::Master;
use crate::activation::readiness::{ReadinessProbe, Sign};
use crate::activation::WorkerProtocol;
use crate::protocol::Message;
use crate::reuseport::accept_queue;

/// A protocol-none worker alive this long without a sign is taken as ready: a server that waits in
/// `select`/`poll` shows none until clients come, and a reload must not wait for them.
pub(super) const PRESUMED_READY_AFTER: Duration = Duration::from_secs(10);

impl Master {
    /// The probe for worker `index`'s next process: `None` unless its workers never say ready.
    pub(super) fn readiness_probe(&self, index: u32) -> Option<ReadinessProbe> {
        if self.config.worker_protocol != WorkerProtocol::None {
            return None;
        }
        self.kernel_listener(index).and_then(|listener| ReadinessProbe::new(listener).ok())
    }

    /// Every tick: each protocol-none process that is starting (the index's current worker, or a reload's
    /// successor beside it) and shows it accepts is ready from now on.
    pub(super) fn judge_readiness(&mut self) {
        if self.config.worker_protocol != WorkerProtocol::None {
            return;
        }
        let Master { slots, group, .. } = self;
        let Some(group) = group.as_ref() else { return };
        let mut ready = Vec::new();
        for slot in slots.iter_mut() {
            let Some(listener) = group.listener(slot.index) else { continue };
            // A successor shares the listener with the worker it replaces: only its own processes count.
            let (process, queue_is_ours) = match &mut slot.life {
                Life::Starting(process) => (process, true),
                Life::Ready { successor: Some(successor), .. } => (successor, false),
                _ => continue,
            };
            let Some(probe) = process.readiness.as_mut() else { continue };
            let sign = probe.look(process.pid, listener, queue_is_ours);
            let presumed = sign.is_none() && process.started.elapsed() >= PRESUMED_READY_AFTER;
            if sign.is_none() && !presumed {
                continue;
            }
            process.readiness = None;
            let (index, pid) = (slot.index, process.pid);
            match sign {
                Some(sign) => debug!("worker {index} (pid {pid}) is accepting: {sign}"),
                None => info!(
                    "worker {index} (pid {pid}) is accepting, presumably: no sign within {PRESUMED_READY_AFTER:?} \
                     (a server waiting in select or poll shows none until clients come)"
                ),
            }
            if let Ok(queue) = accept_queue(listener) {
                warn_on_a_changed_backlog(index, pid, queue.limit, self.config.backlog, sign);
            }
            ready.push((index, process.generation));
        }
        for (index, generation) in ready {
            self.on_message(index, generation, Message::Ready);
        }
    }
}

/// Servers call `listen()` again on the socket they inherit, with their own backlog (uvicorn 2048,
/// hypercorn 100, gunicorn 2048), replacing ours: worth one line when they did.
fn warn_on_a_changed_backlog(index: u32, pid: u32, kernel_limit: u32, configured: u32, sign: Option<Sign>) {
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .unwrap_or(u32::MAX);
    let expected = configured.min(somaxconn);
    if kernel_limit != expected && sign.is_some() {
        warn!(
            "worker {index} (pid {pid}) listens with backlog {kernel_limit}, not backlog {expected}: it called \
             listen() again; give it the configured one (uvicorn, gunicorn, hypercorn: --backlog {{backlog}})"
        );
    }
}
