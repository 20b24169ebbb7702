//! A small HTTP/1.1 client for the admin API, used by the operator commands. Every step has
//! the caller's deadline.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `GET base + path` → (status, body).
pub async fn get(
    base: &str,
    path: &str,
    token: Option<&str>,
    deadline: Duration,
) -> Result<(u16, Bytes), String> {
    tokio::time::timeout(deadline, exchange(base, "GET", path, token, Bytes::new()))
        .await
        .map_err(|_| format!("no answer within {} ms", deadline.as_millis()))?
}

/// `POST base + path` with a JSON body → (status, body).
pub async fn post_json(
    base: &str,
    path: &str,
    token: Option<&str>,
    body: &serde_json::Value,
    deadline: Duration,
) -> Result<(u16, Bytes), String> {
    let body = Bytes::from(body.to_string());
    tokio::time::timeout(deadline, exchange(base, "POST", path, token, body))
        .await
        .map_err(|_| format!("no answer within {} ms", deadline.as_millis()))?
}

async fn exchange(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Bytes,
) -> Result<(u16, Bytes), String> {
    let base: Uri = base
        .parse()
        .map_err(|_| format!("`{base}` is not a URL like http://127.0.0.1:9901"))?;
    if base.scheme_str().is_some_and(|s| s != "http") {
        return Err("only http:// admin URLs are supported".into());
    }
    let authority = base
        .authority()
        .ok_or_else(|| "the admin URL has no host".to_owned())?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority.as_str());
    if !body.is_empty() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}
