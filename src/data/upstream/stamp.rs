//! The gateway's own headers on a request it sends upstream (DESIGN.md §2, made by
//! `data::proxy`), kept beside the
//! client's header map instead of inserted into it: the upstream HTTP/1.1 encoder writes them
//! after the client's lines, and a spill, a replay or a 421's re-forward changes a field here
//! rather than hashing names into the map again. hyper's client (upgrades) gets them folded
//! into the map (`fold_into`).

use std::borrow::Cow;

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};

use crate::util::http1::put_line;

/// The value of the flag headers (`x-shardgate-spill`, `x-shardgate-reforward`).
static ONE: HeaderValue = HeaderValue::from_static("1");

/// What the gateway adds to (or replaces in) a request on its way upstream. A field left
/// `None` adds nothing: the client's line of that name, if any, goes as it came (only the
/// trace context is left so on purpose: a client's valid `traceparent` is kept).
#[derive(Clone, Debug, Default)]
pub struct Stamp<'a> {
    /// `host` and `x-forwarded-host`: the request's authority, or else the client's `Host`.
    pub host: Option<HeaderValue>,
    /// `x-forwarded-for`: every line the client sent, joined, then the client's address
    /// ([`super::forwarded_for`]). Whole, so that folding it twice cannot append twice.
    pub forwarded_for: Option<HeaderValue>,
    pub forwarded_proto: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    /// Set when the gateway started the trace.
    pub traceparent: Option<HeaderValue>,
    pub shard: Option<HeaderValue>,
    /// The three below are the snapshot's own values, borrowed (a request's stamp does not
    /// touch their reference counts); a re-routed request's come from a newer snapshot and
    /// are owned.
    pub idc: Option<Cow<'a, HeaderValue>>,
    pub epoch: Option<Cow<'a, HeaderValue>>,
    pub owner_epoch: Option<Cow<'a, HeaderValue>>,
    /// Sent to the next IDC: the serving one's pool failed or is dead (a read).
    pub spill: bool,
    /// Sent again to the owner a backend's 421 named.
    pub reforward: bool,
}

