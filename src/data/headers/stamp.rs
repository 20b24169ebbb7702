//! The gateway's own headers on a request it sends upstream (DESIGN.md §2), kept beside the
//! client's header map instead of inserted into it: the upstream HTTP/1.1 encoder writes them
//! after the client's lines, and a spill, a replay or a 421's re-forward changes a field here
//! rather than hashing names into the map again. hyper's client (upgrades) gets them folded
//! into the map (`fold_into`).

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};

use crate::util::http1::put_line;

/// The value of the flag headers (`x-shardgate-spill`, `x-shardgate-reforward`).
static ONE: HeaderValue = HeaderValue::from_static("1");

/// What the gateway adds to (or replaces in) a request on its way upstream. A field left
/// `None` adds nothing: the client's line of that name, if any, goes as it came (only the
/// trace context is left so on purpose: a client's valid `traceparent` is kept).
#[derive(Clone, Debug, Default)]
pub struct Stamp {
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
    pub idc: Option<HeaderValue>,
    pub epoch: Option<HeaderValue>,
    pub owner_epoch: Option<HeaderValue>,
    /// Sent to the next IDC: the serving one's pool failed or is dead (a read).
    pub spill: bool,
    /// Sent again to the owner a backend's 421 named.
    pub reforward: bool,
}

impl Stamp {
    /// The lines after `host`, in the order they are written.
    fn lines(&self) -> [(&'static str, Option<&HeaderValue>); 11] {
        [
            ("x-forwarded-host", self.host.as_ref()),
            ("x-forwarded-for", self.forwarded_for.as_ref()),
            ("x-forwarded-proto", self.forwarded_proto.as_ref()),
            ("x-request-id", self.request_id.as_ref()),
            ("traceparent", self.traceparent.as_ref()),
            ("x-shardgate-shard", self.shard.as_ref()),
            ("x-shardgate-idc", self.idc.as_ref()),
            ("x-shardgate-epoch", self.epoch.as_ref()),
            ("x-shardgate-owner-epoch", self.owner_epoch.as_ref()),
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
            "host" | "x-forwarded-host" => self.host.is_some(),
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

    /// The `host` line, written first (RFC 9112 §3.2: right after the request line).
    pub fn write_host(&self, head: &mut BytesMut) {
        if let Some(host) = &self.host {
            put_line(head, b"host", host.as_bytes());
        }
    }

    /// Every other line, written after the client's.
    pub fn write_lines(&self, head: &mut BytesMut) {
        for (name, value) in self.lines() {
            if let Some(value) = value {
                put_line(head, name.as_bytes(), value.as_bytes());
            }
        }
    }

    /// Into a header map, each name's lines replaced by the stamp's: for a client that
    /// encodes the map itself (hyper's, on an upgrade). Folding again, with fields changed
    /// or not, leaves one line of each.
    pub fn fold_into(&self, headers: &mut HeaderMap) {
        if let Some(host) = &self.host {
            headers.insert(HOST, host.clone());
        }
        for (name, value) in self.lines() {
            if let Some(value) = value {
                headers.insert(HeaderName::from_static(name), value.clone());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::super::{
        EPOCH, FORWARDED_FOR, FORWARDED_HOST, FORWARDED_PROTO, IDC, OWNER_EPOCH, REFORWARD,
        REQUEST_ID, SHARD, SPILL, TRACEPARENT,
    };
    use super::*;

    fn stamp() -> Stamp {
        Stamp {
            host: Some(HeaderValue::from_static("api.example.com")),
            forwarded_for: Some(HeaderValue::from_static("203.0.113.9, 127.0.0.1")),
            forwarded_proto: Some(HeaderValue::from_static("http")),
            request_id: Some(HeaderValue::from_static("abc")),
            traceparent: None,
            shard: Some(HeaderValue::from_static("7")),
            idc: Some(HeaderValue::from_static("sh")),
            epoch: Some(HeaderValue::from_static("12")),
            owner_epoch: None,
            spill: true,
            reforward: false,
        }
    }

    fn written(s: &Stamp) -> String {
        let mut head = BytesMut::new();
        s.write_host(&mut head);
        s.write_lines(&mut head);
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
        let none = Stamp::default();
        assert!(!none.replaces(&HOST));
        assert!(none.replaces(&IDC));
    }

    #[test]
    fn the_lines_are_named_as_the_gateways_headers() {
        let names: Vec<&str> = Stamp::default().lines().iter().map(|(n, _)| *n).collect();
        let consts = [
            FORWARDED_HOST,
            FORWARDED_FOR,
            FORWARDED_PROTO,
            REQUEST_ID,
            TRACEPARENT,
            SHARD,
            IDC,
            EPOCH,
            OWNER_EPOCH,
            SPILL,
            REFORWARD,
        ];
        assert_eq!(names, consts.iter().map(|n| n.as_str()).collect::<Vec<_>>());
    }

    #[test]
    fn folding_twice_leaves_one_line_of_each() {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("other"));
        h.insert(FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        let mut s = stamp();
        s.fold_into(&mut h);
        s.idc = Some(HeaderValue::from_static("bj"));
        s.fold_into(&mut h);
        assert_eq!(h.len(), 9);
        assert_eq!(h[HOST], "api.example.com");
        assert_eq!(h[IDC], "bj");
        assert_eq!(
            h.get_all(FORWARDED_FOR).iter().collect::<Vec<_>>(),
            ["203.0.113.9, 127.0.0.1"]
        );
    }
}
