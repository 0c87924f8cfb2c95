//! A master in this test process, as mini-redis's tests run its server: `master::run` on a runtime of a
//! thread of its own, the test worker as workers, a message to stop it, and its `Stats` to assert on.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use sticky_cluster::config::{Config, Overrides};
use sticky_cluster::master::{self, Outcome, Stop};
use tokio::sync::mpsc::UnboundedSender;

use super::{config_text, get};

/// How long a stop may take before the test fails.
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// A master running in this process; stopped hard (its workers killed) on drop.
pub struct InProcess {
    /// Where clients dial: 127.0.0.1 on the dual-stack listener's port.
    pub server: SocketAddr,
    stop: UnboundedSender<Stop>,
    /// Where the master's thread sends how the run ended (in a mutex: tests share the handle between
    /// client threads).
    outcome: Mutex<mpsc::Receiver<sticky_cluster::Result<Outcome>>>,
    thread: Option<JoinHandle<()>>,
}

impl InProcess {
    /// Runs a master with `yaml` (port 0, and the test worker unless the YAML names workers, as for
    /// `Cluster::start`). The listener is bound before this returns, so clients may dial at once: they
    /// wait for their worker in the master.
    pub fn start(yaml: &str) -> InProcess {
        let config = Config::from_yaml(&config_text(yaml), "test.yaml")
            .and_then(|config| config.apply(Overrides::default(), "test.yaml"))
            .unwrap_or_else(|error| panic!("{error}"));
        let listener = master::bind(&config).unwrap_or_else(|error| panic!("{error}"));
        let port = listener.local_addr().unwrap().port();
        let (stop, stop_rx) = tokio::sync::mpsc::unbounded_channel();
        let (done, outcome) = mpsc::channel();
        let debug = config.debug;
        // One thread for the master's whole run: the workers' death signal is tied to the thread that
        // spawned them. Its log goes to the test's captured output (shown when the test fails).
        let thread = std::thread::spawn(move || {
            let level = if debug { tracing::Level::DEBUG } else { tracing::Level::INFO };
            let subscriber = tracing_subscriber::fmt().with_max_level(level).with_test_writer().finish();
            let _log = tracing::subscriber::set_default(subscriber);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _ = done.send(runtime.block_on(master::run(config, listener, stop_rx)));
        });
        InProcess {
            server: SocketAddr::from(([127, 0, 0, 1], port)),
            stop,
            outcome: Mutex::new(outcome),
            thread: Some(thread),
        }
    }

    /// `GET path` from `client`; the worker's JSON answer.
    pub fn get(&self, client: Ipv4Addr, path: &str) -> std::io::Result<Value> {
        get(client, self.server, path)
    }

    /// Hands the master a request (a reload, say) without waiting.
    pub fn send(&self, request: Stop) {
        self.stop.send(request).expect("the master is running");
    }

    /// A graceful stop, and how the run ended.
    pub fn stop(self) -> Outcome {
        self.stop_with(Stop::Graceful)
    }

    /// Stops with `request` and waits for the run's outcome (at most a minute).
    pub fn stop_with(mut self, request: Stop) -> Outcome {
        let _ = self.stop.send(request);
        let outcome = self.outcome.get_mut().unwrap().recv_timeout(STOP_LIMIT);
        let outcome = outcome.expect("the master stops within a minute");
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the master's thread ends");
        }
        outcome.unwrap_or_else(|error| panic!("the master failed: {error}"))
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.send(Stop::Hard);
            if let Ok(outcome) = self.outcome.get_mut() {
                let _ = outcome.recv_timeout(STOP_LIMIT);
            }
            let _ = thread.join();
        }
    }
}
