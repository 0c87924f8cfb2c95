//! The signals a master that owns its process answers: SIGTERM and SIGINT as stop requests (the first
//! graceful, the next hard), SIGHUP as a reload, and, for the binary, SIGUSR2 as an upgrade in place.
//! The binary and the C library's signal-handling masters share this one loop.

use std::future::Future;
use std::pin::Pin;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::master::Stop;

/// What SIGUSR2 becomes: a future giving the upgrade request, or `None` when it was refused (and said so).
pub type OnUpgrade = Box<dyn FnMut() -> Pin<Box<dyn Future<Output = Option<Stop>> + Send>> + Send>;

/// Installs the handlers and forwards what they hear as [`Stop`] requests on the returned receiver:
/// `on_hangup` gives the configuration a SIGHUP reloads (or `None`: nothing to do), `on_upgrade` (when
/// given; SIGUSR2 is left alone otherwise) the upgrade. Must run inside the master's runtime; the handlers
/// stay installed afterwards.
pub fn forward(
    mut on_hangup: impl FnMut() -> Option<Config> + Send + 'static,
    mut on_upgrade: Option<OnUpgrade>,
) -> Result<UnboundedReceiver<Stop>> {
    let install =
        |kind: SignalKind, name: &str| signal(kind).map_err(|e| Error::io(format!("install the {name} handler"), e));
    let mut terminate = install(SignalKind::terminate(), "SIGTERM")?;
    let mut interrupt = install(SignalKind::interrupt(), "SIGINT")?;
    let mut hangup = install(SignalKind::hangup(), "SIGHUP")?;
    let mut user2 = match on_upgrade {
        Some(_) => Some(install(SignalKind::user_defined2(), "SIGUSR2")?),
        None => None,
    };
    let (requests, received) = unbounded_channel();
    tokio::spawn(async move {
        let mut stop_request = Stop::Graceful;
        loop {
            let request = tokio::select! {
                _ = terminate.recv() => std::mem::replace(&mut stop_request, Stop::Hard),
                _ = interrupt.recv() => std::mem::replace(&mut stop_request, Stop::Hard),
                _ = hangup.recv() => match on_hangup() {
                    Some(config) => Stop::Reload(Box::new(config)),
                    None => continue,
                },
                Some(()) = next(&mut user2) => match on_upgrade.as_mut() {
                    Some(upgrade) => match upgrade().await {
                        Some(request) => request,
                        None => continue,
                    },
                    None => continue,
                },
            };
            if requests.send(request).is_err() {
                return;
            }
        }
    });
    Ok(received)
}

/// The next delivery of `signal`, never when there is none.
async fn next(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}
