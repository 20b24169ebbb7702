//! The HTTP/1.1 client over real loopback sockets: what goes on the wire, how answers are
//! framed, which are refused, and when a connection may carry the next request.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

const DEADLINE: Duration = Duration::from_secs(5);

/// A client connection and the backend's end of it.
async fn pair() -> (Http1, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let client = TcpStream::connect(addr).await.expect("connect");
    let (backend, _) = listener.accept().await.expect("accept");
    (Http1::new(Box::new(client)), backend)
}

fn request(method: Method, target: &str, body: RequestBody) -> Request<RequestBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = target.parse().expect("target");
    req.headers_mut()
        .insert(http::header::HOST, HeaderValue::from_static("orders"));
    req
}

/// Sends `req` on `conn` (its head by reference, as the pool does), with no gateway headers.
async fn send(conn: &mut Http1, req: Request<RequestBody>) -> Result<Response<()>, Failure> {
    let (parts, body) = req.into_parts();
    conn.send(&Request::from_parts(parts, ()), &Stamp::default(), body)
        .await
        .map(whole)
}

/// The response with its header lines kept as they came put in its map, as the listener does
/// for a client they cannot go to as they are.
fn whole(resp: Response<Option<HeadLines>>) -> Response<()> {
    let (mut parts, lines) = resp.into_parts();
    if let Some(lines) = lines {
        lines.fill(&mut parts.headers);
    }
    Response::from_parts(parts, ())
}

