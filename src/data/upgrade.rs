//! HTTP/1.1 upgrades (WebSocket) on routes with `websocket = true`: the handshake goes upstream
//! like any GET (on a connection of its own, never pooled); on a `101` both connections are
//! taken over from hyper and bytes are copied both ways until either side closes or nothing
//! moves for the idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// A comma-separated header (`Connection`, `Upgrade`) names `token`, ignoring case.
fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            // `Upgrade: websocket/13` names a protocol version; the name is what counts.
            let name = t.split('/').next().unwrap_or(t);
            name.eq_ignore_ascii_case(token)
        })
}

/// An HTTP/1.1 `GET` asking to switch to WebSocket (`Connection: upgrade`,
/// `Upgrade: websocket`). HTTP/2 has no `Connection` header, so an h2 request never is one.
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() == Method::GET
        && has_token(req.headers(), CONNECTION, "upgrade")
        && has_token(req.headers(), UPGRADE, "websocket")
}

/// Puts back the two hop-by-hop headers an upgrade needs on the next hop (the generic
/// hop-by-hop stripping removed them with everything else).
pub fn keep_upgrade_headers(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, upgrade);
}

/// Waits for both upgraded connections, then copies bytes both ways until one side closes or
/// the pair is idle (no byte either way) for `idle`. `hold` (the backend's in-flight lease)
/// is kept until the relay ends, so an open WebSocket counts as load on its backend.
pub async fn relay<H: Send + 'static>(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
    hold: H,
    ends: impl std::future::Future<Output = ()>,
) {
    // The client side resolves once hyper has written the 101; both are bounded all the same.
    let (client, upstream) = match tokio::time::timeout(idle, async {
        (client.await, upstream.await)
    })
    .await
    {
        Ok((Ok(c), Ok(u))) => (c, u),
        Ok((c, u)) => {
            tracing::debug!(client = ?c.err(), upstream = ?u.err(), "an upgrade was not completed");
            return;
        }
        Err(_) => {
            tracing::debug!("an upgrade was not completed in time");
            return;
        }
    };
    let clock = Arc::new(Clock::new());
    let mut client = Tracked {
        inner: TokioIo::new(client),
        clock: clock.clone(),
    };
    let mut upstream = TokioIo::new(upstream);
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "an upgraded connection ended with an error");
            }
        }
        () = clock.idle_for(idle) => {
            tracing::debug!(idle_ms = idle.as_millis() as u64, "closing an idle upgraded connection");
        }
        () = ends => {}
    }
    drop(hold);
}

/// How often an upgraded connection on a sharded route looks at the published snapshot.
const OWNER_CHECK_EVERY: Duration = Duration::from_millis(50);

/// Resolves once `shard` is fenced, or served by another IDC than `idc`, in the snapshot
/// published in `cell` (or there is none): the connection must not carry writes any more.
pub async fn until_moved(
    cell: &arc_swap::ArcSwapOption<crate::control::topology::Topology>,
    shard: crate::control::topology::Shard,
    idc: &str,
) {
    loop {
        let moved = match cell.load().as_deref() {
            Some(t) => {
                t.is_fenced(shard)
                    || t.serving(shard)
                        .is_none_or(|i| t.idc(i).name.as_str() != idc)
            }
            None => true,
        };
        if moved {
            return;
        }
        tokio::time::sleep(OWNER_CHECK_EVERY).await;
    }
}

/// When bytes last moved, in ms since the relay started.
struct Clock {
    start: Instant,
    last_ms: AtomicU64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = self.start.elapsed().saturating_sub(last);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

/// One side of the relay, noting every read and write on the clock. Both directions pass
/// through this side (read from it, or written to it), so one tracked side covers both.
struct Tracked<T> {
    inner: T,
    clock: Arc<Clock>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            this.clock.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    fn req(version: Version, method: Method, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .version(version)
            .method(method)
            .uri("/ws");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_http11_get_with_both_headers_is_an_upgrade() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ];
        assert!(is_websocket_upgrade(&req(
            Version::HTTP_11,
            Method::GET,
            &ws
        )));
        assert!(!is_websocket_upgrade(&req(
            Version::HTTP_11,
            Method::POST,
            &ws
        )));
        assert!(!is_websocket_upgrade(&req(
            Version::HTTP_10,
            Method::GET,
            &ws
        )));
        assert!(!is_websocket_upgrade(&req(
            Version::HTTP_11,
            Method::GET,
            &[("upgrade", "websocket")]
        )));
        assert!(!is_websocket_upgrade(&req(
            Version::HTTP_11,
            Method::GET,
            &[("connection", "upgrade"), ("upgrade", "h2c")]
        )));
    }
}
