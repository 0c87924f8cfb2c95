//! SIGHUP: apply a new configuration; when the workers' command or environment changed, replace them one
//! index at a time, each successor started and ready before the worker it replaces stops.

use std::collections::VecDeque;

use nix::sys::signal::Signal;
use tracing::{error, info, warn};

use super::slot::{Life, Retirement, Role};
use super::{after, Event, Master};
use crate::config::{Config, WorkerSource};
use crate::supervisor::signal_worker;

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
                new.workers != old.workers || new.env != old.env || new.worker_protocol != old.worker_protocol
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
        let previous = std::mem::replace(&mut self.config, kept);
        // clientAddress, trustedProxies and headerWait apply to connections accepted from now on.
        self.header_wait.reconfigure(&self.config);
        if workers_changed {
            info!("reload: restarting {} workers one at a time", self.config.concurrency);
            // A successor that cannot start takes the workers back to this.
            if self.before_reload.is_none() {
                self.before_reload = Some(Box::new(previous));
            }
            self.restarts_pending = (0..self.config.concurrency).collect();
            if self.restarting.is_none() {
                self.restart_next();
            }
        } else {
            info!("reload: applied (no worker restart needed)");
        }
    }

    /// Starts the successor of the next worker of a rolling restart; the worker it replaces keeps serving
    /// until the successor is ready.
    pub(super) fn restart_next(&mut self) {
        while let Some(index) = self.restarts_pending.pop_front() {
            let Some(slot) = self.slots.get(index as usize) else { continue };
            let Life::Ready { successor: None, .. } = &slot.life else {
                // Down or still starting: its next start uses the new configuration anyway.
                continue;
            };
            let successor = match self.spawn_process(index) {
                Ok(successor) => successor,
                Err(error) => return self.reload_failed(index, &format!("could not start: {error}")),
            };
            let generation = successor.generation;
            if let Some(Life::Ready { successor: place, .. }) =
                self.slots.get_mut(index as usize).map(|slot| &mut slot.life)
            {
                *place = Some(successor);
            }
            after(self.config.hard_shutdown_delay, &self.events, Event::ReloadDeadline { index, generation });
            self.restarting = Some(index);
            return;
        }
        self.before_reload = None;
        info!("reload: every worker runs the new configuration");
    }

    /// A reload's successor is ready: it takes the index's connections and the worker it replaces stops.
    pub(super) fn successor_ready(&mut self, index: u32) {
        let deadline_ms = crate::config::whole_millis(self.config.hard_shutdown_delay);
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        let Some(mut old) = slot.life.hand_over() else { return };
        let generation = old.generation;
        old.farewell_shutdown(deadline_ms);
        slot.retire(old, Retirement::Reload);
        after(self.config.hard_shutdown_delay, &self.events, Event::ReloadDeadline { index, generation });
        self.flush(index);
        if self.restarting == Some(index) {
            self.restarting = None;
            self.restart_next();
        }
    }

    /// `hardShutdownDelay` after a reload started a successor or retired a worker: a successor that is not
    /// ready yet fails the reload; a retired worker that has not stopped is killed.
    pub(super) fn on_reload_deadline(&mut self, index: u32, generation: u64) {
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        let Some(role) = slot.role_of(generation) else { return };
        match role {
            Role::Current => {}
            Role::Successor => {
                let Some((_, successor)) = slot.remove(generation) else { return };
                signal_worker(successor.pid, Signal::SIGKILL);
                slot.retire(successor, Retirement::Reload);
                self.reload_failed(index, "was not ready within hardShutdownDelay");
            }
            Role::Retiring(_) => {
                let Some(process) = slot.process_mut(generation) else { return };
                if process.spawned {
                    warn!(
                        "worker {index} (pid {}) did not stop within hardShutdownDelay for the reload; killing it",
                        process.pid
                    );
                    signal_worker(process.pid, Signal::SIGKILL);
                }
            }
        }
    }

    /// A successor could not start or get ready: the rolling restart ends there, the workers not yet
    /// replaced keep serving, and their command and environment stay the ones they run.
    pub(super) fn reload_failed(&mut self, index: u32, why: &str) {
        self.stats.reload_failures += 1;
        self.restarts_pending = VecDeque::new();
        self.restarting = None;
        if let Some(before) = self.before_reload.take() {
            self.config.workers = before.workers;
            self.config.env = before.env;
        }
        error!(
            "reload failed: worker {index}'s successor {why}; the workers keep their previous command and environment"
        );
    }
}
