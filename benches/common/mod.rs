//! The large topology both benchmarks use: 1,000 routes (900 under `*` with distinct prefixes,
//! 100 on 10 exact hosts, key sources mixed) over 5 IDCs and 16,384 shards, with shards
//! 0-1023 pinned to `pin_to`.

pub const ROUTES: usize = 1000;
pub const SHARDS: u32 = 16_384;

/// The document's text; backend ports start at `base_port`.
pub fn big_document(cluster: &str, pin_to: &str, base_port: usize) -> String {
    let mut s = format!(
        "cluster = \"{cluster}\"\nshard_count = {SHARDS}\nallow_reshard = true\n[sets.core]\n[sets.noncore]\ndegradable = true\n"
    );
    for (i, idc) in ["sh", "bj", "gz", "sz", "hz"].iter().enumerate() {
        s.push_str(&format!(
            "[[idcs]]\nname = \"{idc}\"\nweight = {}\npools.core = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\npools.noncore = [\"127.0.0.1:{}\"]\n",
            100 + i * 20,
            base_port + i,
            base_port + 100 + i,
            base_port + 200 + i
        ));
    }
    s.push_str(&format!(
        "[[shards.pins]]\nrange = \"0-1023\"\nidc = \"{pin_to}\"\n"
    ));
    for r in 0..ROUTES {
        let host = if r % 10 == 0 {
            format!("api{}.example.com", r % 100 / 10)
        } else {
            "*".to_owned()
        };
        let set = if r % 3 == 0 { "noncore" } else { "core" };
        s.push_str(&format!(
            "[[routes]]\nname = \"r{r}\"\nhost = \"{host}\"\npath_prefix = \"/svc{r}/v1\"\nmethods = [\"GET\", \"POST\"]\nset = \"{set}\"\nkey = [\"header:x-user-id\", \"query:uid\", \"cookie:uid\", \"path:3\"]\n"
        ));
    }
    s
}
