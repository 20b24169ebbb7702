//! The simulated backends' ledger: every sharded request a simulated IDC answered (shard, IDC,
//! method, request id, epochs, status, start and end), on one monotonic clock shared by all the
//! simulated IDCs of a run, so that `history` can tell whether two IDCs wrote a shard at once.

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// How many entries a ledger keeps by default: a few minutes of a test's load, a few MB.
pub const DEFAULT_CAP: usize = 1_000_000;

/// The status a backend answers when it refuses a request as sent by a stale owner (421
/// Misdirected Request): such a request was not applied.
pub const REFUSED_STATUS: u16 = 421;

/// One request a simulated backend answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `x-shardgate-shard`.
    pub shard: u32,
    /// The simulated IDC that answered.
    pub idc: String,
    pub set: String,
    pub method: String,
    /// `x-request-id` (empty when absent).
    pub request_id: String,
    /// `x-shardgate-owner-epoch`: the revision of the last change of the shard's owner, as
    /// the gateway knew it (absent from gateways that do not send it).
    pub owner_epoch: Option<u64>,
    /// `x-shardgate-epoch`: the revision of the snapshot the gateway routed by.
    pub epoch: Option<u64>,
    pub status: u16,
    /// Nanoseconds since the ledger's base, when the request arrived and when it was answered.
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Entry {
    /// A non-idempotent request (anything but GET, HEAD, OPTIONS): what the gateway fences.
    pub fn is_write(&self) -> bool {
        !matches!(self.method.as_str(), "GET" | "HEAD" | "OPTIONS")
    }

    /// Refused by the backend (421): not applied.
    pub fn refused(&self) -> bool {
        self.status == REFUSED_STATUS
    }

    /// A write the backend applied.
    pub fn applied_write(&self) -> bool {
        self.is_write() && !self.refused()
    }
}

#[derive(Default)]
struct Book {
    entries: Vec<Entry>,
    dropped: u64,
}

/// A bounded, shared ledger. Cheap enough for the request path of a simulated backend: one
/// short mutex hold per request.
pub struct Ledger {
    base: Instant,
    cap: usize,
    book: Mutex<Book>,
}

impl Ledger {
    /// A ledger whose clock starts now, keeping at most `cap` entries (later ones are counted
    /// as dropped, so a report can say that it is incomplete).
    pub fn new(cap: usize) -> Ledger {
        Ledger::with_base(Instant::now(), cap)
    }

    /// A ledger on the clock that started at `base`.
    pub fn with_base(base: Instant, cap: usize) -> Ledger {
        Ledger {
            base,
            cap,
            book: Mutex::new(Book::default()),
        }
    }

    /// Nanoseconds since the base: the clock every entry and every observed event is on.
    pub fn now_ns(&self) -> u64 {
        self.at_ns(Instant::now())
    }

    /// `at` on this ledger's clock (0 before the base).
    pub fn at_ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn record(&self, entry: Entry) {
        // A poisoned lock only means another request panicked mid-push; the book is still a
        // valid Vec, so keep recording rather than lose the history.
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if book.entries.len() >= self.cap {
            book.dropped += 1;
        } else {
            book.entries.push(entry);
        }
    }

    /// A copy of every entry kept so far, in the order they were answered.
    pub fn entries(&self) -> Vec<Entry> {
        self.book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .clone()
    }

    /// Entries not kept because the ledger was full.
    pub fn dropped(&self) -> u64 {
        self.book.lock().unwrap_or_else(|p| p.into_inner()).dropped
    }

    /// `{"dropped": n, "entries": [...]}`: what `GET /_ledger` on a simulated backend answers.
    pub fn to_json(&self) -> serde_json::Value {
        let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({ "dropped": book.dropped, "entries": book.entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(method: &str, status: u16) -> Entry {
        Entry {
            shard: 1,
            idc: "sh".into(),
            set: "core".into(),
            method: method.into(),
            request_id: "r".into(),
            owner_epoch: None,
            epoch: Some(3),
            status,
            start_ns: 0,
            end_ns: 1,
        }
    }

    #[test]
    fn a_full_ledger_counts_what_it_drops() {
        let l = Ledger::new(2);
        for _ in 0..5 {
            l.record(entry("POST", 200));
        }
        assert_eq!(l.entries().len(), 2);
        assert_eq!(l.dropped(), 3);
        assert_eq!(l.to_json()["dropped"], 3);
    }

    #[test]
    fn writes_reads_and_refusals() {
        assert!(entry("POST", 200).applied_write());
        assert!(entry("DELETE", 200).applied_write());
        assert!(!entry("GET", 200).is_write());
        assert!(!entry("POST", 421).applied_write());
        assert!(entry("POST", 421).refused());
    }

    /// `method path` to `addr` with `headers`; the status.
    async fn send(addr: std::net::SocketAddr, method: &str, headers: &[(&str, &str)]) -> u16 {
        use http_body_util::{BodyExt, Empty};
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut req = http::Request::builder().method(method).uri("/orders/1");
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let resp = sender
                .send_request(req.body(Empty::<bytes::Bytes>::new()).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            resp.into_body().collect().await.unwrap();
            status
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
            .await
            .expect("the simulated backend answers within 10 s")
    }

    #[tokio::test]
    async fn a_backend_records_what_it_answers_and_serves_its_ledger() {
        let ledger = std::sync::Arc::new(Ledger::new(DEFAULT_CAP));
        let addr = "127.0.0.1:0".parse().unwrap();
        let sim = crate::dev::sim::SimBackend::start_with_ledger(
            addr,
            "sh",
            "core",
            Some(ledger.clone()),
        )
        .await
        .unwrap();
        let sharded = [
            ("x-shardgate-shard", "7"),
            ("x-shardgate-epoch", "12"),
            ("x-shardgate-owner-epoch", "9"),
            ("x-request-id", "req-1"),
        ];
        assert_eq!(send(sim.addr, "POST", &sharded).await, 200);
        let mut refused = sharded.to_vec();
        refused.push(("x-sim-status", "421"));
        assert_eq!(send(sim.addr, "POST", &refused).await, 421);
        // Not sharded: not part of the history.
        assert_eq!(send(sim.addr, "GET", &[]).await, 200);
        let entries = ledger.entries();
        assert_eq!(entries.len(), 2, "{entries:?}");
        let e = &entries[0];
        assert_eq!(
            (e.shard, e.idc.as_str(), e.method.as_str()),
            (7, "sh", "POST")
        );
        assert_eq!((e.epoch, e.owner_epoch), (Some(12), Some(9)));
        assert_eq!(e.request_id, "req-1");
        assert!(e.applied_write() && e.start_ns <= e.end_ns);
        assert!(entries[1].refused() && !entries[1].applied_write());
        let (status, body) = crate::operator::admin_client::get(
            &format!("http://{}", sim.addr),
            "/_ledger",
            None,
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["entries"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["entries"][1]["status"], 421);
        sim.stop().await;
    }

    #[test]
    fn the_clock_is_the_base_s() {
        let base = Instant::now();
        let l = Ledger::with_base(base, 1);
        assert_eq!(l.at_ns(base), 0);
        assert_eq!(
            l.at_ns(base + std::time::Duration::from_millis(2)),
            2_000_000
        );
    }
}
