//! Header hygiene on real sockets: what the backend receives from the gateway (every
//! `Connection` and `X-Forwarded-For` line counted), what the client gets back (502s naming no
//! backend), and that clients cannot steer routing with the gateway's own headers.

mod support;

use http::StatusCode;
use shardgate::control::topology::Shard;
use support::{get, Cluster};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_gateway_headers_do_not_steer_routing() {
    let c = Cluster::start().await;
    let topo = c.topology();
    // A key that `sh` does not serve, so a spoofed `x-shardgate-idc: sh` would show.
    let key = (0..)
        .map(|i| format!("spoof-{i}"))
        .find(|k| c.serving_idc_of(k) != "sh")
        .expect("some key is served elsewhere");
    let real_shard = Shard::of_key(key.as_bytes(), topo.shard_count).0;
    let fake_shard = ((real_shard + 512) % 1024).to_string();
    let serving = c.serving_idc_of(&key);
    let sh_hits = c.sim("sh", "core").hits();

    let r = c
        .send(get(
            "/orders",
            &[
                ("x-user-id", &key),
                ("x-shardgate-idc", "sh"),
                ("x-shardgate-shard", &fake_shard),
                ("x-shardgate-epoch", "999999"),
                ("x-shardgate-spill", "1"),
            ],
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.idc(), serving, "routing ignores x-shardgate-idc");
    assert_eq!(r.header("x-shardgate-idc"), Some(serving.as_str()));
    assert_eq!(r.shard(), Some(real_shard));
    // The backend sees the gateway's values, not the client's.
    let rev = topo.revision.to_string();
    assert_eq!(
        r.upstream_header("x-shardgate-idc").as_deref(),
        Some(serving.as_str())
    );
    let real = real_shard.to_string();
    assert_eq!(
        r.upstream_header("x-shardgate-shard").as_deref(),
        Some(real.as_str())
    );
    assert_eq!(
        r.upstream_header("x-shardgate-epoch").as_deref(),
        Some(rev.as_str())
    );
    assert_eq!(r.upstream_header("x-shardgate-spill"), None);
    assert_eq!(c.sim("sh", "core").hits(), sh_hits, "nothing went to sh");

    // On a non-sharded route a client's shard header is dropped, not passed on.
    let r = c
        .send(get(
            "/catalog",
            &[("x-shardgate-shard", "7"), ("x-shardgate-idc", "gz")],
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.idc(), "bj", "the local IDC");
    assert_eq!(r.upstream_header("x-shardgate-shard"), None);
    assert_eq!(r.upstream_header("x-shardgate-idc").as_deref(), Some("bj"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_gets_forwarding_headers_and_no_hop_by_hop_ones() {
    let c = Cluster::start().await;
    let key = "hygiene-1";
    let headers = [
        ("host", "shop.example.com:8443"),
        ("x-user-id", key),
        ("x-request-id", "req-abc_123.x:y"),
        ("x-forwarded-for", "203.0.113.9"),
        ("traceparent", TRACEPARENT),
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "s3cret"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("x-end-to-end", "kept"),
    ];
    // Control: sent straight to a backend, every one of these headers arrives, so their
    // absence below is the gateway's doing.
    let direct = support::send(c.sim("sh", "core").addr, get("/orders/1", &headers)).await;
    for name in ["x-hop-secret", "keep-alive", "te", "proxy-authorization"] {
        assert!(
            direct.upstream_header(name).is_some(),
            "the test client did not send `{name}`"
        );
    }

    let r = c.send(get("/orders/1", &headers)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let up = |name: &str| r.upstream_header(name);

    assert_eq!(up("x-request-id").as_deref(), Some("req-abc_123.x:y"));
    assert_eq!(
        up("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(up("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        up("x-forwarded-host").as_deref(),
        Some("shop.example.com:8443")
    );
    assert_eq!(up("traceparent").as_deref(), Some(TRACEPARENT));
    let rev = c.topology().revision.to_string();
    assert_eq!(up("x-shardgate-epoch").as_deref(), Some(rev.as_str()));
    assert_eq!(up("x-end-to-end").as_deref(), Some("kept"));
    for hop in ["x-hop-secret", "keep-alive", "te", "proxy-authorization"] {
        assert_eq!(up(hop), None, "hop-by-hop `{hop}` reached the backend");
    }
    if let Some(conn) = up("connection") {
        assert!(
            !conn.contains("x-hop-secret"),
            "the client's Connection header was forwarded: {conn}"
        );
    }

    // The client's answer names the IDC, the shard and the request id.
    assert_eq!(
        r.header("x-shardgate-idc"),
        Some(c.serving_idc_of(key).as_str())
    );
    assert_eq!(
        r.shard(),
        Some(Shard::of_key(key.as_bytes(), 1024).0),
        "x-shardgate-shard on the answer"
    );
    assert_eq!(r.header("x-request-id"), Some("req-abc_123.x:y"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_traces_are_started_when_missing_or_invalid() {
    let c = Cluster::start().await;

    // Nothing from the client: everything is generated.
    let a = c.send(get("/orders", &[("x-user-id", "fresh")])).await;
    let b = c.send(get("/orders", &[("x-user-id", "fresh")])).await;
    for r in [&a, &b] {
        assert_eq!(r.status, StatusCode::OK);
        let id = r.upstream_header("x-request-id").expect("a generated id");
        assert!(!id.is_empty());
        assert_eq!(r.header("x-request-id"), Some(id.as_str()), "same id back");
        let tp = r.upstream_header("traceparent").expect("a started trace");
        assert!(is_traceparent(&tp), "`{tp}` is a W3C traceparent");
        assert_eq!(
            r.upstream_header("x-forwarded-for").as_deref(),
            Some("127.0.0.1")
        );
    }
    assert_ne!(
        a.upstream_header("x-request-id"),
        b.upstream_header("x-request-id"),
        "every request gets its own id"
    );
    assert_ne!(
        a.upstream_header("traceparent"),
        b.upstream_header("traceparent"),
        "every request starts its own trace"
    );

    // Invalid values from the client are replaced, not passed on.
    let bad_id = "not a valid id!";
    let bad_tp = "00-zzzz-1234-01";
    let r = c
        .send(get(
            "/orders",
            &[
                ("x-user-id", "fresh"),
                ("x-request-id", bad_id),
                ("traceparent", bad_tp),
            ],
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let id = r.upstream_header("x-request-id").expect("a request id");
    assert_ne!(id, bad_id);
    assert_eq!(r.header("x-request-id"), Some(id.as_str()));
    let tp = r.upstream_header("traceparent").expect("a traceparent");
    assert_ne!(tp, bad_tp);
    assert!(is_traceparent(&tp), "`{tp}` is a W3C traceparent");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_and_forwarded_for_line_counts() {
    let c = Cluster::start().await;
    let headers = [
        ("x-user-id", "lines-1"),
        ("connection", "keep-alive"),
        ("connection", "x-hop-second"),
        ("x-hop-second", "s3cret"),
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-for", "198.51.100.7, 192.0.2.1"),
    ];
    // Control: sent straight to a backend, the header named by the second `Connection` line
    // arrives, so its absence below is the gateway's doing.
    let direct = support::send(c.sim("sh", "core").addr, get("/orders/1", &headers)).await;
    assert!(direct.upstream_header("x-hop-second").is_some());

    let r = c.send(get("/orders/1", &headers)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-hop-second"), None);
    assert_eq!(r.upstream_header("connection"), None);
    // Every line, in order, then the client's address: one line upstream.
    assert_eq!(
        r.upstream_header("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 198.51.100.7, 192.0.2.1, 127.0.0.1")
    );
    c.stop().await;
}

/// The detail of a gateway-made answer, checked for what must stay in the logs.
fn assert_no_upstream_internals(r: &support::Reply, port: u16) {
    let text = r.text();
    let v = r.json();
    let detail = v["detail"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(!detail.is_empty(), "{text}");
    for secret in [
        port.to_string().as_str(),
        "127.0.0.1",
        "os error",
        "refused",
        "tls",
        "handshake",
        "certificate",
    ] {
        assert!(!detail.contains(secret), "`{secret}` leaked: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_do_not_tell_clients_about_backends() {
    use http::Method;
    let c = Cluster::start().await;
    // A closed port behind `dead`: 502.
    let r = c
        .send(support::request(
            Method::POST,
            "/dead/1",
            &[("x-user-id", "u1")],
            "x",
        ))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_connect");
    let t = c.topology();
    let dead = t
        .sets
        .iter()
        .position(|s| s.name.as_str() == "dead")
        .expect("the dead set");
    let dead_port = t.idcs[0].pools[dead][0].addr.port();
    assert_no_upstream_internals(&r, dead_port);
    // A timeout: 504, with the route's limit but nothing about the backend.
    let r = c
        .send(get(
            "/slow",
            &[("x-user-id", "patient"), ("x-sim-delay-ms", "5000")],
        ))
        .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert_no_upstream_internals(&r, c.sim("sh", "core").addr.port());
    c.stop().await;

    // An IDC that speaks TLS to a backend that does not: the handshake fails (its error and
    // the backend's address go to the log only).
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(
        params,
        rcgen::KeyPair::generate().expect("a key pair"),
    )
    .expect("a CA");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write the CA");
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let plain_addr = plain.local_addr().expect("an address");
    let server = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = plain.accept().await {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let gw = support::gateway_on_topology(
        dir.path(),
        &format!(
            "cluster = \"t\"\n[sets.core]\n\n[[idcs]]\nname = \"far\"\npools.core = [\"{plain_addr}\"]\n\
             tls = {{ ca = \"{}\", server_name = \"api.far.internal\" }}\n\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nset = \"core\"\nsharded = false\n",
            ca_path.display()
        ),
        |_| {},
    )
    .await;
    let r = support::send(gw.proxy_addr, get("/api/x", &[])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_no_upstream_internals(&r, plain_addr.port());
    gw.shutdown().await;
    server.abort();
}

/// A backend answering each request on a kept connection with the answer its path names.
async fn scripted_backend() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("an address");
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&read[..end]).into_owned();
                    read.drain(..end + 4);
                    let answer: &[u8] = if head.starts_with("GET /api/changed ") {
                        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-secret\r\nx-secret: 1\r\n\
                          x-request-id: from-the-backend\r\nx-shardgate-idc: forged\r\n\
                          X-Mixed-Case:tight\r\nContent-Length: 2\r\n\r\nok"
                    } else if head.starts_with("GET /api/to-the-close ") {
                        // No length: the body runs to the close.
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nX-Mixed-Case:tight\r\n\r\nok")
                            .await;
                        return;
                    } else if head.starts_with("HEAD ") {
                        b"HTTP/1.1 200 OK\r\nX-Mixed-Case:tight\r\nContent-Length: 2\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\nX-Mixed-Case:tight\r\nServer: scripted\r\n\
                          x-twice: 1\r\nx-twice: 2\r\nContent-Length: 2\r\n\r\nok"
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, server)
}

/// What the gateway sends back for `request` on a fresh connection, read until `done` says it
/// is all there (or, with `to_close`, until the gateway closes the connection).
async fn raw_exchange(
    addr: std::net::SocketAddr,
    request: &str,
    to_close: bool,
    done: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    support::within(support::REQUEST_DEADLINE, "an answer", async {
        while to_close || !done(&read) {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                assert!(
                    to_close && done(&read),
                    "closed early: {:?}",
                    String::from_utf8_lossy(&read)
                );
                break;
            }
            read.extend_from_slice(&buf[..n]);
        }
        read
    })
    .await
}

/// One answer's head (up to and with the CRLF of its last line) and its body of `length`
/// bytes, when that much is there.
fn head_and_body(read: &[u8], length: usize) -> Option<(String, Vec<u8>)> {
    let end = read.windows(4).position(|w| w == b"\r\n\r\n")?;
    let body = read.get(end + 4..end + 4 + length)?;
    Some((
        String::from_utf8_lossy(&read[..end + 2]).into_owned(),
        body.to_vec(),
    ))
}

/// A whole HTTP/1.1 answer with a two-byte body to `request` on a fresh connection.
async fn raw_answer(addr: std::net::SocketAddr, request: &str) -> (String, Vec<u8>) {
    let read = raw_exchange(addr, request, false, |r| head_and_body(r, 2).is_some()).await;
    head_and_body(&read, 2).expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_header_lines_reach_the_client_and_the_gateway_still_owns_its_own() {
    let (backend, server) = scripted_backend().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let gw = support::gateway_on_topology(
        dir.path(),
        &format!(
            "cluster = \"t\"\n[sets.core]\n\n[[idcs]]\nname = \"far\"\npools.core = [\"{backend}\"]\n\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nset = \"core\"\nsharded = false\n"
        ),
        |_| {},
    )
    .await;

    // Lines the gateway leaves alone reach an HTTP/1.1 client byte for byte, in order,
    // followed by the gateway's own and a date the backend did not send.
    let (head, body) =
        raw_answer(gw.proxy_addr, "GET /api/plain HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!(body, b"ok");
    assert!(
        head.starts_with(
            "HTTP/1.1 200 OK\r\nX-Mixed-Case:tight\r\nServer: scripted\r\nx-twice: 1\r\nx-twice: 2\r\nContent-Length: 2\r\n"
        ),
        "{head}"
    );
    for own in [
        "\r\nx-shardgate-idc: far\r\n",
        "\r\nx-request-id: ",
        "\r\ndate: ",
    ] {
        assert!(head.contains(own), "{own:?} missing: {head}");
    }

    // Hop-by-hop lines (and those `Connection` names) go, and the gateway's headers replace
    // the backend's: the same rules as ever.
    let (head, body) = raw_answer(
        gw.proxy_addr,
        "GET /api/changed HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .await;
    assert_eq!(body, b"ok");
    let lower = head.to_ascii_lowercase();
    for gone in [
        "connection: keep-alive",
        "x-secret",
        "from-the-backend",
        "forged",
    ] {
        assert!(!lower.contains(gone), "{gone:?} passed on: {head}");
    }
    // This head went through the header map: its lines are written afresh.
    assert!(lower.contains("\r\nx-mixed-case: tight\r\n"), "{head}");
    assert!(lower.contains("\r\nx-shardgate-idc: far\r\n"), "{head}");
    assert_eq!(lower.matches("\r\nx-request-id: ").count(), 1, "{head}");

    // HEAD: the kept length goes with no body, and the next answer on the connection follows
    // straight after the head.
    let read = raw_exchange(
        gw.proxy_addr,
        "HEAD /api/plain HTTP/1.1\r\nHost: gw\r\n\r\nGET /api/plain HTTP/1.1\r\nHost: gw\r\n\r\n",
        false,
        |r| r.ends_with(b"\r\n\r\nok"),
    )
    .await;
    let (head, _) = head_and_body(&read, 0).expect("the HEAD answer");
    assert!(
        head.contains("\r\nX-Mixed-Case:tight\r\nContent-Length: 2\r\n"),
        "{head}"
    );
    assert!(
        read[head.len() + 2..].starts_with(b"HTTP/1.1 200 OK\r\nX-Mixed-Case:tight\r\n"),
        "the next answer follows the HEAD answer's head: {:?}",
        String::from_utf8_lossy(&read)
    );

    // An HTTP/1.0 client, and an answer whose body runs to the backend's close: the kept
    // lines, then the body to the end of the connection.
    let read = raw_exchange(
        gw.proxy_addr,
        "GET /api/to-the-close HTTP/1.0\r\nHost: gw\r\n\r\n",
        true,
        |r| r.ends_with(b"\r\n\r\nok"),
    )
    .await;
    let (head, body) = head_and_body(&read, 2).expect("an answer");
    assert!(head.contains("\r\nX-Mixed-Case:tight\r\n"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body, b"ok");

    // An HTTP/2 client gets the same lines as fields of its answer.
    let r = support::send_h2c(gw.proxy_addr, get("/api/plain", &[])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-mixed-case"), Some("tight"));
    assert_eq!(r.header("server"), Some("scripted"));
    let twice: Vec<_> = r.headers.get_all("x-twice").iter().collect();
    assert_eq!(twice, ["1", "2"]);
    assert_eq!(r.header("x-shardgate-idc"), Some("far"));
    assert_eq!(r.body.as_ref(), b"ok");

    gw.shutdown().await;
    server.abort();
}
