//! Hostile clients on a real socket: request-smuggling payloads and invalid bytes (400, nothing
//! forwarded), both Content-Length and Transfer-Encoding (400 with the JSON body, the
//! connection closed, also behind an upgrade that did not happen), oversized headers (431 with
//! the JSON body), slowloris (closed by the header deadline), the
//! connection limit, and the admin token.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{get, within, Cluster, ConfigTweak, Options, REQUEST_DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `payload` on a fresh connection and returns the status of the answer's head, or
/// `None` when the gateway closed the connection without answering.
async fn raw_status(addr: std::net::SocketAddr, payload: &[u8]) -> Option<u16> {
    within(REQUEST_DEADLINE, "a raw exchange", async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // The gateway may answer and close before reading everything; a failed write is
        // not the test's concern, the answer is.
        let _ = s.write_all(payload).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&got);
        text.strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_payloads_and_invalid_bytes_get_400_and_nothing_is_forwarded() {
    let c = Cluster::start().await;
    let payloads: [(&str, &[u8]); 6] = [
        (
            "conflicting Content-Length",
            b"POST /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "chunked not the final transfer coding",
            b"POST /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "a control byte in a header value",
            b"GET /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u\x011\r\n\r\n",
        ),
        (
            "a space in a header name",
            b"GET /orders HTTP/1.1\r\nHost: gw\r\nx user-id: u1\r\n\r\n",
        ),
        (
            "an obsolete line folding",
            b"GET /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nx-a: b\r\n c\r\n\r\n",
        ),
        (
            "absolute form naming another host than Host",
            b"GET http://evil.example/orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nConnection: close\r\n\r\n",
        ),
    ];
    for (what, payload) in payloads {
        let status = raw_status(c.proxy(), payload).await;
        assert_eq!(status, Some(400), "{what}");
    }
    assert_eq!(c.total_hits(), 0, "a refused request reached a backend");

    // The control: a well-formed request with the same shape is forwarded, and absolute form
    // agreeing with Host is accepted.
    let ok = raw_status(
        c.proxy(),
        b"GET http://gw/orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(ok, Some(200));
    assert_eq!(c.total_hits(), 1);
    c.stop().await;
}

/// Sends `payload` on a fresh connection and reads until the gateway closes it: every
/// answer, as text.
async fn raw_exchange(addr: std::net::SocketAddr, payload: &[u8]) -> String {
    within(REQUEST_DEADLINE, "a raw exchange", async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(payload).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    })
    .await
}

/// The JSON body of a single gateway-made answer.
fn json_body(answer: &str) -> serde_json::Value {
    let body = &answer[answer.find("\r\n\r\n").expect("a head") + 4..];
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused_and_never_forwarded() {
    let c = Cluster::start().await;
    let payloads: [(&str, &[u8]); 3] = [
        (
            "Content-Length first (CL.TE)",
            b"POST /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /orders/smuggled HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\n\r\n",
        ),
        (
            "Transfer-Encoding first (TE.CL)",
            b"POST /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGET /orders/smuggled HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\n\r\n0\r\n\r\n",
        ),
        (
            "obfuscated coding name and spacing",
            b"POST /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\ncontent-length:  3\r\ntransfer-encoding: CHUNKED\r\n\r\n0\r\n\r\n",
        ),
    ];
    for (what, payload) in payloads {
        let answer = raw_exchange(c.proxy(), payload).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "{what}: one answer, then the connection is closed: {answer}"
        );
        let v = json_body(&answer);
        assert_eq!(v["error"], "bad_request", "{what}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap_or("")
                .contains("Transfer-Encoding"),
            "{what}: {v}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("x-request-id:"),
            "{answer}"
        );
    }
    assert_eq!(c.total_hits(), 0, "a refused request reached a backend");

    // Behind a clean keep-alive request on the same connection: the first is served, the
    // smuggling one refused, and nothing after it is read.
    let answer = raw_exchange(
        c.proxy(),
        b"GET /orders/1 HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\n\r\n\
          POST /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /orders/smuggled HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 400").count(), 1, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{answer}");
    assert_eq!(
        c.total_hits(),
        1,
        "only the clean request reached a backend"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_that_did_not_happen_does_not_turn_the_gate_off() {
    let c = Cluster::start().await;
    // `orders` does not proxy WebSocket: the upgrade headers are stripped, the backend answers
    // 200, and the connection stays HTTP/1.1. The smuggling request behind it is refused.
    let answer = raw_exchange(
        c.proxy(),
        b"GET /orders/1 HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\
          POST /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /orders/smuggled HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 400").count(), 1, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{answer}");
    assert!(answer.contains("Transfer-Encoding"), "{answer}");
    assert_eq!(
        c.total_hits(),
        1,
        "only the upgrade-less GET reached a backend"
    );

    // A CONNECT (no route here) does not turn it off either.
    let answer = raw_exchange(
        c.proxy(),
        b"CONNECT gw:443 HTTP/1.1\r\nHost: gw:443\r\n\r\n\
          POST /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /orders/smuggled HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 400").count(), 1, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{answer}");
    assert_eq!(
        c.total_hits(),
        1,
        "nothing behind the CONNECT reached a backend"
    );

    // Clean requests behind a refused upgrade are served, one after the other.
    let answer = raw_exchange(
        c.proxy(),
        b"GET /orders/1 HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\
          GET /orders/2 HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    assert_eq!(c.total_hits(), 3);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let c = Cluster::start().await;
    let mut payload = b"GET /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\nx-big: ".to_vec();
    payload.extend(std::iter::repeat_n(b'a', 70 * 1024));
    payload.extend_from_slice(b"\r\n\r\n");
    assert_eq!(raw_status(c.proxy(), &payload).await, Some(431));
    // With the standard JSON body, for a head past the byte limit and for too many fields.
    let answer = raw_exchange(c.proxy(), &payload).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(json_body(&answer)["error"], "header_too_large");
    let mut many = b"GET /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\n".to_vec();
    for i in 0..120 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let answer = raw_exchange(c.proxy(), &many).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(json_body(&answer)["error"], "header_too_large");
    assert_eq!(c.total_hits(), 0);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_by_the_header_deadline() {
    let c = Cluster::start_with(Options {
        tweak: ConfigTweak::new(|c| c.timeouts.header_read = Duration::from_millis(200)),
        ..Options::default()
    })
    .await;
    let mut s = TcpStream::connect(c.proxy()).await.expect("connect");
    s.write_all(b"GET /orders HTTP/1.1\r\nHost: gw\r\n")
        .await
        .expect("send the first line");
    // One more header line every 50 ms, never finishing the head, until the gateway closes.
    let closed = within(
        REQUEST_DEADLINE,
        "the gateway to close a slow head",
        async {
            let mut buf = [0u8; 256];
            for i in 0u64.. {
                if s.write_all(format!("x-slow-{i}: a\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return true;
                }
                match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) => return false,
                    Err(_) => {}
                }
            }
            false
        },
    )
    .await;
    assert!(closed, "the gateway answered instead of closing");
    assert_eq!(c.total_hits(), 0);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed() {
    let c = Cluster::start_with(Options {
        tweak: ConfigTweak::new(|c| c.limits.max_connections = 2),
        ..Options::default()
    })
    .await;
    let proxy = c.proxy();
    let mut held = Vec::new();
    for key in ["u1", "u2"] {
        let stream = TcpStream::connect(proxy).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        let task = tokio::spawn(conn);
        let mut req = get("/orders", &[("x-user-id", key)]);
        req.headers_mut()
            .insert(http::header::HOST, "gw".parse().expect("a host"));
        let resp = within(REQUEST_DEADLINE, "a request", sender.send_request(req))
            .await
            .expect("an answer");
        assert_eq!(resp.status(), StatusCode::OK);
        held.push((sender, task));
    }
    // The third is accepted and closed at once.
    let mut third = TcpStream::connect(proxy).await.expect("connect");
    let mut buf = [0u8; 64];
    let _ = third
        .write_all(b"GET /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u3\r\n\r\n")
        .await;
    let read = within(
        REQUEST_DEADLINE,
        "the third connection to close",
        third.read(&mut buf),
    )
    .await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // Closing one frees a slot.
    let (sender, task) = held.pop().expect("a held connection");
    drop(sender);
    let _ = within(REQUEST_DEADLINE, "a connection to end", task).await;
    support::eventually("a slot to be free again", || async {
        support::try_send(proxy, get("/orders", &[("x-user-id", "u4")]))
            .await
            .ok()
            .filter(|r| r.status == StatusCode::OK)
    })
    .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_everything_but_healthz() {
    let c = Cluster::start_with(Options {
        tweak: ConfigTweak::new(|c| c.admin_token = Some("s3cret".into())),
        ..Options::default()
    })
    .await;
    let admin = c.admin();
    let ask = |path: &'static str, auth: Option<&'static str>| async move {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        support::send(admin, get(path, &headers)).await.status
    };
    assert_eq!(ask("/healthz", None).await, StatusCode::OK);
    for path in [
        "/status",
        "/metrics",
        "/readyz",
        "/topology",
        "/explain?key=u1",
    ] {
        assert_eq!(ask(path, None).await, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            ask(path, Some("Bearer wrong")).await,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            ask(path, Some("Bearer s3cret-and-more")).await,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            ask(path, Some("s3cret")).await,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            ask(path, Some("Bearer s3cret")).await,
            StatusCode::OK,
            "{path}"
        );
    }
    // The proxy listener never serves admin paths, token or not.
    let r = c
        .send(get("/status", &[("authorization", "Bearer s3cret")]))
        .await;
    assert_ne!(r.status, StatusCode::OK);
    c.stop().await;
}

#[test]
fn admin_off_loopback_needs_a_token() {
    let raw: shardgate::config::RawConfig =
        toml::from_str("topology = 't.toml'\nadmin = '0.0.0.0:9901'\n").expect("TOML");
    let err = raw.into_config().expect_err("refused").to_string();
    assert!(err.contains("admin token"), "{err}");
    let raw: shardgate::config::RawConfig =
        toml::from_str("topology = 't.toml'\nadmin = '0.0.0.0:9901'\nadmin_token = 't'\n")
            .expect("TOML");
    assert!(raw.into_config().is_ok());
}

const SMALL_ROUTE: &str = r#"
[[routes]]
name = "small"
path_prefix = "/small"
methods = ["POST"]
set = "core"
key = ["header:x-user-id"]
retries = 0
max_body_bytes = 1024
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_route_limit_get_413() {
    let c = Cluster::start_with(Options {
        extra_toml: SMALL_ROUTE.into(),
        ..Options::default()
    })
    .await;
    let post = |body: support::ClientBody| {
        http::Request::post("/small")
            .header("x-user-id", "u1")
            .body(body)
            .expect("a request")
    };
    let full = |n: usize| {
        http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
            http_body_util::Full::new(bytes::Bytes::from(vec![b'a'; n])),
            |e| match e {},
        ))
    };
    // A declared length past the limit: refused before anything is sent.
    let r = c.send(post(full(2048))).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert_eq!(r.json()["error"], "payload_too_large");
    assert_eq!(c.total_hits(), 0);
    // Within the limit: forwarded whole.
    let r = c.send(post(full(1024))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["body_bytes"], 1024);

    // A streamed body (no length) that goes past the limit on the way.
    let (tx, body) = support::channel_body();
    let feeder = tokio::spawn(async move {
        for i in 0..4 {
            if tx.send(support::pattern_chunk(i, 512)).await.is_err() {
                break;
            }
        }
    });
    let r = c.send(post(body)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    let _ = within(REQUEST_DEADLINE, "the body feeder", feeder).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_over_h2c_get_431() {
    let c = Cluster::start().await;
    let big = "a".repeat(70 * 1024);
    let r = support::send_h2c(
        c.proxy(),
        get("/orders", &[("x-user-id", "u1"), ("x-big", &big)]),
    )
    .await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(c.total_hits(), 0);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_rapid_reset_flood_loses_its_connection() {
    let c = Cluster::start_with(Options {
        tweak: ConfigTweak::new(|c| c.limits.h2_max_pending_accept_reset_streams = 5),
        ..Options::default()
    })
    .await;
    let tcp = TcpStream::connect(c.proxy()).await.expect("connect");
    let (mut client, conn) = within(
        REQUEST_DEADLINE,
        "an h2 handshake",
        h2::client::handshake(tcp),
    )
    .await
    .expect("an h2 handshake");
    let driver = tokio::spawn(conn);
    // Open streams and cancel each at once (HEADERS then RST_STREAM in one write), as the
    // CVE-2023-44487 attack does, until the gateway closes the connection.
    let closed = within(REQUEST_DEADLINE, "the flood to be cut off", async {
        for _ in 0..10_000 {
            let ready = std::future::poll_fn(|cx| client.poll_ready(cx)).await;
            if ready.is_err() {
                return true;
            }
            let req = http::Request::get(format!("http://{}/orders", c.proxy()))
                .header("x-user-id", "u1")
                .body(())
                .expect("a request");
            match client.send_request(req, true) {
                Ok((response, _)) => drop(response),
                Err(_) => return true,
            }
        }
        false
    })
    .await;
    assert!(
        closed,
        "10000 reset streams and the connection is still open"
    );
    let ended = within(REQUEST_DEADLINE, "the h2 connection to end", driver)
        .await
        .expect("the connection task");
    let err = ended.expect_err("the gateway ends the connection with an error");
    // The gateway sends GOAWAY ENHANCE_YOUR_CALM and closes; a client still writing its flood
    // may hit the closed socket (broken pipe, reset) before it reads the GOAWAY.
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "the connection ended for another reason: {err}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_max_concurrent_streams_is_advertised() {
    let c = Cluster::start_with(Options {
        tweak: ConfigTweak::new(|c| c.limits.h2_max_concurrent_streams = 3),
        ..Options::default()
    })
    .await;
    let tcp = TcpStream::connect(c.proxy()).await.expect("connect");
    let (mut client, mut conn) = within(
        REQUEST_DEADLINE,
        "an h2 handshake",
        h2::client::handshake(tcp),
    )
    .await
    .expect("an h2 handshake");
    let req = http::Request::get(format!("http://{}/orders", c.proxy()))
        .header("x-user-id", "u1")
        .body(())
        .expect("a request");
    let (response, _) = client.send_request(req, true).expect("send a request");
    // Drive the connection here until the answer is in: by then the gateway's SETTINGS are.
    let response = within(REQUEST_DEADLINE, "an h2 answer", async {
        tokio::select! {
            r = response => r,
            r = &mut conn => panic!("the connection ended first: {r:?}"),
        }
    })
    .await
    .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(conn.max_concurrent_send_streams(), 3);
    drop((client, conn));
    c.stop().await;
}
