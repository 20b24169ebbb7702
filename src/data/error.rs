//! The request path's one error type and its single mapping to an HTTP answer (DESIGN.md §2):
//! status by who failed, `x-shardgate-reason`, `Retry-After`, and the JSON error body.

use http::{HeaderValue, Response, StatusCode};

use crate::data::admission::Refusal;
use crate::data::upstream::body::ResponseBody;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this host and path")]
    NoRoute,
    #[error("a route matches this path but not this method")]
    MethodNotAllowed,
    #[error("route `{0}` needs a sharding key and the request has none")]
    MissingKey(String),
    #[error("route `{route}`: the sharding key is invalid: {why}")]
    InvalidKey { route: String, why: &'static str },
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("the request body is larger than this route's limit of {0} bytes")]
    PayloadTooLarge(u64),
    #[error("the request head is larger than the gateway's limit (limits.max_header_bytes, at most 100 fields)")]
    HeaderTooLarge,
    #[error("no IDC can serve {0} now")]
    NoServingIdc(String),
    /// Nothing was tried: health keeps traffic off every backend of the pool.
    #[error("no backend of the pool is in service (failing health checks or ejected)")]
    NoneInService,
    #[error("{0}")]
    UpstreamConnect(String),
    #[error("{0}")]
    UpstreamProtocol(String),
    #[error("the upstream did not answer within {0} ms")]
    UpstreamTimeout(u64),
    /// A backend answered 421 naming a newer owner, and the request could not be sent there
    /// (already sent again once, an unknown IDC, or a body that was not kept).
    #[error("{0}")]
    Misrouted(String),
    /// Admission said no (budget, shedding, rate limit, degrade switch, breaker).
    #[error("{0}")]
    Refused(Refusal),
}

