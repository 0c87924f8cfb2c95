//! SIGHUP: apply a new configuration, restarting workers one at a time when their command or
//! environment changed.

use nix::sys::signal::Signal;
use tracing::{info, warn};

use crate::config::{Config, WorkerSource};
use crate::supervisor::signal_worker;

use super::*;

impl Master {
    /// Applies what can change while running; workers whose command or environment changed are
    /// restarted one at a time, each successor ready before the next index stops.
    pub(super) fn reload(&mut self, new: Config) {
        let old = &self.config;
        if (new.port, &new.host, new.concurrency) != (old.port, &old.host, old.concurrency) {
            warn!(
                "reload: port, host and concurrency changes need a restart; keeping {}:{} with {} workers",
                old.host, old.port, old.concurrency
            );
        }
        if (new.routing, new.backlog) != (old.routing, old.backlog) {
            warn!("reload: routing and backlog changes need a restart (the listeners stay as they are)");
        }
        if (new.debug, &new.prefix) != (old.debug, &old.prefix) {
            warn!("reload: debug and prefix changes need a restart");
        }
        let workers_changed = match (&new.workers, &old.workers) {
            (WorkerSource::Spawn { .. }, WorkerSource::Spawn { .. }) => {
                new.workers != old.workers || new.env != old.env
            }
            (WorkerSource::Attach(new_attach), WorkerSource::Attach(old_attach)) => {
                if (&new_attach.socket, new_attach.mode) != (&old_attach.socket, old_attach.mode) {
                    warn!("reload: attach socket and mode changes need a restart");
                }
                false
            }
            _ => {
                warn!("reload: switching between spawn and attach mode needs a restart");
                false
            }
        };
        // allowUids apply at once: the next worker that dials is checked against the new list.
        let mut kept_workers = if workers_changed { new.workers.clone() } else { old.workers.clone() };
        if let (WorkerSource::Attach(kept), WorkerSource::Attach(fresh)) = (&mut kept_workers, &new.workers) {
            if kept.allow_uids != fresh.allow_uids {
                info!("reload: allowUids is now {:?}", fresh.allow_uids);
                kept.allow_uids = fresh.allow_uids.clone();
            }
        }
        let kept = Config {
            port: old.port,
            host: old.host.clone(),
            concurrency: old.concurrency,
            debug: old.debug,
            prefix: old.prefix.clone(),
            routing: old.routing,
            backlog: old.backlog,
            workers: kept_workers,
            env: if workers_changed { new.env.clone() } else { old.env.clone() },
            ..new
        };
        self.config = kept;
        // clientAddress, trustedProxies and headerWait apply to connections accepted from now on.
        self.header_wait.reconfigure(&self.config);
        if workers_changed {
            info!("reload: restarting {} workers one at a time", self.config.concurrency);
            self.restarts_pending = (0..self.config.concurrency).collect();
            if self.restarting.is_none() {
                self.restart_next();
            }
        } else {
            info!("reload: applied (no worker restart needed)");
        }
    }

    /// Asks the next worker of a rolling restart to stop; its successor starts when it exits.
    pub(super) fn restart_next(&mut self) {
        let deadline_ms = self.config.hard_shutdown_delay.as_millis().min(u64::MAX as u128) as u64;
        while let Some(index) = self.restarts_pending.pop_front() {
            let slot = &mut self.slots[index as usize];
            if !slot.alive {
                // Down and waiting for its revival, which uses the new configuration anyway.
                continue;
            }
            slot.retiring = true;
            // New connections for this index queue for the successor instead of reaching a draining worker.
            slot.state = SlotState::Down;
            // What waits for room in its channel stays queued for the successor.
            if slot.channel.is_some() {
                slot.pending_shutdown = Some(PendingShutdown { deadline_ms, terminate: true });
            } else {
                signal_worker(slot.pid, Signal::SIGTERM);
            }
            let (events, generation, delay) = (self.events.clone(), slot.generation, self.config.hard_shutdown_delay);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = events.send(Event::RetireDeadline { index, generation });
            });
            self.restarting = Some(index);
            self.flush(index);
            return;
        }
        info!("reload: every worker runs the new configuration");
    }
}
