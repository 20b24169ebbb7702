//! Simulated IDC backends on loopback, for `shardgate demo` and the tests. Each answers with
//! JSON naming its IDC and set and echoing what it received (method, path, headers, body size
//! and CRC), so a caller can see where a request landed and what the gateway sent.
//!
//! Request knobs: `x-sim-delay-ms: N` (answer after N ms), `x-sim-status: N` (answer N),
//! `x-sim-hold: 1` (answer once `SimBackend::release_held` is called, or after 60 s).
//!
//! IDCs started on one [`owners::Owners`] board enforce the misroute contract
//! (docs/backends.md): a write with an owner epoch older than the board's gets 421 and is not
//! applied.
//! - [`ledger`]: what the backends answered, on one clock (`GET /_ledger` on a backend).
//! - [`history`]: the history checker: did two IDCs ever write one shard at once?

pub mod history;
pub mod ledger;
pub mod owners;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::data::server::ClientBody;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::data::server::{serve, Handler, ListenerSettings};
use crate::data::upstream::body::ResponseBody;
use ledger::{Entry, Ledger};

pub struct SimIdc {
    pub idc: String,
    pub set: String,
    /// The ownership board this IDC checks writes against.
    owners: Arc<owners::Owners>,
    hits: AtomicU64,
    health_checks: AtomicU64,
    /// Requests waiting for `release_held`, and the release generation they wait on.
    held: AtomicU64,
    release: watch::Sender<u64>,
    /// Where every sharded request answered is recorded, when the run keeps a ledger.
    ledger: Option<Arc<Ledger>>,
}

impl SimIdc {
    async fn answer(&self, req: Request<ClientBody>) -> Response<ResponseBody> {
        if req.uri().path() == "/healthz" {
            self.health_checks.fetch_add(1, Ordering::Relaxed);
            return Response::new(ResponseBody::full("ok\n"));
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        let (parts, mut body) = req.into_parts();
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let mut body_bytes = 0u64;
        let mut crc = crc32fast::Hasher::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        body_bytes += d.len() as u64;
                        crc.update(d);
                    }
                }
                Err(_) => {
                    let mut r = Response::new(ResponseBody::full("body read failed\n"));
                    *r.status_mut() = StatusCode::BAD_REQUEST;
                    return r;
                }
            }
        }
        if let owners::Verdict::Refuse { owner, epoch } =
            self.owners.check(&self.idc, &parts.method, &parts.headers)
        {
            return misdirected(&owner, epoch);
        }
        if parts.headers.contains_key("x-sim-hold") {
            let mut released = self.release.subscribe();
            self.held.fetch_add(1, Ordering::Relaxed);
            let _ = tokio::time::timeout(Duration::from_secs(60), released.changed()).await;
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(ms) = header("x-sim-delay-ms") {
            tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
        }
        let headers: BTreeMap<String, String> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let answer = serde_json::json!({
            "idc": self.idc,
            "set": self.set,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_bytes": body_bytes,
            "body_crc32": crc.finalize(),
        });
        let mut r = Response::new(ResponseBody::full(format!("{answer}\n")));
        if let Some(status) =
            header("x-sim-status").and_then(|s| StatusCode::from_u16(s as u16).ok())
        {
            *r.status_mut() = status;
        }
        let h = r.headers_mut();
        h.insert("content-type", "application/json".parse().expect("static"));
        if let Ok(v) = self.idc.parse() {
            h.insert("x-sim-idc", v);
        }
        if let Ok(v) = self.set.parse() {
            h.insert("x-sim-set", v);
        }
        r
    }
}

/// 421: the write was not applied; `owner` owns the shard since `epoch`.
fn misdirected(owner: &str, epoch: u64) -> Response<ResponseBody> {
    let body = serde_json::json!({"error": "misdirected", "owner": owner, "owner_epoch": epoch});
    let mut r = Response::new(ResponseBody::full(format!("{body}\n")));
    *r.status_mut() = StatusCode::MISDIRECTED_REQUEST;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = http::HeaderValue::from_str(owner) {
        h.insert(crate::data::headers::OWNER, v);
    }
    h.insert(
        crate::data::headers::OWNER_EPOCH,
        http::HeaderValue::from(epoch),
    );
    r
}

