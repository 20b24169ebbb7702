//! The proxy listener's own HTTP/1.1 connection, on a real socket, byte by byte: pipelined
//! requests answered in order, keep-alive by version and `Connection`, bodies split anywhere,
//! HEAD, and a connection that closes when an answer leaves a request body unread (so that
//! the rest of that body is never read as a request).

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{within, Cluster, REQUEST_DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer as it came on the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// What the backend said it received: (method, path, body bytes).
    fn echoed(&self) -> (String, String, u64) {
        let v = self.json();
        (
            v["method"].as_str().unwrap_or_default().to_owned(),
            v["path"].as_str().unwrap_or_default().to_owned(),
            v["body_bytes"].as_u64().unwrap_or(u64::MAX),
        )
    }
}

/// A client connection reading answers as they come.
struct Client {
    socket: TcpStream,
    read: Vec<u8>,
}

impl Client {
    async fn connect(c: &Cluster) -> Client {
        let socket = TcpStream::connect(c.proxy()).await.expect("connect");
        socket.set_nodelay(true).expect("nodelay");
        Client {
            socket,
            read: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.expect("write");
    }

    /// More bytes; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        match self.socket.read(&mut buf).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.read.extend_from_slice(&buf[..n]);
                true
            }
        }
    }

    /// The next answer (`head_request`: it has no body whatever its headers say); `None` when
    /// the connection ended first.
    async fn answer(&mut self, head_request: bool) -> Option<Answer> {
        within(REQUEST_DEADLINE, "an answer", async {
            let (len, status, headers) = loop {
                let mut slots = [httparse::EMPTY_HEADER; 64];
                let mut resp = httparse::Response::new(&mut slots);
                match resp.parse(&self.read).expect("a well-formed answer head") {
                    httparse::Status::Complete(len) => {
                        let headers = resp
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_owned(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect::<Vec<_>>();
                        break (len, resp.code.unwrap_or(0), headers);
                    }
                    httparse::Status::Partial => {
                        if !self.fill().await {
                            return None;
                        }
                    }
                }
            };
            self.read.drain(..len);
            let mut answer = Answer {
                status,
                headers,
                body: Vec::new(),
            };
            if head_request || status == 204 || status == 304 {
                return Some(answer);
            }
            if answer.header("transfer-encoding") == Some("chunked") {
                answer.body = self.chunked().await?;
            } else {
                let n: usize = answer
                    .header("content-length")
                    .expect("a length or chunked")
                    .parse()
                    .expect("a numeric length");
                while self.read.len() < n {
                    if !self.fill().await {
                        return None;
                    }
                }
                answer.body = self.read.drain(..n).collect();
            }
            Some(answer)
        })
        .await
    }

    async fn chunked(&mut self) -> Option<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.read.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                if !self.fill().await {
                    return None;
                }
            };
            let size = usize::from_str_radix(
                std::str::from_utf8(&self.read[..line_end]).expect("ASCII"),
                16,
            )
            .expect("a chunk size");
            while self.read.len() < line_end + 2 + size + 2 {
                if !self.fill().await {
                    return None;
                }
            }
            body.extend_from_slice(&self.read[line_end + 2..line_end + 2 + size]);
            self.read.drain(..line_end + 2 + size + 2);
            if size == 0 {
                return Some(body);
            }
        }
    }

    /// Whether the gateway closed the connection (with nothing more to read).
    async fn closed(&mut self) -> bool {
        within(REQUEST_DEADLINE, "the end of the connection", async {
            let more = self.fill().await;
            !more && self.read.is_empty()
        })
        .await
    }
}

