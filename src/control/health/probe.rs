//! Active health probes: one task per backend identity (IDC + address) sends an HTTP/1.1
//! `GET <health.path>` every `interval`, each with a deadline of `timeout`; a 2xx status is a
//! success. Results go to the backend's shared `BackendHealth` (rise/fall). A probe speaks to
//! a backend the way the traffic does: over TLS, with the IDC's CA and server name, when the
//! IDC's backends are TLS-only (a plaintext probe would call every such backend dead).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::control::topology::HealthSpec;
use crate::data::upstream::health::BackendHealth;
use crate::data::upstream::tls::UpstreamTls;

/// The longest status line (and headers before it) read from a probe answer.
const MAX_HEAD: usize = 1024;

/// Probes `backend` (over `tls` when its IDC asks for it) until the task is aborted.
/// `flipped` is told when the verdict changes.
pub async fn run(
    backend: Arc<BackendHealth>,
    spec: HealthSpec,
    tls: Option<Arc<UpstreamTls>>,
    flipped: Arc<Notify>,
) {
    // Spread the first probes of many backends over one interval, so a reload that names a
    // thousand backends does not open a thousand connections in the same millisecond.
    let spread = spec.interval.as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(fastrand::u64(..spread.max(1)))).await;
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe(backend.addr, &spec.path, spec.timeout, tls.as_deref()).await;
        match (
            backend.record_probe(result.is_ok(), spec.rise, spec.fall),
            &result,
        ) {
            (Some(_), Ok(())) => {
                tracing::info!(idc = %backend.idc, backend = %backend.addr, rise = spec.rise, "backend healthy again (probes)");
                flipped.notify_one();
            }
            (Some(_), Err(e)) => {
                tracing::warn!(idc = %backend.idc, backend = %backend.addr, fall = spec.fall, error = %e, "backend unhealthy (probes)");
                flipped.notify_one();
            }
            (None, Err(e)) => {
                tracing::debug!(idc = %backend.idc, backend = %backend.addr, error = %e, "health probe failed")
            }
            (None, Ok(())) => {}
        }
    }
}

/// One probe: connect (and the TLS handshake, with `tls`), send the request, read the status
/// line, all within `timeout`.
pub async fn probe(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, connect_and_ask(addr, path, tls)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn connect_and_ask(
    addr: SocketAddr,
    path: &str,
    tls: Option<&UpstreamTls>,
) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    match tls {
        Some(tls) => {
            let stream = tls
                .connect(stream, addr)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            exchange(stream, addr, path).await
        }
        None => exchange(stream, addr, path).await,
    }
}

async fn exchange<S>(mut stream: S, addr: SocketAddr, path: &str) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: shardgate-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < MAX_HEAD {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    match status_of(&head) {
        Some(s) if (200..300).contains(&s) => Ok(()),
        Some(s) => Err(format!("answered {s}")),
        None => Err("not an HTTP/1.x answer".into()),
    }
}

/// The status code of an HTTP/1.x status line.
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let mut parts = line.split(|&b| b == b' ');
    if !parts.next()?.starts_with(b"HTTP/1.") {
        return None;
    }
    std::str::from_utf8(parts.next()?).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_of(b"HTTP/1.0 503 Service Unavailable\r\nx: y"),
            Some(503)
        );
        assert_eq!(status_of(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b""), None);
    }

    #[tokio::test]
    async fn probes_need_a_2xx_within_the_deadline() {
        use tokio::net::TcpListener;
        let answer = |status: &'static str| async move {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let mut buf = [0u8; 512];
                    let _ = s.read(&mut buf).await;
                    if !status.is_empty() {
                        let _ = s.write_all(status.as_bytes()).await;
                    } else {
                        // Silent: hold the connection past the deadline.
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            });
            addr
        };
        let t = Duration::from_millis(300);
        let ok = answer("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        assert_eq!(probe(ok, "/healthz", t, None).await, Ok(()));
        let bad = answer("HTTP/1.1 500 Oops\r\n\r\n").await;
        assert!(probe(bad, "/healthz", t, None)
            .await
            .unwrap_err()
            .contains("500"));
        let silent = answer("").await;
        assert!(probe(silent, "/healthz", t, None)
            .await
            .unwrap_err()
            .contains("300 ms"));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(probe(closed, "/healthz", t, None).await.is_err());
    }
}
