//! Listeners: accept → hyper (HTTP/1.1, and HTTP/2 with prior knowledge) → a service, with
//! header-read and header-size limits, and graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::ResponseBody;

/// Connection-level settings of a listener.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// How long in-flight requests get to finish once shutdown starts.
    pub drain: Duration,
}

/// A request handler: the proxy pipeline or the admin API.
pub trait Handler: Send + Sync + 'static {
    fn call(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<ResponseBody>> + Send;
}

fn builder(settings: &ListenerSettings) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes as u32)
        .max_concurrent_streams(256);
    b
}

/// Serves `listener` until `shutdown` turns true, then stops accepting and gives open
/// connections `settings.drain` to finish what they are doing.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    settings: ListenerSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Arc::new(builder(&settings));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.call(req, peer).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(settings.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_ms = settings.drain.as_millis() as u64,
            "drain timeout: closing the connections still open"
        );
    }
}