/// Reads what the client sent until `until` is in it.
async fn read_until(backend: &mut TcpStream, until: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(until.len()).any(|w| w == until) {
        let n = tokio::time::timeout(DEADLINE, backend.read(&mut buf))
            .await
            .expect("the client's bytes in time")
            .expect("read");
        assert!(
            n > 0,
            "the client closed; got {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// The rest of the response body, read to its end (or its error).
async fn read_body(conn: &mut Http1) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    loop {
        let next = tokio::time::timeout(DEADLINE, poll_fn(|cx| conn.poll_body(cx)))
            .await
            .expect("the body in time");
        match next {
            Some(bytes) => body.extend_from_slice(&bytes?),
            None => return Ok(body),
        }
    }
}

/// Sends `req`, answers with `answer` (written in pieces), and returns the response and its
/// body, read whole.
async fn exchange(
    conn: &mut Http1,
    backend: &mut TcpStream,
    req: Request<RequestBody>,
    answer: &[&[u8]],
) -> Result<(Response<()>, Vec<u8>), Failure> {
    exchange_stamped(conn, backend, req, &Stamp::default(), answer).await
}

/// `exchange`, with the gateway's headers in `stamp`.
async fn exchange_stamped(
    conn: &mut Http1,
    backend: &mut TcpStream,
    req: Request<RequestBody>,
    stamp: &Stamp<'_>,
    answer: &[&[u8]],
) -> Result<(Response<()>, Vec<u8>), Failure> {
    for piece in answer {
        backend.write_all(piece).await.expect("write the answer");
    }
    let (parts, body) = req.into_parts();
    let head = Request::from_parts(parts, ());
    let resp = tokio::time::timeout(DEADLINE, conn.send(&head, stamp, body))
        .await
        .expect("a head in time")?;
    Ok((whole(resp), read_body(conn).await?))
}

#[tokio::test]
async fn a_get_goes_out_as_one_head_and_its_sized_answer_comes_back_whole() {
    let (mut conn, mut backend) = pair().await;
    let (resp, body) = exchange(
        &mut conn,
        &mut backend,
        request(Method::GET, "/orders/1?x=2", RequestBody::Empty),
        &[
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Idc: sh\r\n\r\nhello",
            b" world",
        ],
    )
    .await
    .expect("the exchange");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-idc"], "sh");
    assert_eq!(body, b"hello world");
    let sent = read_until(&mut backend, b"\r\n\r\n").await;
    assert_eq!(sent, b"GET /orders/1?x=2 HTTP/1.1\r\nhost: orders\r\n\r\n");
    assert!(
        conn.reusable(),
        "a sized answer read whole leaves the connection reusable"
    );
    conn.recycle();
    assert!(!conn.poll_closed(), "an open idle connection is not closed");

    // The same connection carries the next exchange.
    let (resp, body) = exchange(
        &mut conn,
        &mut backend,
        request(Method::GET, "/orders/2", RequestBody::Empty),
        &[b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"],
    )
    .await
    .expect("the second exchange");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(body.is_empty());
    assert!(conn.reusable());
}

#[tokio::test]
async fn the_gateways_headers_follow_the_clients_and_replace_theirs() {
    let (mut conn, mut backend) = pair().await;
    let mut req = request(
        Method::POST,
        "/orders",
        RequestBody::Kept(Some(Bytes::from_static(b"{}"))),
    );
    let h = req.headers_mut();
    h.insert("x-user-id", HeaderValue::from_static("7"));
    h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
    h.insert("x-request-id", HeaderValue::from_static("client-id"));
    h.insert(
        "x-shardgate-idc",
        HeaderValue::from_static("folded-earlier"),
    );
    h.insert("content-length", HeaderValue::from_static("2"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    let stamp = Stamp {
        host: Some(HeaderValue::from_static("api.example.com")),
        forwarded_for: Some(HeaderValue::from_static("203.0.113.9, 127.0.0.1")),
        request_id: Some(HeaderValue::from_static("client-id")),
        idc: Some(std::borrow::Cow::Owned(HeaderValue::from_static("sh"))),
        spill: true,
        ..Stamp::default()
    };
    let (resp, _) = exchange_stamped(
        &mut conn,
        &mut backend,
        req,
        &stamp,
        &[b"HTTP/1.1 204 No Content\r\n\r\n"],
    )
    .await
    .expect("the exchange");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let sent = read_until(&mut backend, b"\r\n\r\n{}").await;
    assert_eq!(
        String::from_utf8_lossy(&sent),
        "POST /orders HTTP/1.1\r\n\
         host: api.example.com\r\n\
         x-user-id: 7\r\n\
         accept: */*\r\n\
         x-forwarded-host: api.example.com\r\n\
         x-forwarded-for: 203.0.113.9, 127.0.0.1\r\n\
         x-request-id: client-id\r\n\
         x-shardgate-idc: sh\r\n\
         x-shardgate-spill: 1\r\n\
         content-length: 2\r\n\r\n{}"
    );
}

#[tokio::test]
async fn kept_bodies_on_both_sides_of_the_joined_size_go_whole_after_their_head() {
    // Up to JOINED_BODY the body is written in the head's buffer; past it, as a piece of its
    // own: the backend reads the same bytes either way.
    for len in [JOINED_BODY, JOINED_BODY + 1] {
        let (mut conn, mut backend) = pair().await;
        let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let (resp, _) = exchange(
            &mut conn,
            &mut backend,
            request(
                Method::PUT,
                "/orders/7",
                RequestBody::Kept(Some(Bytes::from(body.clone()))),
            ),
            &[b"HTTP/1.1 204 No Content\r\n\r\n"],
        )
        .await
        .expect("the exchange");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let head =
            format!("PUT /orders/7 HTTP/1.1\r\nhost: orders\r\ncontent-length: {len}\r\n\r\n");
        let mut want = head.into_bytes();
        want.extend_from_slice(&body);
        let mut sent = Vec::new();
        while sent.len() < want.len() {
            let mut buf = [0u8; 8192];
            let n = tokio::time::timeout(DEADLINE, backend.read(&mut buf))
                .await
                .expect("the client's bytes in time")
                .expect("read");
            assert!(n > 0, "the client closed after {} bytes", sent.len());
            sent.extend_from_slice(&buf[..n]);
        }
        assert_eq!(sent, want, "a {len}-byte body");
        assert!(
            conn.reusable(),
            "a {len}-byte body sent whole leaves it reusable"
        );
    }
}

#[tokio::test]
async fn a_kept_body_goes_with_its_length_and_a_chunked_answer_is_decoded() {
    let (mut conn, mut backend) = pair().await;
    let (resp, body) = exchange(
        &mut conn,
        &mut backend,
        request(
            Method::POST,
            "/orders",
            RequestBody::Kept(Some(Bytes::from_static(b"{\"a\":1}"))),
        ),
        &[
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"4;ext=1\r\nabcd\r\n",
            b"3\r\nefg\r\n0\r\nx-trailer: t\r\n\r\n",
        ],
    )
    .await
    .expect("the exchange");
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        body, b"abcdefg",
        "chunks joined, extension and trailer left out"
    );
    let sent = read_until(&mut backend, b"{\"a\":1}").await;
    assert_eq!(
        sent,
        b"POST /orders HTTP/1.1\r\nhost: orders\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
    );
    assert!(
        conn.reusable(),
        "a chunked answer read to its last chunk leaves it reusable"
    );
}

#[tokio::test]
async fn unusual_answers_are_read_whole() {
    /// The answer, the body read, the content-length passed on, and what the case shows.
    type Case = (
        &'static [u8],
        &'static [u8],
        Option<&'static str>,
        &'static str,
    );
    let cases: [Case; 2] = [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"ok",
            None,
            "a content-length beside transfer-encoding is never passed on; chunking frames the body",
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"ok",
            Some("2"),
            "informational answers are skipped",
        ),
    ];
    for (answer, body, length, what) in cases {
        let (_, got) = get_once(answer).await;
        let (resp, got_body) = got.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(resp.status(), StatusCode::OK, "{what}");
        assert_eq!(got_body, body, "{what}");
        assert_eq!(
            resp.headers().get(CONTENT_LENGTH).map(|v| v.as_bytes()),
            length.map(str::as_bytes),
            "{what}"
        );
    }
}

#[tokio::test]
async fn an_answer_without_a_length_is_read_to_the_close_and_not_reused() {
    let (mut conn, mut backend) = pair().await;
    let req = request(Method::GET, "/", RequestBody::Empty);
    backend
        .write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        .await
        .expect("write");
    let resp = send(&mut conn, req).await.expect("the head");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(conn.body_length(), None);
    backend.shutdown().await.expect("close");
    let body = read_body(&mut conn).await.expect("the body");
    assert_eq!(body, b"until the end");
    assert!(!conn.reusable());
}

/// A new connection that sent a GET and read `answer` whole (or failed to).
async fn get_once(answer: &[u8]) -> (Http1, Result<(Response<()>, Vec<u8>), Failure>) {
    let (mut conn, mut backend) = pair().await;
    let got = exchange(
        &mut conn,
        &mut backend,
        request(Method::GET, "/", RequestBody::Empty),
        &[answer],
    )
    .await;
    (conn, got)
}

#[tokio::test]
async fn connection_close_and_http_1_0_answers_are_not_reused() {
    let cases: [(&[u8], bool, &str); 4] = [
        (
            b"HTTP/1.0 200 OK\r\nconnection: close, keep-alive\r\ncontent-length: 0\r\n\r\n",
            false,
            "HTTP/1.0 saying close and keep-alive",
        ),
        (
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            false,
            "connection: close",
        ),
        (
            b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
            false,
            "HTTP/1.0 without keep-alive",
        ),
        (
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            true,
            "HTTP/1.0 with keep-alive",
        ),
    ];
    for (answer, reusable, what) in cases {
        let (conn, got) = get_once(answer).await;
        assert!(got.is_ok(), "{what}: {:?}", got.err());
        assert_eq!(conn.reusable(), reusable, "{what}");
    }
}

#[tokio::test]
async fn a_head_answer_has_no_body_whatever_its_length_says() {
    let (mut conn, mut backend) = pair().await;
    let (resp, body) = exchange(
        &mut conn,
        &mut backend,
        request(Method::HEAD, "/", RequestBody::Empty),
        &[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"],
    )
    .await
    .expect("the exchange");
    assert_eq!(resp.headers()[CONTENT_LENGTH], "5");
    assert!(body.is_empty());
    assert!(conn.reusable());
}

#[tokio::test]
async fn malformed_answers_are_errors() {
    let cases: [(&[u8], &str); 9] = [
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2 \r\nok\r\n0\r\n\r\n",
            "a blank after a chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\r\nok\r\n0\r\n\r\n",
            "a bare CR after a chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
            "two lengths",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\nabcd",
            "a list of two lengths",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\nabc",
            "a signed length",
        ),
        (
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "chunked HTTP/1.0",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "a chunk size",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            "an unasked 101",
        ),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "a status"),
    ];
    for (answer, what) in cases {
        let (conn, got) = get_once(answer).await;
        assert!(
            got.is_err(),
            "{what}: accepted as {:?}",
            got.map(|(r, b)| (r.status(), b))
        );
        assert!(!conn.reusable(), "{what}: the connection is not reused");
    }
}

#[tokio::test]
async fn too_many_header_lines_are_an_error() {
    let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        answer.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    answer.extend_from_slice(b"content-length: 0\r\n\r\n");
    let (_, got) = get_once(&answer).await;
    assert!(matches!(got, Err(Failure::Protocol(_))), "{:?}", got.err());
}

#[tokio::test]
async fn a_close_before_the_head_and_a_body_cut_short_are_errors() {
    let (mut conn, mut backend) = pair().await;
    backend.shutdown().await.expect("close");
    let got = send(&mut conn, request(Method::GET, "/", RequestBody::Empty)).await;
    assert!(
        matches!(got, Err(Failure::Closed)),
        "a close before a byte of an answer: {:?}",
        got.map(|r| r.status())
    );

    let (mut conn, mut backend) = pair().await;
    backend
        .write_all(b"HTTP/1.1 200 OK\r\ncont")
        .await
        .expect("write");
    backend.shutdown().await.expect("close");
    let got = send(&mut conn, request(Method::GET, "/", RequestBody::Empty)).await;
    assert!(
        matches!(got, Err(Failure::Protocol(_))),
        "a close in the middle of a head: {:?}",
        got.map(|r| r.status())
    );

    let (mut conn, mut backend) = pair().await;
    let got = async {
        backend
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
            .await
            .expect("write");
        let _head = send(&mut conn, request(Method::GET, "/", RequestBody::Empty)).await?;
        backend.shutdown().await.expect("close");
        read_body(&mut conn).await
    }
    .await;
    assert!(got.is_err(), "a body shorter than its length: {got:?}");
    assert!(!conn.reusable());
}

#[tokio::test]
async fn a_backend_that_closed_while_idle_is_seen_closed() {
    let (mut conn, backend) = pair().await;
    assert!(!conn.poll_closed());
    drop(backend);
    let mut closed = false;
    for _ in 0..50 {
        if conn.poll_closed() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the backend's close was never seen");
}

#[test]
fn framing_rules() {
    let mut h = HeaderMap::new();
    assert_eq!(FramingLines::of(&h).length, Ok(None));
    h.append(CONTENT_LENGTH, HeaderValue::from_static("10"));
    assert_eq!(FramingLines::of(&h).length, Ok(Some(10)));
    h.append(CONTENT_LENGTH, HeaderValue::from_static("10, 10"));
    assert_eq!(
        FramingLines::of(&h).length,
        Ok(Some(10)),
        "repeats of one length are one length"
    );
    h.append(CONTENT_LENGTH, HeaderValue::from_static(""));
    assert_eq!(FramingLines::of(&h).length, Err(()));
    let mut h = HeaderMap::new();
    h.append(
        CONTENT_LENGTH,
        HeaderValue::from_static("99999999999999999999"),
    );
    assert_eq!(FramingLines::of(&h).length, Err(()), "past u64");

    let framed = |h: &mut HeaderMap| {
        let lines = FramingLines::of(h);
        framing(StatusCode::OK, Version::HTTP_11, false, &lines, h)
    };
    let mut h = HeaderMap::new();
    h.append(TRANSFER_ENCODING, HeaderValue::from_static("gzip, chunked"));
    assert!(matches!(framed(&mut h), Ok(Decoder::Chunked(Chunk::Size))));
    h.append(TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
    assert!(
        matches!(framed(&mut h), Ok(Decoder::Eof)),
        "chunked must be the last coding"
    );
    let mut h = HeaderMap::new();
    h.append(CONTENT_LENGTH, HeaderValue::from_static("5"));
    h.append(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    assert!(matches!(framed(&mut h), Ok(Decoder::Chunked(Chunk::Size))));
    assert!(
        !h.contains_key(CONTENT_LENGTH),
        "a length beside transfer-encoding is dropped"
    );
}

#[tokio::test]
async fn the_client_decides_the_framing_of_what_it_sends() {
    // A transfer-encoding the request carries is not written; a kept body gets its length.
    let (mut conn, mut backend) = pair().await;
    let mut req = request(
        Method::PUT,
        "/orders/1",
        RequestBody::Kept(Some(Bytes::from_static(b"abc"))),
    );
    req.headers_mut()
        .insert(TRANSFER_ENCODING, HeaderValue::from_static("gzip, chunked"));
    req.headers_mut().insert(
        http::header::EXPECT,
        HeaderValue::from_static("100-continue"),
    );
    exchange(
        &mut conn,
        &mut backend,
        req,
        &[b"HTTP/1.1 204 No Content\r\n\r\n"],
    )
    .await
    .expect("the exchange");
    let sent = read_until(&mut backend, b"abc").await;
    assert_eq!(
        sent,
        b"PUT /orders/1 HTTP/1.1\r\nhost: orders\r\ncontent-length: 3\r\n\r\nabc"
    );
    assert!(conn.reusable(), "a 204 has no body: the exchange is over");

    // A body known empty adds nothing; a content-length the request carries is kept.
    let mut req = request(
        Method::POST,
        "/orders",
        RequestBody::Kept(Some(Bytes::new())),
    );
    req.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    conn.recycle();
    exchange(
        &mut conn,
        &mut backend,
        req,
        &[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"],
    )
    .await
    .expect("the second exchange");
    let sent = read_until(&mut backend, b"\r\n\r\n").await;
    assert_eq!(
        sent,
        b"POST /orders HTTP/1.1\r\nhost: orders\r\ncontent-length: 0\r\n\r\n"
    );
}

#[tokio::test]
async fn a_kept_body_shorter_than_its_declared_length_is_not_sent() {
    let (mut conn, _backend) = pair().await;
    let mut req = request(
        Method::POST,
        "/orders",
        RequestBody::Kept(Some(Bytes::from_static(b"abc"))),
    );
    req.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from_static("10"));
    let got = send(&mut conn, req).await;
    assert!(
        matches!(got, Err(Failure::Client(_))),
        "a body short of its length: {:?}",
        got.map(|r| r.status())
    );
}

#[tokio::test]
async fn a_head_arriving_a_byte_at_a_time_is_read_once_whole() {
    let (mut conn, mut backend) = pair().await;
    let answer = b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok";
    let writer = tokio::spawn(async move {
        for byte in answer {
            backend.write_all(&[*byte]).await.expect("write a byte");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        backend
    });
    let resp = tokio::time::timeout(
        DEADLINE,
        send(&mut conn, request(Method::GET, "/", RequestBody::Empty)),
    )
    .await
    .expect("a head in time")
    .expect("the head");
    assert_eq!(resp.headers()["x-a"], "1");
    let body = read_body(&mut conn).await.expect("the body");
    assert_eq!(body, b"ok");
    assert!(conn.reusable());
    drop(writer.await.expect("the writer"));
}

/// `head` parsed alone: the final response, and its body's framing.
fn parsed(head: &[u8]) -> (Response<Option<HeadLines>>, Decoder) {
    let mut buf = BytesMut::from(head);
    match parse_head(&mut buf, &mut 0, &mut Names::default(), false) {
        Ok(Some(Parsed::Final(resp, decoder, _))) => (resp, decoder),
        other => panic!(
            "{:?} did not parse to a final head: {:?}",
            String::from_utf8_lossy(head),
            other.err()
        ),
    }
}

#[test]
fn header_lines_the_gateway_leaves_alone_are_kept_as_they_came() {
    let head = b"HTTP/1.1 200 OK\r\nServer: idc-sim\r\ncontent-length: 6\r\nX-Idc:sh\r\nDate: Tue, 08 Dec 2026 02:49:01 GMT\r\nx-a: 1\r\nx-a: 2\r\n\r\n";
    let (resp, decoder) = parsed(head);
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().is_empty(), "no map is built for kept lines");
    assert_eq!(decoder, Decoder::Length(6), "framed by the kept length");
    let lines = resp.body().clone().expect("the lines are kept");
    assert_eq!(
        &lines.bytes[..],
        &b"Server: idc-sim\r\ncontent-length: 6\r\nX-Idc:sh\r\nDate: Tue, 08 Dec 2026 02:49:01 GMT\r\nx-a: 1\r\nx-a: 2\r\n"[..],
        "byte for byte, the closing empty line left out"
    );
    assert_eq!((lines.length, lines.dated), (Some(6), true));
    // Put in a map, they are the lines the map path would have made.
    let mut map = HeaderMap::new();
    lines.fill(&mut map);
    assert_eq!(map.len(), 6);
    assert_eq!(map["server"], "idc-sim");
    assert_eq!(map[CONTENT_LENGTH], "6");
    assert_eq!(map["x-idc"], "sh");
    assert_eq!(map["date"], "Tue, 08 Dec 2026 02:49:01 GMT");
    let xa: Vec<_> = map.get_all("x-a").iter().collect();
    assert_eq!(xa, ["1", "2"]);

    // No header lines at all, and no length: read to the close.
    let (resp, decoder) = parsed(b"HTTP/1.1 200 OK\r\n\r\n");
    let lines = resp.body().clone().expect("kept");
    assert!(lines.bytes.is_empty());
    assert_eq!((lines.length, lines.dated), (None, false));
    assert_eq!(decoder, Decoder::Eof);
}

#[test]
fn header_lines_the_gateway_changes_go_into_the_map() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            "hop-by-hop",
        ),
        (
            b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=5\r\ncontent-length: 0\r\n\r\n",
            "hop-by-hop",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "chunked",
        ),
        (
            b"HTTP/1.1 200 OK\r\nupgrade: h2c\r\ncontent-length: 0\r\n\r\n",
            "upgrade",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-Request-Id: abc\r\ncontent-length: 0\r\n\r\n",
            "the stamp's",
        ),
        (
            b"HTTP/1.1 200 OK\r\nx-shardgate-idc: gz\r\ncontent-length: 0\r\n\r\n",
            "the gateway's",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n",
            "two lengths",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 0, 0\r\n\r\n",
            "a length list",
        ),
        (
            b"HTTP/1.1 200 OK\r\nx-a:\r\ncontent-length: 0\r\n\r\n",
            "an empty value",
        ),
        (
            b"HTTP/1.1 200 OK\r\nx-a: 1 \r\ncontent-length: 0\r\n\r\n",
            "a trailing blank",
        ),
        (
            b"HTTP/1.1 200 OK\r\nx-a: 1\ncontent-length: 0\r\n\r\n",
            "a bare LF",
        ),
        (
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 0\n\r\n",
            "a bare LF last",
        ),
        (
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 0\r\n\n",
            "a bare LF closing line",
        ),
        (b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n", "204"),
        (b"HTTP/1.1 304 Not Modified\r\nx-a: 1\r\n\r\n", "304"),
        (
            b"HTTP/1.1 421 Misdirected Request\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n",
            "421",
        ),
    ];
    for (head, why) in cases {
        let (resp, _) = parsed(head);
        assert!(resp.body().is_none(), "{why}: the lines must not be kept");
        assert!(!resp.headers().is_empty(), "{why}: the map holds the lines");
    }
}

#[test]
fn every_name_the_gateway_removes_or_replaces_keeps_a_head_off_the_kept_path() {
    // The hop-by-hop names (the fuzz checker's list, which `data::headers`'s tests hold
    // `is_hop_by_hop` to), as written and upper-cased; the stamp's in any case; near misses
    // and ordinary lines, which are kept.
    let hop_by_hop = crate::dev::fuzz::HOP_BY_HOP;
    let upper: Vec<String> = hop_by_hop.iter().map(|n| n.to_ascii_uppercase()).collect();
    let others = [
        "x-request-id",
        "X-Request-ID",
        "x-shardgate-idc",
        "x-shardgate-shard",
        "X-ShardGate-Owner",
        "x-shardgate-",
        "x-shardgate",
        "x-requestid",
        "tee",
        "upgrades",
        "content-type",
        "server",
        "etag",
        "date",
    ];
    let names = hop_by_hop
        .iter()
        .copied()
        .chain(upper.iter().map(String::as_str))
        .chain(others);
    for name in names {
        let header = http::HeaderName::from_bytes(name.as_bytes()).expect("a valid name");
        let lower = header.as_str();
        let changed = crate::data::headers::is_hop_by_hop(&header)
            || lower.starts_with("x-shardgate-")
            || lower == "x-request-id";
        let head = format!("HTTP/1.1 200 OK\r\n{name}: v\r\ncontent-length: 0\r\n\r\n");
        let (resp, _) = parsed(head.as_bytes());
        assert_eq!(
            resp.body().is_none(),
            changed,
            "{name}: a head with it must {}be kept",
            if changed { "not " } else { "" }
        );
    }
}
