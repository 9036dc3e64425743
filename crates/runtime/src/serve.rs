//! Serving a router to clients that may be hostile (issue 12, item 12): a
//! connection that has not sent a whole request head within
//! [`ServeLimits::header_read_timeout`] is closed (slow headers, and idle
//! keep-alive connections, which wait for the next head), and at most
//! [`ServeLimits::max_connections`] connections are served at once: the
//! next one is not accepted until one closes, so it waits in the kernel's
//! backlog instead of holding memory here.
//!
//! `axum::serve` sets neither (hyper's header timeout needs a timer, which it
//! does not give), so every server of the operator, the sidecar and the
//! simulator goes through [`serve`], or [`serve_wrapped`] where each
//! connection is first wrapped (TLS: the handshake runs in the connection's
//! own task, within the same timeout, so a slow handshake never holds up
//! accepting the next). HTTP/1.1 only: what workloads, the sidecar,
//! Prometheus and the API server's webhook calls speak.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// What one server allows a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Time to send a whole request head, counted from the connection's
    /// start or the end of the previous answer.
    pub header_read_timeout: Duration,
    /// Connections served at once (at least 1).
    pub max_connections: usize,
    /// Serve more than one request per connection. Off for servers behind
    /// a Service whose clients pool connections and never retry a POST
    /// (the API server calling a webhook): a replica that closes a pooled
    /// connection as it stops would fail the request being written on it.
    pub keep_alive: bool,
}

impl Default for ServeLimits {
    /// 10 s for a head; 256 connections.
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 256,
            keep_alive: true,
        }
    }
}

/// How long open connections may finish after `shutdown` before they are dropped.
const DRAIN: Duration = Duration::from_secs(10);

/// Serve `app` on `listener` within `limits` until `shutdown` resolves, then
/// let open connections finish (for at most 10 s).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_wrapped(listener, app, limits, shutdown, |stream| async move {
        Ok::<_, std::io::Error>(stream)
    })
    .await
}

/// As [`serve`], each accepted connection first passed through `wrap` (a
/// TLS handshake), which must finish within the header-read timeout.
pub async fn serve_wrapped<W, F, S>(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
    wrap: W,
) -> std::io::Result<()>
where
    W: Fn(TcpStream) -> F + Send + Sync + 'static,
    F: Future<Output = std::io::Result<S>> + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let wrap = Arc::new(wrap);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(limits.keep_alive);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                // The semaphore is never closed.
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Per-connection failures (reset before accept) and
                    // descriptor exhaustion alike: pause, then go on.
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Handlers can read the client's address (`ConnectInfo<SocketAddr>`).
        let app = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let (wrap, http) = (wrap.clone(), http.clone());
        let watcher = graceful.watcher();
        let handshake = limits.header_read_timeout;
        tokio::spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(handshake, wrap(stream)).await else {
                // A handshake that failed or took too long: drop the client.
                drop(slot);
                return;
            };
            let connection =
                http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            // A client that breaks the protocol or times out ends here.
            let _ = watcher.watch(connection).await;
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// A server with `limits` on a loopback port; its address.
    async fn spawn(limits: ServeLimits) -> std::net::SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let app = Router::new().route("/", get(|| async { "ok" }));
        tokio::spawn(serve(listener, app, limits, std::future::pending()));
        addr
    }

    /// Read until the server closes the connection (or 30 s pass); what it sent.
    async fn read_to_close(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut seen = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut seen));
        match read.await {
            Ok(Ok(_)) => Some(seen),
            Ok(Err(_)) => Some(seen),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        let addr = spawn(ServeLimits {
            header_read_timeout: Duration::from_millis(200),
            max_connections: 4,
            keep_alive: true,
        })
        .await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("write");
        let seen = read_to_close(&mut slow).await;
        assert!(seen.is_some(), "the connection stayed open for 30 s");
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_until_one_closes() {
        let addr = spawn(ServeLimits {
            header_read_timeout: Duration::from_secs(60),
            max_connections: 1,
            keep_alive: true,
        })
        .await;
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut first = TcpStream::connect(addr).await.expect("connect");
        first.write_all(request).await.expect("write");
        let mut answer = [0u8; 12];
        first.read_exact(&mut answer).await.expect("first answered");
        assert_eq!(&answer, b"HTTP/1.1 200");
        // The first stays open (keep-alive): the second is connected by the
        // kernel but not served.
        let mut second = TcpStream::connect(addr).await.expect("connect");
        second.write_all(request).await.expect("write");
        let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut answer));
        assert!(early.await.is_err(), "served beyond the cap of one");
        drop(first);
        second
            .read_exact(&mut answer)
            .await
            .expect("second answered");
        assert_eq!(&answer, b"HTTP/1.1 200");
    }
}
