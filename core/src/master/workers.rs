//! A worker's life as the master sees it: starting a process for an index, its messages (hello, ready,
//! stopping), the end of its channel, its exit, and reviving the index with back-off.

use std::io;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use tracing::{debug, error, info, warn};

use super::channel::WorkerChannel;
use super::slot::{Life, Process, Retirement, Role};
use super::{after, Event, Master};
use crate::config::WorkerSource;
use crate::error::{Error, Result};
use crate::protocol::Message;
use crate::supervisor::{describe_exit, end_process_group, revival_delay, signal_worker, spawn_worker, CRASH_UPTIME};

impl Master {
    /// Starts worker `index` as the index's current worker (spawn mode).
    pub(super) fn start_worker(&mut self, index: u32) -> Result<()> {
        let process = self.spawn_process(index)?;
        if let Some(slot) = self.slots.get_mut(index as usize) {
            slot.life = Life::Starting(process);
        }
        Ok(())
    }

    /// Runs the worker command for `index` and watches the process until it exits.
    pub(super) fn spawn_process(&mut self, index: u32) -> Result<Process> {
        let WorkerSource::Spawn { command, cwd } = &self.config.workers else {
            return Err(Error::io(
                format!("start worker {index}"),
                io::Error::other("the cluster attaches its workers"),
            ));
        };
        let spawned = spawn_worker(&self.config, command, cwd.as_deref(), index, self.kernel_listener(index))?;
        let mut child = spawned.child;
        let probe = self.readiness_probe(index);
        let process = match self.new_process(index, spawned.pid, true, spawned.channel, Some(spawned.worker_end)) {
            Ok(process) => process,
            Err(error) => {
                // Not tracked, so not left running.
                let _ = child.start_kill();
                return Err(error);
            }
        };
        let mut process = process;
        process.readiness = probe;
        let generation = process.generation;
        debug!("worker {index} started (pid {}, generation {generation})", spawned.pid);
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = events.send(Event::Exited { index, generation, status });
        });
        Ok(process)
    }

    /// A new process for `index` (spawned or attached) on `channel`, with the next generation.
    pub(super) fn new_process(
        &mut self,
        index: u32,
        pid: u32,
        spawned: bool,
        channel: OwnedFd,
        worker_end: Option<OwnedFd>,
    ) -> Result<Process> {
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return Err(Error::io(format!("start worker {index}"), io::Error::from(io::ErrorKind::NotFound)));
        };
        let generation = slot.generation + 1;
        let channel = WorkerChannel::open(channel, &self.events, index, generation)?;
        slot.generation = generation;
        Ok(Process::new(generation, pid, spawned, Some(channel), worker_end))
    }

    pub(super) fn on_message(&mut self, index: u32, generation: u64, message: Message) {
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        let Some(role) = slot.role_of(generation) else { return };
        let pid = slot.process_mut(generation).map_or(0, |process| process.pid);
        match message {
            Message::Hello { index: claimed, pid: said } => {
                if claimed != index {
                    warn!("worker {index} (pid {pid}) says it is worker {claimed}; keeping index {index}");
                }
                debug!("worker {index} said hello (pid {said})");
            }
            Message::Ready => match role {
                Role::Current => {
                    if slot.life.become_ready() {
                        debug!("worker {index} (pid {pid}) is ready; {} queued connections follow", slot.queue.len());
                        self.flush(index);
                        if self.restarting == Some(index) {
                            self.restarting = None;
                            self.restart_next();
                        }
                    }
                }
                Role::Successor => self.successor_ready(index),
                Role::Retiring(_) => {}
            },
            Message::Stopping => self.on_stopping(index, generation, role),
            other => warn!("worker {index} sent a master-only message {other:?}; ignored"),
        }
    }

    /// Worker `index`'s process of `generation` asked to get no more connections: it retires (it is told
    /// `stopped` after the last connection it got) and the index's connections wait for its successor.
    fn on_stopping(&mut self, index: u32, generation: u64, role: Role) {
        let running = self.running();
        let spawns = self.spawns();
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        if let Role::Retiring(_) = role {
            if let Some(process) = slot.process_mut(generation) {
                process.farewell.stopped = true;
            }
            return self.flush_process(index, generation);
        }
        let Some((_, mut process)) = slot.remove(generation) else { return };
        process.farewell.stopped = true;
        let (pid, lived) = (process.pid, process.started.elapsed());
        slot.retire(process, Retirement::Asked);
        let queued = slot.queue.len();
        let replaced = !slot.life.is_down();
        self.flush_process(index, generation);
        if role == Role::Successor {
            return self.reload_failed(index, "stopped before it was ready");
        }
        info!("worker {index} (pid {pid}) stopped taking connections; {queued} queued wait for its successor");
        if running && spawns && !replaced {
            self.count_crash(index, lived);
            self.schedule_revival(index);
        }
    }

    /// The channel of a live worker ended (an empty datagram, a protocol error, a refused write): a
    /// spawned worker is ended so its exit takes back its connections and revives the index; an
    /// attached one is released so the index can be attached again. A retiring worker is only forgotten.
    pub(super) fn channel_ended(&mut self, index: u32, generation: u64, reason: Option<String>) {
        let running = self.running();
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        let Some(role) = slot.role_of(generation) else { return };
        let Some(process) = slot.process_mut(generation) else { return };
        if process.channel.is_none() {
            return;
        }
        let (pid, spawned) = (process.pid, process.spawned);
        let reason = reason.unwrap_or_else(|| "closed its channel (an empty datagram)".into());
        if !spawned {
            return self.release_attached(index, generation, &format!("{reason}; released its index"), true);
        }
        process.disconnect();
        if let Role::Retiring(_) = role {
            return debug!("worker {index} (pid {pid}) {reason} while stopping");
        }
        if running {
            error!("worker {index} (pid {pid}) {reason}; ending it, its index is revived");
        } else {
            debug!("worker {index} (pid {pid}) {reason}");
        }
        signal_worker(pid, Signal::SIGKILL);
    }

    pub(super) fn on_exit(&mut self, index: u32, generation: u64, status: io::Result<ExitStatus>) {
        let running = self.running();
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        let cause = match slot.role_of(generation) {
            Some(Role::Retiring(position)) => slot.retiring.get(position).map(|retiring| retiring.cause),
            _ => None,
        };
        let Some((role, mut process)) = slot.remove(generation) else { return };
        process.disconnect();
        // What it started and left behind (gunicorn's or hypercorn's own workers after a kill -9) would
        // go on accepting on the index's listener beside its successor.
        if process.spawned && end_process_group(process.pid) {
            warn!("worker {index} (pid {}) left processes in its group; killed them", process.pid);
        }
        let how = match &status {
            Ok(status) => describe_exit(status),
            Err(error) => format!("unknown status ({error})"),
        };
        let pid = process.pid;
        let taken_back = self.take_back(index, &mut process);
        if taken_back > 0 {
            info!("worker {index} (pid {pid}) left {taken_back} connections unread; they wait for its successor");
        }
        if !running {
            debug!("worker {index} (pid {pid}) exited: {how}");
            return self.settle_queue_in_shutdown(index);
        }
        match role {
            Role::Retiring(_) => {
                match cause {
                    Some(Retirement::Reload) => info!("worker {index} (pid {pid}) stopped for the reload ({how})"),
                    _ => info!("worker {index} (pid {pid}) stopped ({how})"),
                }
                self.flush(index);
            }
            Role::Successor => self.reload_failed(index, &format!("exited before it was ready ({how})")),
            Role::Current => {
                let lived = process.started.elapsed();
                let replaced = self.slots.get(index as usize).is_some_and(|slot| !slot.life.is_down());
                if replaced {
                    return info!("worker {index} (pid {pid}) exited ({how}); its successor takes over");
                }
                if !process.spawned {
                    return;
                }
                let crashes = self.count_crash(index, lived);
                warn!(
                    "worker {index} (pid {pid}) exited after {:.1}s: {how}; reviving in {:?} (attempt {})",
                    lived.as_secs_f64(),
                    revival_delay(crashes),
                    crashes.max(1)
                );
                self.schedule_revival(index);
            }
        }
    }

    /// During shutdown, connections that came back to an index go to its ready worker if its shutdown
    /// message is still to be written (they go before it); otherwise they are closed and counted.
    pub(super) fn settle_queue_in_shutdown(&mut self, index: u32) {
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        let deliverable = match &slot.life {
            Life::Ready { process, .. } => process.channel.is_some() && process.farewell.shutdown.is_some(),
            _ => false,
        };
        if deliverable {
            self.flush(index);
        } else {
            self.stats.closed += slot.close_queue();
        }
    }

    /// Counts a run of `lived` towards the crash-loop back-off and returns the count.
    fn count_crash(&mut self, index: u32, lived: Duration) -> u32 {
        let Some(slot) = self.slots.get_mut(index as usize) else { return 0 };
        slot.crashes = if lived < CRASH_UPTIME { slot.crashes + 1 } else { 0 };
        slot.crashes
    }

    /// A worker could not be started (fds, memory, a missing program): try again with the same growing
    /// back-off as a crash loop, so the error never spins.
    pub(super) fn start_failed(&mut self, index: u32, error: Error) {
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        slot.crashes += 1;
        error!("{error}; retrying in {:?}", revival_delay(slot.crashes));
        self.schedule_revival(index);
    }

    /// Starts the index again after its back-off (at once after a long run).
    pub(super) fn schedule_revival(&mut self, index: u32) {
        let Some(slot) = self.slots.get(index as usize) else { return };
        let event = Event::Revive { index, generation: slot.generation };
        after(revival_delay(slot.crashes), &self.events, event);
    }

    /// The back-off is over: start the index's next worker, unless something else took its place.
    pub(super) fn on_revive(&mut self, index: u32, generation: u64) {
        let running = self.running();
        let Some(slot) = self.slots.get(index as usize) else { return };
        let Life::Down { since } = slot.life else { return };
        if !running || slot.generation != generation {
            return;
        }
        debug!("reviving worker {index} after {:.1}s without one", since.elapsed().as_secs_f64());
        self.stats.revivals += 1;
        if let Err(error) = self.start_worker(index) {
            self.start_failed(index, error);
        }
    }
}
