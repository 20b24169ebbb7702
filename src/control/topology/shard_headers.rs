//! Shard numbers as header values (`x-shardgate-shard`, upstream and to the client) without
//! formatting one per request: one buffer of every number below the shard count, in slots of
//! equal width, handed from each snapshot to the next one built over it; a request's value is
//! a slice of it (a reference-count increment, no allocation).

use bytes::Bytes;
use http::HeaderValue;

/// Numbers `0..count`, each left-aligned in a slot of `width` bytes.
#[derive(Clone)]
pub struct ShardHeaders {
    digits: Bytes,
    width: usize,
    count: u32,
}

impl std::fmt::Debug for ShardHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardHeaders")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

/// Decimal digits of `n`.
fn digits(n: u32) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

impl ShardHeaders {
    /// The table for shards `0..count`: `previous` (the last snapshot's) when it covers them,
    /// so that reloads share one table.
    pub fn for_count(count: u32, previous: Option<&ShardHeaders>) -> ShardHeaders {
        match previous {
            Some(t) if t.count >= count => t.clone(),
            _ => ShardHeaders::make(count),
        }
    }

    fn make(count: u32) -> ShardHeaders {
        let width = digits(count.saturating_sub(1));
        let mut buf = vec![b'0'; width * count as usize];
        for n in 0..count {
            let slot = &mut buf[n as usize * width..][..digits(n)];
            let mut rest = n;
            for b in slot.iter_mut().rev() {
                *b = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
        }
        ShardHeaders {
            digits: Bytes::from(buf),
            width,
            count,
        }
    }

    /// `shard` in decimal, as a header value.
    pub fn get(&self, shard: u32) -> HeaderValue {
        if shard < self.count {
            let at = shard as usize * self.width;
            let value = self.digits.slice(at..at + digits(shard));
            if let Ok(v) = HeaderValue::from_maybe_shared(value) {
                return v;
            }
        }
        HeaderValue::from(shard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_reads_as_its_number() {
        for count in [1, 9, 10, 11, 100, 1024, 16_384] {
            let t = ShardHeaders::make(count);
            for n in (0..count).chain([count, count + 7, u32::MAX]) {
                assert_eq!(t.get(n), HeaderValue::from(n), "{n} of {count}");
            }
        }
        // A table made for more shards serves fewer; a larger count makes a new one.
        let small = ShardHeaders::for_count(16, None);
        assert_eq!(ShardHeaders::for_count(8, Some(&small)).count, 16);
        assert_eq!(ShardHeaders::for_count(32, Some(&small)).count, 32);
        assert_eq!(small.get(15), "15");
    }
}