impl ProxyError {
    /// Who failed decides the status: the client (4xx), the cluster's state (503), or the
    /// upstream (502/504).
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::MissingKey(_)
            | ProxyError::InvalidKey { .. }
            | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Refused(Refusal::RateLimited { .. }) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoServingIdc(_) | ProxyError::Refused(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect(_)
            | ProxyError::NoneInService
            | ProxyError::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Misrouted(_) => StatusCode::MISDIRECTED_REQUEST,
        }
    }

    /// The `error` field of the JSON body.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::MissingKey(_) => "missing_key",
            ProxyError::InvalidKey { .. } => "invalid_key",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::PayloadTooLarge(_) => "payload_too_large",
            ProxyError::HeaderTooLarge => "header_too_large",
            ProxyError::NoServingIdc(_) => "no_idc",
            ProxyError::UpstreamConnect(_) | ProxyError::NoneInService => "upstream_connect",
            ProxyError::UpstreamProtocol(_) => "upstream_protocol",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::Misrouted(_) => "misrouted",
            ProxyError::Refused(r) => r.reason(),
        }
    }

    /// `x-shardgate-reason` for refusals the gateway decided on its own.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            ProxyError::NoServingIdc(_) => Some("no_idc"),
            ProxyError::Misrouted(_) => Some("misrouted"),
            ProxyError::Refused(r) => Some(r.reason()),
            _ => None,
        }
    }

    /// Seconds for `Retry-After` on 503s and 429s.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            ProxyError::Refused(Refusal::RateLimited { retry_after_s, .. })
            | ProxyError::Refused(Refusal::CircuitOpen { retry_after_s, .. })
            | ProxyError::Refused(Refusal::Fenced { retry_after_s, .. })
            | ProxyError::Refused(Refusal::SelfFenced { retry_after_s, .. }) => {
                Some(*retry_after_s)
            }
            ProxyError::Refused(Refusal::Degraded {
                fallback: Some(fb), ..
            }) => fb.retry_after_s,
            _ => (self.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(1),
        }
    }

    /// The `detail` of the JSON body. An upstream failure says what failed, never how: the
    /// backend's address, the OS error or the TLS alert help an attacker map the inside and
    /// nobody outside act on it, so they stay in the gateway's log (proxy.rs).
    pub fn client_detail(&self) -> String {
        match self {
            ProxyError::UpstreamConnect(_) => {
                "no backend of the serving IDC could be reached".to_owned()
            }
            ProxyError::UpstreamProtocol(_) => {
                "the exchange with the backend failed before its answer was complete".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// What the operator gets and the client does not: the underlying upstream error.
    pub fn hidden_detail(&self) -> Option<&str> {
        match self {
            ProxyError::UpstreamConnect(e) | ProxyError::UpstreamProtocol(e) => Some(e),
            _ => None,
        }
    }

    pub fn to_response(&self, request_id: &HeaderValue) -> Response<ResponseBody> {
        // A degraded route with a fallback answers the operator's canned response instead of
        // the error body; it is still marked as a gateway refusal.
        if let ProxyError::Refused(Refusal::Degraded {
            fallback: Some(fb), ..
        }) = self
        {
            let mut resp = Response::new(ResponseBody::full(fb.body.clone()));
            *resp.status_mut() = fb.status;
            let h = resp.headers_mut();
            h.insert(http::header::CONTENT_TYPE, fb.content_type.clone());
            h.insert(
                crate::data::headers::REASON,
                HeaderValue::from_static("degraded"),
            );
            if let Some(s) = self.retry_after() {
                h.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
            }
            return resp;
        }
        let body = serde_json::json!({
            "error": self.kind(),
            "detail": self.client_detail(),
            "request_id": request_id.to_str().unwrap_or(""),
        });
        let mut resp = Response::new(ResponseBody::full(body.to_string()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(reason) = self.reason() {
            h.insert(
                crate::data::headers::REASON,
                HeaderValue::from_static(reason),
            );
        }
        if let Some(s) = self.retry_after() {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_by_who_failed() {
        assert_eq!(ProxyError::NoRoute.status(), 404);
        assert_eq!(ProxyError::MethodNotAllowed.status(), 405);
        assert_eq!(ProxyError::MissingKey("r".into()).status(), 400);
        assert_eq!(ProxyError::NoServingIdc("shard 1".into()).status(), 503);
        assert_eq!(ProxyError::UpstreamConnect("x".into()).status(), 502);
        assert_eq!(ProxyError::UpstreamTimeout(5).status(), 504);
        assert_eq!(ProxyError::PayloadTooLarge(5).status(), 413);
        let limited = ProxyError::Refused(Refusal::RateLimited {
            route: "r".into(),
            retry_after_s: 3,
        });
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.retry_after(), Some(3));
        let full = ProxyError::Refused(Refusal::SetFull { set: "s".into() });
        assert_eq!(full.status(), 503);
        assert_eq!(full.reason(), Some("set_full"));
        assert_eq!(full.retry_after(), Some(1));
        let fenced = ProxyError::Refused(Refusal::Fenced {
            shard: 7,
            retry_after_s: 2,
        });
        assert_eq!(fenced.status(), 503);
        assert_eq!(fenced.reason(), Some("fenced"));
        assert_eq!(fenced.retry_after(), Some(2));
    }

    #[test]
    fn a_degraded_route_answers_its_fallback() {
        let fb = crate::control::topology::Fallback {
            status: StatusCode::OK,
            body: bytes::Bytes::from_static(b"{}"),
            content_type: HeaderValue::from_static("application/json"),
            retry_after_s: Some(5),
        };
        let e = ProxyError::Refused(Refusal::Degraded {
            target: "noncore".into(),
            fallback: Some(Box::new(fb)),
        });
        let resp = e.to_response(&HeaderValue::from_static("id"));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-shardgate-reason"], "degraded");
        assert_eq!(resp.headers()["retry-after"], "5");
        let none = ProxyError::Refused(Refusal::Degraded {
            target: "noncore".into(),
            fallback: None,
        });
        let resp = none.to_response(&HeaderValue::from_static("id"));
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-shardgate-reason"], "degraded");
        assert_eq!(resp.headers()["retry-after"], "1");
    }

    #[test]
    fn upstream_failures_keep_their_details_from_the_client() {
        let id = HeaderValue::from_static("abc");
        for e in [
            ProxyError::UpstreamConnect(
                "10.1.2.3:8443: TLS handshake: invalid peer certificate: UnknownIssuer".into(),
            ),
            ProxyError::UpstreamProtocol("10.1.2.3:8443: connection reset by peer".into()),
        ] {
            let resp = e.to_response(&id);
            assert_eq!(resp.status(), 502);
            let ResponseBody::Full(Some(body)) = resp.body() else {
                panic!("gateway answers carry a body")
            };
            let text = String::from_utf8_lossy(body);
            for secret in ["10.1.2.3", "8443", "TLS", "certificate", "reset"] {
                assert!(!text.contains(secret), "`{secret}` in {text}");
            }
            // The log still gets all of it.
            assert!(e
                .hidden_detail()
                .is_some_and(|d| d.contains("10.1.2.3:8443")));
        }
        assert_eq!(ProxyError::NoRoute.hidden_detail(), None);
    }

    #[test]
    fn refusal_body_and_headers() {
        let id = HeaderValue::from_static("abc");
        let resp = ProxyError::NoServingIdc("shard 7".into()).to_response(&id);
        assert_eq!(resp.headers()["x-shardgate-reason"], "no_idc");
        assert_eq!(resp.headers()["retry-after"], "1");
        let ResponseBody::Full(Some(body)) = resp.body() else {
            panic!("gateway answers carry a body")
        };
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["error"], "no_idc");
        assert_eq!(v["request_id"], "abc");
        assert!(v["detail"].as_str().unwrap().contains("shard 7"));
    }
}
