//! Replays the fuzz corpus (`fuzz/corpus/*`) through the fuzz entry points, plus a bounded
//! number of deterministic mutations of each seed, so `make test` exercises the parser,
//! validator and key extraction on hostile input without nightly tooling. Coverage-guided runs
//! use the same entry points: `cd fuzz && cargo fuzz run topology_document`.

use std::path::Path;

const MUTATIONS_PER_SEED: usize = 300;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).expect("corpus file"))
        .collect();
    assert!(seeds.len() >= 3, "the {target} corpus has too few seeds");
    seeds
}

/// Flips, inserts, deletes and splices bytes: cheap, deterministic, and good at breaking
/// parsers' assumptions about lengths and delimiters.
fn mutate(rng: &mut fastrand::Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.usize(1..8) {
        let at = rng.usize(..=v.len());
        match rng.u8(..5) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(..8);
            }
            1 => {
                let pool = b"\"=[]{}:,\n\\%-0";
                v.insert(at, pool[rng.usize(..pool.len())]);
            }
            2 if at < v.len() => {
                let end = (at + rng.usize(1..16)).min(v.len());
                v.drain(at..end);
            }
            3 if !other.is_empty() => {
                let from = rng.usize(..other.len());
                let end = (from + rng.usize(1..64)).min(other.len());
                v.splice(at..at, other[from..end].iter().copied());
            }
            _ => v.insert(at, rng.u8(..)),
        }
    }
    v
}

fn run(target: &str, f: fn(&[u8])) {
    let seeds = seeds(target);
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut runs = 0;
    for (i, seed) in seeds.iter().enumerate() {
        f(seed);
        runs += 1;
        let other = &seeds[(i + 1) % seeds.len()];
        for _ in 0..MUTATIONS_PER_SEED {
            f(&mutate(&mut rng, seed, other));
            runs += 1;
        }
    }
    assert_eq!(runs, seeds.len() * (MUTATIONS_PER_SEED + 1));
}

#[test]
fn topology_document_corpus_and_mutations() {
    run("topology_document", shardgate::fuzz::topology_document);
}

#[test]
fn request_routing_corpus_and_mutations() {
    run("request_routing", shardgate::fuzz::request_routing);
}