impl Stamp<'_> {
    /// The lines after `host`, in the order they are written.
    fn lines(&self) -> [(&'static str, Option<&HeaderValue>); 11] {
        [
            ("x-forwarded-host", self.host.as_ref()),
            ("x-forwarded-for", self.forwarded_for.as_ref()),
            ("x-forwarded-proto", self.forwarded_proto.as_ref()),
            ("x-request-id", self.request_id.as_ref()),
            ("traceparent", self.traceparent.as_ref()),
            ("x-shardgate-shard", self.shard.as_ref()),
            ("x-shardgate-idc", self.idc.as_deref()),
            ("x-shardgate-epoch", self.epoch.as_deref()),
            ("x-shardgate-owner-epoch", self.owner_epoch.as_deref()),
            ("x-shardgate-spill", self.spill.then_some(&ONE)),
            ("x-shardgate-reforward", self.reforward.then_some(&ONE)),
        ]
    }

    /// True when a line of the client's named `name` is left out: the stamp writes its own
    /// (the encoder writes each name once), or the name is the gateway's (`x-shardgate-*`
    /// never comes from a client: those were dropped before routing, and a stamp folded into
    /// the map earlier is written again from the fields).
    pub fn replaces(&self, name: &HeaderName) -> bool {
        let name = name.as_str();
        match name {
            "host" => self.host.is_some(),
            // Never the client's: without a host to forward there is none.
            "x-forwarded-host" => true,
            "x-forwarded-for" => self.forwarded_for.is_some(),
            "x-forwarded-proto" => self.forwarded_proto.is_some(),
            "x-request-id" => self.request_id.is_some(),
            "traceparent" => self.traceparent.is_some(),
            _ => name.starts_with("x-shardgate-"),
        }
    }

    /// Bytes the stamp's lines take in an HTTP/1.1 head (`name: value\r\n` each).
    pub fn encoded_len(&self) -> usize {
        let host = self.host.as_ref().map_or(0, |v| 6 + v.len() + 2);
        self.lines()
            .iter()
            .filter_map(|(name, value)| Some(name.len() + 2 + value.as_ref()?.len() + 2))
            .sum::<usize>()
            + host
    }

    /// A request head's header lines as they go upstream: `host` first (RFC 9112 §3.2: right
    /// after the request line), then the client's lines that `keep` lets through, less those
    /// the stamp replaces, then the stamp's. The upstream encoder writes every request's
    /// lines with this (the fuzz target checks what it writes).
    pub fn write_head_lines(
        &self,
        head: &mut BytesMut,
        headers: &HeaderMap,
        keep: impl Fn(&HeaderName) -> bool,
    ) {
        if let Some(host) = &self.host {
            put_line(head, b"host", host.as_bytes());
        }
        for (name, value) in headers {
            if keep(name) && !self.replaces(name) {
                put_line(head, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        for (name, value) in self.lines() {
            if let Some(value) = value {
                put_line(head, name.as_bytes(), value.as_bytes());
            }
        }
    }

    /// Into a header map, as the encoder would write it: each name's lines replaced by the
    /// stamp's, and the names it always replaces gone when it has no value for them. For a
    /// client that encodes the map itself (hyper's, on an upgrade). Folding again, with fields
    /// changed or not, leaves one line of each.
    pub fn fold_into(&self, headers: &mut HeaderMap) {
        if let Some(host) = &self.host {
            headers.insert(HOST, host.clone());
        }
        for (name, value) in self.lines() {
            let name = HeaderName::from_static(name);
            match value {
                Some(value) => {
                    headers.insert(name, value.clone());
                }
                None if self.replaces(&name) => {
                    headers.remove(name);
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    // The gateway's names as the map spells them (`data::headers` checks them against its
    // constants: this module imports nothing above the upstream side).
    const IDC: &str = "x-shardgate-idc";
    const SPILL: &str = "x-shardgate-spill";
    const FORWARDED_FOR: &str = "x-forwarded-for";
    const FORWARDED_HOST: &str = "x-forwarded-host";

    fn stamp() -> Stamp<'static> {
        Stamp {
            host: Some(HeaderValue::from_static("api.example.com")),
            forwarded_for: Some(HeaderValue::from_static("203.0.113.9, 127.0.0.1")),
            forwarded_proto: Some(HeaderValue::from_static("http")),
            request_id: Some(HeaderValue::from_static("abc")),
            traceparent: None,
            shard: Some(HeaderValue::from_static("7")),
            idc: Some(Cow::Owned(HeaderValue::from_static("sh"))),
            epoch: Some(Cow::Owned(HeaderValue::from_static("12"))),
            owner_epoch: None,
            spill: true,
            reforward: false,
        }
    }

    fn written(s: &Stamp<'_>) -> String {
        let mut head = BytesMut::new();
        s.write_head_lines(&mut head, &HeaderMap::new(), |_| true);
        assert_eq!(head.len(), s.encoded_len(), "the size estimate is exact");
        String::from_utf8(head.to_vec()).unwrap()
    }

    #[test]
    fn lines_are_written_host_first_and_only_when_set() {
        assert_eq!(
            written(&stamp()),
            "host: api.example.com\r\n\
             x-forwarded-host: api.example.com\r\n\
             x-forwarded-for: 203.0.113.9, 127.0.0.1\r\n\
             x-forwarded-proto: http\r\n\
             x-request-id: abc\r\n\
             x-shardgate-shard: 7\r\n\
             x-shardgate-idc: sh\r\n\
             x-shardgate-epoch: 12\r\n\
             x-shardgate-spill: 1\r\n"
        );
        assert_eq!(written(&Stamp::default()), "");
    }

    #[test]
    fn the_clients_lines_of_stamped_names_are_left_out() {
        let s = stamp();
        for replaced in [
            "host",
            "x-forwarded-host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-request-id",
            "x-shardgate-idc",
            "x-shardgate-anything",
        ] {
            assert!(s.replaces(&HeaderName::from_static(replaced)), "{replaced}");
        }
        // The client's valid trace context stays when the gateway started none.
        for kept in ["traceparent", "x-user-id", "accept", "x-shardgate"] {
            assert!(!s.replaces(&HeaderName::from_static(kept)), "{kept}");
        }
        // Every line the stamp writes replaces the client's of that name.
        for (name, value) in s.lines() {
            if value.is_some() {
                assert!(s.replaces(&HeaderName::from_static(name)), "{name}");
            }
        }
        let none = Stamp::default();
        assert!(!none.replaces(&HOST));
        assert!(none.replaces(&HeaderName::from_static(IDC)));
        // Without a host, the client's x-forwarded-host is not passed on either.
        assert!(none.replaces(&HeaderName::from_static(FORWARDED_HOST)));
    }

    #[test]
    fn folding_twice_leaves_one_line_of_each() {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("other"));
        h.insert(FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        let mut s = stamp();
        s.fold_into(&mut h);
        s.idc = Some(Cow::Owned(HeaderValue::from_static("bj")));
        s.fold_into(&mut h);
        assert_eq!(h.len(), 9);
        assert_eq!(h[HOST], "api.example.com");
        assert_eq!(h[IDC], "bj");
        assert_eq!(
            h.get_all(FORWARDED_FOR).iter().collect::<Vec<_>>(),
            ["203.0.113.9, 127.0.0.1"]
        );
        // A gateway name the stamp has no value for is not left behind.
        s.spill = false;
        s.host = None;
        s.fold_into(&mut h);
        assert!(!h.contains_key(SPILL) && !h.contains_key(FORWARDED_HOST));
        assert_eq!(h[HOST], "api.example.com", "a client's Host stays");
    }
}
