//! hello-worker: the smallest useful sticky-cluster worker. It answers every HTTP/1.x request with
//! `{"worker":<index>,"pid":<pid>,"remote":"<client ip>"}` so a reload shows which worker you reached.

use std::net::SocketAddr;
use std::process::ExitCode;

use sticky_cluster::hash::node_address_text;
use sticky_cluster::{Error, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(serve()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hello-worker: error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Joins the cluster, says ready, answers connections until the master asks to shut down.
async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let worker = Worker::from_env()?;
    let mut terminate = signal(SignalKind::terminate())?;
    worker.ready()?;
    let mut requests = JoinSet::new();
    loop {
        tokio::select! {
            accepted = worker.accept() => match accepted {
                Ok((stream, peer)) => {
                    requests.spawn(answer(stream, peer, worker.index()));
                }
                Err(Error::Shutdown | Error::ChannelClosed) => break,
                Err(error) => return Err(error.into()),
            },
            _ = terminate.recv() => {
                // The master sent every connection for us before its shutdown message and SIGTERM:
                // serve what already waits in the channel, then stop.
                while let Ok(connection) = worker.try_accept() {
                    let stream = connection.stream;
                    stream.set_nonblocking(true)?;
                    requests.spawn(answer(TcpStream::from_std(stream)?, connection.peer, worker.index()));
                }
                break;
            }
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    }
    // Graceful: stop taking connections, finish the requests already running.
    while requests.join_next().await.is_some() {}
    Ok(())
}

/// Reads one request head and answers it with this worker's identity, then closes.
async fn answer(mut stream: TcpStream, peer: SocketAddr, index: u32) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let body = format!(
        "{{\"worker\":{index},\"pid\":{},\"remote\":\"{}\"}}\n",
        std::process::id(),
        node_address_text(peer.ip())
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