impl Handler for SimIdc {
    async fn call(
        self: Arc<Self>,
        req: Request<ClientBody>,
        _peer: crate::data::server::Peer,
    ) -> Response<ResponseBody> {
        let Some(ledger) = self.ledger.clone() else {
            return self.answer(req).await;
        };
        if req.uri().path() == "/_ledger" {
            let mut r = Response::new(ResponseBody::full(format!("{}\n", ledger.to_json())));
            r.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/json"),
            );
            return r;
        }
        // Recorded around the whole answer, whatever path it takes (a refusal included), and
        // only for sharded requests: the history is about who wrote which shard.
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let number = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
        let Some(shard) = header("x-shardgate-shard").and_then(|v| v.parse::<u32>().ok()) else {
            return self.answer(req).await;
        };
        let method = req.method().as_str().to_owned();
        let request_id = header("x-request-id").unwrap_or_default();
        let owner_epoch = number("x-shardgate-owner-epoch");
        let epoch = number("x-shardgate-epoch");
        let start_ns = ledger.now_ns();
        let response = self.answer(req).await;
        ledger.record(Entry {
            shard,
            idc: self.idc.clone(),
            set: self.set.clone(),
            method,
            request_id,
            owner_epoch,
            epoch,
            status: response.status().as_u16(),
            start_ns,
            end_ns: ledger.now_ns(),
        });
        response
    }
}

/// A running simulated backend.
pub struct SimBackend {
    pub addr: SocketAddr,
    sim: Arc<SimIdc>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SimBackend {
    /// Starts a backend for (`idc`, `set`) on `addr` (port 0 picks a free port), with an
    /// ownership board of its own.
    pub async fn start(addr: SocketAddr, idc: &str, set: &str) -> std::io::Result<SimBackend> {
        Self::start_on_board(addr, idc, set, Arc::new(owners::Owners::new())).await
    }

    /// Starts a backend that checks writes against `owners`, the board of every simulated IDC
    /// started together.
    pub async fn start_on_board(
        addr: SocketAddr,
        idc: &str,
        set: &str,
        owners: Arc<owners::Owners>,
    ) -> std::io::Result<SimBackend> {
        Self::start_with(addr, idc, set, owners, None).await
    }

    /// Starts a backend that records what it answers in `ledger` (one ledger shared by all the
    /// backends of a run puts them on one clock), with an ownership board of its own.
    pub async fn start_with_ledger(
        addr: SocketAddr,
        idc: &str,
        set: &str,
        ledger: Option<Arc<Ledger>>,
    ) -> std::io::Result<SimBackend> {
        Self::start_with(addr, idc, set, Arc::new(owners::Owners::new()), ledger).await
    }

    /// Starts a backend on the board `owners`, recording into `ledger` when given.
    pub async fn start_with(
        addr: SocketAddr,
        idc: &str,
        set: &str,
        owners: Arc<owners::Owners>,
        ledger: Option<Arc<Ledger>>,
    ) -> std::io::Result<SimBackend> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let sim = Arc::new(SimIdc {
            idc: idc.to_owned(),
            set: set.to_owned(),
            owners,
            hits: AtomicU64::new(0),
            health_checks: AtomicU64::new(0),
            held: AtomicU64::new(0),
            release: watch::channel(0).0,
            ledger,
        });
        let (stop, stop_rx) = watch::channel(false);
        let settings = ListenerSettings::plain(
            Duration::from_secs(10),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        let task = tokio::spawn(serve(listener, sim.clone(), settings, stop_rx));
        Ok(SimBackend {
            addr,
            sim,
            stop,
            task,
        })
    }

    /// The ownership board this backend checks writes against.
    pub fn owners(&self) -> &Arc<owners::Owners> {
        &self.sim.owners
    }

    /// The ledger this backend records into, when it keeps one.
    pub fn ledger(&self) -> Option<Arc<Ledger>> {
        self.sim.ledger.clone()
    }

    /// Requests answered (health checks not counted).
    pub fn hits(&self) -> u64 {
        self.sim.hits.load(Ordering::Relaxed)
    }

    /// Health checks (`GET /healthz`) answered.
    pub fn health_checks(&self) -> u64 {
        self.sim.health_checks.load(Ordering::Relaxed)
    }

    /// Requests waiting now because of `x-sim-hold`.
    pub fn held(&self) -> u64 {
        self.sim.held.load(Ordering::Relaxed)
    }

    /// Answers every request held by `x-sim-hold` now.
    pub fn release_held(&self) {
        self.sim.release.send_modify(|g| *g += 1);
    }

    /// Stops accepting and closes its connections (a crashed IDC, as seen from the gateway).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
