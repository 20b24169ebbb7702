//! CRC-32 (IEEE 802.3, the one zlib and `crc32fast` compute) of a sharding key, for DESIGN.md
//! §3's `shard = crc32_ieee(key) % shard_count`. A key is short (a user, merchant or order
//! id), and for short input the cost that matters is memory, not arithmetic: the usual tables
//! (16 of 256 entries, 16 KiB) put each byte's lookup on a cache line of its own, lines the
//! rest of a request's work has evicted by the next one. Here the table is 16 entries, one
//! 64-byte line, two lookups per byte; longer input goes to `crc32fast`, whose wide folding
//! wins once there is enough of it.

/// Keys up to this long take the one-line table.
const SHORT: usize = 64;

/// The reflected IEEE polynomial.
const POLY: u32 = 0xEDB8_8320;

/// The CRC of each 4-bit value: what a nibble shifted out of the register folds back in.
static NIBBLES: [u32; 16] = nibble_table();

const fn nibble_table() -> [u32; 16] {
    let mut table = [0u32; 16];
    let mut i = 0;
    while i < 16 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 4 {
            c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// `crc32_ieee(key)`.
#[inline]
pub fn crc32_ieee(key: &[u8]) -> u32 {
    if key.len() > SHORT {
        return crc32fast::hash(key);
    }
    let mut crc = !0u32;
    for &b in key {
        crc ^= u32::from(b);
        crc = (crc >> 4) ^ NIBBLES[(crc & 15) as usize];
        crc = (crc >> 4) ^ NIBBLES[(crc & 15) as usize];
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_check_value() {
        // The catalogue's check for CRC-32/ISO-HDLC: the CRC of the nine ASCII digits.
        assert_eq!(crc32_ieee(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32_ieee(b""), 0);
    }

    #[test]
    fn agrees_with_crc32fast_on_every_length_across_the_switch() {
        // Bytes from a small LCG: every value of a byte turns up across the lengths.
        let mut x: u32 = 0x1234_5678;
        let bytes: Vec<u8> = (0..4 * SHORT)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect();
        for len in 0..bytes.len() {
            for start in [0, 1, 7] {
                let key = &bytes[start..][..len.min(bytes.len() - start)];
                assert_eq!(
                    crc32_ieee(key),
                    crc32fast::hash(key),
                    "length {}",
                    key.len()
                );
            }
        }
        for key in [
            &b"user-1"[..],
            b"user-8812731",
            b"merchant:42",
            &[0xff; 64],
            &[0; 65],
        ] {
            assert_eq!(crc32_ieee(key), crc32fast::hash(key));
        }
    }
}
