//! The scenarios' load: per gateway, clients that read and write every shard in turn and hot
//! writers that write one shard back to back; what each saw, on the ledger's clock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use shardgate::control::topology::Shard;
use shardgate::dev::sim::history::ClientOutcome;
use shardgate::dev::sim::ledger::Ledger;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::SHARDS;
use crate::etcd_support::within;

/// How long a write takes at the backend (`x-sim-delay-ms`), between these: long enough that
/// two writers of one shard overlap in time, as replicated writes would, and varied so that
/// the writers of one shard do not march in step.
const WRITE_MS: (u64, u64) = (10, 60);
/// The hot writers' shards: one write after another, so that writes are in flight whenever
/// the owner changes (sh's and bj's first shards, which the scenarios move; two on each).
const HOT_SHARDS: [u32; 4] = [0, 0, 4, 4];
/// Longer than a gateway is frozen in the SIGSTOP scenarios (past the 5 s lease), so that the
/// requests it took in before it stopped are still wanted when it resumes, as a patient client's
/// would be; and far above the route timeout (500 ms), so a gateway's own deadline answers first.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests per load client, at most.
const MAX_REQUESTS: usize = 100_000;

/// What every load client shares: the clock, the stop flag, where outcomes go, request ids.
#[derive(Clone)]
struct Shared {
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<ClientOutcome>>>,
    ids: Arc<AtomicU64>,
}

/// Mixed GET/POST load through every gateway, over one key per shard.
pub struct Load {
    shared: Shared,
    keys: Arc<Vec<(String, u32)>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Per gateway proxy: one hot writer per entry of `HOT_SHARDS`, and two clients over
    /// every shard.
    pub fn start(proxies: &[SocketAddr], ledger: Arc<Ledger>) -> Load {
        let mut load = Load {
            shared: Shared {
                ledger,
                stop: Arc::new(AtomicBool::new(false)),
                outcomes: Arc::new(Mutex::new(Vec::new())),
                ids: Arc::new(AtomicU64::new(0)),
            },
            keys: Arc::new(keys()),
            tasks: Vec::new(),
        };
        for proxy in proxies {
            for (h, hot) in HOT_SHARDS.iter().enumerate() {
                let key = load.key(*hot);
                load.spawn(*proxy, Arc::new(vec![key]), h * 3, MAX_REQUESTS);
            }
        }
        for (i, proxy) in proxies.iter().enumerate() {
            for c in 0..2 {
                load.spawn(*proxy, load.keys.clone(), i * 5 + c * 7, MAX_REQUESTS);
            }
        }
        load
    }

    fn key(&self, shard: u32) -> (String, u32) {
        self.keys
            .iter()
            .find(|(_, s)| *s == shard)
            .cloned()
            .expect("a key for every shard")
    }

    fn spawn(
        &mut self,
        proxy: SocketAddr,
        keys: Arc<Vec<(String, u32)>>,
        offset: usize,
        limit: usize,
    ) {
        let shared = self.shared.clone();
        self.tasks
            .push(tokio::spawn(client(proxy, keys, offset, limit, shared)));
    }

    /// `n` more clients, each sending one write to `shard` through `proxy` on a connection of
    /// its own: callers that keep arriving at a gateway that does not answer (frozen), all
    /// taken in at once when it resumes.
    pub fn burst(&mut self, proxy: SocketAddr, shard: u32, n: usize) {
        let keys = Arc::new(vec![self.key(shard)]);
        for _ in 0..n {
            self.spawn(proxy, keys.clone(), 0, 1);
        }
    }

    /// Stops every client (each ends its request in flight first, within its timeout) and
    /// returns what they saw.
    pub async fn stop(self) -> Vec<ClientOutcome> {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            within(CLIENT_TIMEOUT * 3, "the load clients to stop", t)
                .await
                .unwrap();
        }
        let outcomes = self.shared.outcomes.lock().unwrap().clone();
        outcomes
    }
}

/// One key per shard.
fn keys() -> Vec<(String, u32)> {
    (0..SHARDS)
        .map(|s| {
            (0..100_000)
                .map(|i| format!("user-{i}"))
                .find(|k| Shard::of_key(k.as_bytes(), SHARDS).0 == s)
                .map(|k| (k, s))
                .expect("a key for every shard")
        })
        .collect()
}

/// One client: a keep-alive connection to `proxy`, requests over `keys` from `offset` on, at
/// most `limit` of them.
async fn client(
    proxy: SocketAddr,
    keys: Arc<Vec<(String, u32)>>,
    offset: usize,
    limit: usize,
    shared: Shared,
) {
    let Shared {
        ledger,
        stop,
        outcomes: out,
        ids,
    } = shared;
    let mut sender = None;
    for n in (offset..).take(limit) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (key, shard) = &keys[n % keys.len()];
        // Every key is read and written in turn, whatever the number of keys; a hot writer
        // (one key) only writes.
        let write = keys.len() == 1 || (n / keys.len() + n) % 2 == 1;
        let start_ns = ledger.now_ns();
        if sender.is_none() {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(CLIENT_TIMEOUT, TcpStream::connect(proxy)).await
            {
                if let Ok(Ok((s, conn))) = tokio::time::timeout(
                    CLIENT_TIMEOUT,
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)),
                )
                .await
                {
                    tokio::spawn(conn);
                    sender = Some(s);
                }
            }
        }
        let mut status = 0;
        let mut reason = None;
        if let Some(s) = sender.as_mut() {
            let id = format!("load-{}", ids.fetch_add(1, Ordering::Relaxed));
            let req = Request::builder()
                .method(if write { "POST" } else { "GET" })
                .uri("/orders/1")
                .header("host", "history.test")
                .header("x-user-id", key)
                .header("x-request-id", id);
            let req = if write {
                let delay = fastrand::u64(WRITE_MS.0..WRITE_MS.1);
                req.header("x-sim-delay-ms", delay.to_string())
                    .body(Full::new(Bytes::from_static(b"{\"qty\":1}")))
            } else {
                req.body(Full::new(Bytes::new()))
            }
            .unwrap();
            let answer = tokio::time::timeout(CLIENT_TIMEOUT, async {
                let resp = s.send_request(req).await.map_err(|_| ())?;
                let status = resp.status().as_u16();
                let reason = resp
                    .headers()
                    .get("x-shardgate-reason")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                resp.into_body().collect().await.map_err(|_| ())?;
                Ok::<_, ()>((status, reason))
            })
            .await;
            match answer {
                Ok(Ok(done)) => (status, reason) = done,
                _ => sender = None,
            }
        }
        out.lock().unwrap().push(ClientOutcome {
            shard: *shard,
            write,
            status,
            reason,
            start_ns,
            end_ns: ledger.now_ns(),
        });
        if status == 0 {
            // Nothing listening, or a stopped process: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
