//! The plain listener beside a TLS one (`redirect_http`): a 308 to https for every request.

use std::sync::Arc;

use crate::data::upstream::body::ResponseBody;

/// The plain listener beside a TLS one (`redirect_http`): every request gets a 308 to the same
/// host and path on https. 308, not 301, so a client keeps its method and body.
pub struct Redirect {
    /// The TLS listener's port, written into the location unless it is 443.
    pub https_port: u16,
}

impl super::Handler for Redirect {
    async fn call(
        self: Arc<Self>,
        req: http::Request<crate::data::server::ClientBody>,
        _peer: super::Peer,
    ) -> http::Response<ResponseBody> {
        redirect(&req, self.https_port)
    }
}

/// The 308 answer for `req`, or a 400 when it names no usable host.
pub fn redirect<B>(req: &http::Request<B>, https_port: u16) -> http::Response<ResponseBody> {
    use http::StatusCode;
    let authority = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .or_else(|| req.uri().authority().cloned());
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let location = authority
        .map(|a| format!("https://{}{port}{path}", a.host()))
        .and_then(|l| http::HeaderValue::from_str(&l).ok());
    let mut r = http::Response::new(ResponseBody::full(""));
    match location {
        Some(location) => {
            *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
            r.headers_mut().insert(http::header::LOCATION, location);
        }
        None => *r.status_mut() = StatusCode::BAD_REQUEST,
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_keeps_host_and_path() {
        let req = http::Request::get("/orders/1?x=2")
            .header("host", "shop.example:80")
            .body(())
            .unwrap();
        let r = redirect(&req, 443);
        assert_eq!(r.status(), http::StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()["location"], "https://shop.example/orders/1?x=2");
        let r = redirect(&req, 8443);
        assert_eq!(
            r.headers()["location"],
            "https://shop.example:8443/orders/1?x=2"
        );
        let req = http::Request::get("/").body(()).unwrap();
        assert_eq!(redirect(&req, 443).status(), http::StatusCode::BAD_REQUEST);
    }
}