fn get(path: &str, key: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\nx-user-id: {key}\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let c = Cluster::start().await;
    let mut client = Client::connect(&c).await;
    // Four requests in one write: a GET, a POST with a length, a chunked POST, a GET that
    // closes the connection.
    let mut bytes = get("/orders/1", "user-1").into_bytes();
    bytes.extend_from_slice(
        b"POST /orders/2 HTTP/1.1\r\nHost: gw\r\nx-user-id: user-2\r\ncontent-length: 5\r\n\r\nhello",
    );
    bytes.extend_from_slice(
        b"POST /orders/3 HTTP/1.1\r\nHost: gw\r\nx-user-id: user-3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n",
    );
    bytes.extend_from_slice(
        b"GET /orders/4 HTTP/1.1\r\nHost: gw\r\nx-user-id: user-4\r\nconnection: close\r\n\r\n",
    );
    client.send(&bytes).await;
    let want = [
        ("GET", "/orders/1", 0),
        ("POST", "/orders/2", 5),
        ("POST", "/orders/3", 7),
        ("GET", "/orders/4", 0),
    ];
    for (i, (method, path, body)) in want.into_iter().enumerate() {
        let answer = client.answer(false).await.expect("an answer");
        assert_eq!(answer.status, 200, "answer {i}: {answer:?}");
        assert_eq!(
            answer.echoed(),
            (method.to_owned(), path.to_owned(), body),
            "answer {i}"
        );
        assert!(answer.header("date").is_some(), "answer {i} has no Date");
    }
    assert!(
        client.closed().await,
        "the connection stayed open after close"
    );
    assert_eq!(c.total_hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_clients_keep_the_connection_only_when_they_ask() {
    let c = Cluster::start().await;
    let mut client = Client::connect(&c).await;
    client
        .send(b"GET /orders/1 HTTP/1.0\r\nHost: gw\r\nx-user-id: user-1\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let first = client.answer(false).await.expect("an answer");
    assert_eq!(first.status, 200);
    assert_eq!(first.header("connection"), Some("keep-alive"));
    client
        .send(b"GET /orders/2 HTTP/1.0\r\nHost: gw\r\nx-user-id: user-2\r\n\r\n")
        .await;
    let second = client.answer(false).await.expect("a second answer");
    assert_eq!(second.status, 200);
    assert_eq!(second.echoed().1, "/orders/2");
    assert!(client.closed().await, "an HTTP/1.0 connection stayed open");

    // HTTP/1.1 keeps it unless told otherwise; `close` among other tokens ends it.
    let mut client = Client::connect(&c).await;
    client.send(get("/orders/5", "user-5").as_bytes()).await;
    let kept = client.answer(false).await.expect("an answer");
    assert_eq!(kept.header("connection"), None);
    client
        .send(b"GET /orders/6 HTTP/1.1\r\nHost: gw\r\nx-user-id: user-6\r\nConnection: te, Close\r\n\r\n")
        .await;
    let last = client.answer(false).await.expect("an answer");
    assert_eq!(last.status, 200);
    assert_eq!(last.header("connection"), Some("close"));
    assert!(client.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_split_anywhere_reach_the_backend_whole() {
    let c = Cluster::start().await;
    let mut client = Client::connect(&c).await;
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let crc = crc32fast::hash(&payload);
    // A fixed length, then chunked, each sent in small pieces that cut the head, the size
    // lines and their CRLFs anywhere.
    let mut fixed = format!(
        "PUT /orders/7 HTTP/1.1\r\nHost: gw\r\nx-user-id: user-7\r\ncontent-length: {}\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    fixed.extend_from_slice(&payload);
    let mut chunked =
        b"PUT /orders/8 HTTP/1.1\r\nHost: gw\r\nx-user-id: user-8\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for piece in payload.chunks(700) {
        chunked.extend_from_slice(format!("{:X}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\nx-trailer: t\r\n\r\n");
    for (what, bytes) in [("fixed", fixed), ("chunked", chunked)] {
        for piece in bytes.chunks(97) {
            client.send(piece).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let answer = client.answer(false).await.expect("an answer");
        assert_eq!(answer.status, 200, "{what}: {answer:?}");
        let v = answer.json();
        assert_eq!(
            v["body_bytes"].as_u64(),
            Some(payload.len() as u64),
            "{what}"
        );
        assert_eq!(v["body_crc32"].as_u64(), Some(u64::from(crc)), "{what}");
    }
    // The connection goes on after both.
    client.send(get("/orders/9", "user-9").as_bytes()).await;
    assert_eq!(client.answer(false).await.expect("an answer").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_answer_has_no_body_and_the_next_request_follows() {
    let c = Cluster::start().await;
    let mut client = Client::connect(&c).await;
    let mut bytes = b"HEAD /orders/1 HTTP/1.1\r\nHost: gw\r\nx-user-id: user-1\r\n\r\n".to_vec();
    bytes.extend_from_slice(get("/orders/2", "user-2").as_bytes());
    client.send(&bytes).await;
    let head = client.answer(true).await.expect("an answer to HEAD");
    // HEAD is not a route's method here: whatever the status, no body follows it, and the
    // next answer is read right behind its head.
    assert!(head.status < 500, "{head:?}");
    let next = client.answer(false).await.expect("the next answer");
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(next.echoed().1, "/orders/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_leaves_a_body_unread_closes_the_connection() {
    let c = Cluster::start().await;
    let mut client = Client::connect(&c).await;
    // No route: answered at once, without reading the body, of which only a part came.
    // What follows in the body looks like a request: it must never be read as one.
    let smuggled = get("/orders/1", "user-1");
    let head = format!(
        "POST /nowhere HTTP/1.1\r\nHost: gw\r\nx-user-id: user-1\r\ncontent-length: {}\r\n\r\n",
        smuggled.len() + 1000
    );
    client.send(head.as_bytes()).await;
    client.send(smuggled.as_bytes()).await;
    let answer = client.answer(false).await.expect("an answer");
    assert_eq!(answer.status, 404, "{answer:?}");
    assert!(
        client.closed().await,
        "the connection stayed open with a body unread"
    );
    assert_eq!(c.total_hits(), 0, "the body's bytes were read as a request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_takes_its_request_in_flight_with_it() {
    let c = Cluster::start().await;
    let inflight = "shardgate_inflight{set=\"core\"}";
    let mut client = Client::connect(&c).await;
    client
        .send(b"GET /orders/1 HTTP/1.1\r\nHost: gw\r\nx-user-id: user-1\r\nx-sim-delay-ms: 10000\r\n\r\n")
        .await;
    within(REQUEST_DEADLINE, "the request in flight", async {
        while c.metric(inflight).await != Some(1.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(client);
    within(REQUEST_DEADLINE, "the request given up", async {
        while c.metric(inflight).await != Some(0.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Past the route's 1 s timeout: had the request gone on, it would have been answered 504
    // (and counted so); given up, it was never answered.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = c.admin_get("/metrics").await.text();
    let answered: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("shardgate_requests_total{"))
        .collect();
    assert!(
        answered.iter().all(|l| !l.contains("status=\"504\"")),
        "the request went on after its client hung up: {answered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_still_buffered_at_a_half_close_are_answered() {
    let c = Cluster::start().await;
    let mut client = Client::connect(&c).await;
    // The first request takes its backend 400 ms (under the route's 1 s timeout), so the
    // client's end surely reaches the gateway while it is in flight, with the second buffered
    // behind it, however slowly this test's thread is scheduled between the write and the
    // half-close. (A close with nothing buffered behind the request in flight is taken as a
    // hang-up: `a_client_that_hangs_up_takes_its_request_in_flight_with_it`.)
    let mut bytes =
        b"GET /orders/1 HTTP/1.1\r\nHost: gw\r\nx-user-id: user-1\r\nx-sim-delay-ms: 400\r\n\r\n"
            .to_vec();
    bytes.extend_from_slice(get("/orders/2", "user-2").as_bytes());
    client.send(&bytes).await;
    // The client says it sends nothing more (as `nc -N` does) and waits for its answers.
    client.socket.shutdown().await.expect("half-close");
    for path in ["/orders/1", "/orders/2"] {
        let answer = client.answer(false).await.expect("an answer");
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        assert_eq!(answer.echoed().1, path);
    }
    assert!(
        client.closed().await,
        "the connection stayed open after the half-close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_on_both_sides_of_the_joined_size_arrive_whole_on_a_kept_connection() {
    // An answer whose body is small enough goes out in its head's buffer, a larger one as a
    // piece of its own: on one keep-alive connection, answers that grow across that size
    // (the backend echoes the padding header) each arrive whole, framed by their length.
    let c = Cluster::start().await;
    let mut client = Client::connect(&c).await;
    let (mut smaller, mut larger) = (0, 0);
    for pad in (3_600..4_600).step_by(97) {
        let request = format!(
            "GET /orders/{pad} HTTP/1.1\r\nHost: gw\r\nx-user-id: user-1\r\nx-pad: {}\r\n\r\n",
            "p".repeat(pad)
        );
        client.send(request.as_bytes()).await;
        let answer = client.answer(false).await.expect("an answer");
        assert_eq!(answer.status, 200, "pad {pad}: {answer:?}");
        assert_eq!(
            answer.header("content-length"),
            Some(answer.body.len().to_string().as_str()),
            "pad {pad}"
        );
        let echoed = answer.json();
        assert_eq!(echoed["path"], format!("/orders/{pad}"), "pad {pad}");
        assert_eq!(
            echoed["headers"]["x-pad"].as_str().map(str::len),
            Some(pad),
            "pad {pad}"
        );
        if answer.body.len() <= 4 * 1024 {
            smaller += 1;
        } else {
            larger += 1;
        }
    }
    assert!(
        smaller > 0 && larger > 0,
        "the answers did not cross the joined size: {smaller} at most 4 KiB, {larger} above"
    );
    assert_eq!(c.total_hits(), 11);
}
