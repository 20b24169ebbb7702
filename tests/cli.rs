//! The `shardgate` binary: `validate` lists every problem of a bad document and accepts good
//! ones; `explain --topology FILE` computes the same shard and IDCs as the library.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shardgate::control::topology::{build, BuildContext, Overrides, RawTopology, Shard, Topology};
use shardgate::data::upstream::Upstreams;

/// What a finished command left behind.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary with a deadline: a hung command fails the test instead of hanging it.
fn shardgate(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the shardgate binary");
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().expect("stdout")));
    let err = read(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for shardgate") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("shardgate {args:?} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code().expect("exited, not killed by a signal"),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

const GOOD: &str = r#"
cluster = "cli"
shard_count = 256

[sets.core]
[sets.noncore]

[[idcs]]
name = "sh"
pools.core = ["127.0.0.1:7001"]
pools.noncore = ["127.0.0.1:7002"]

[[idcs]]
name = "bj"
pools.core = ["127.0.0.1:7011"]
pools.noncore = ["127.0.0.1:7012"]

[[idcs]]
name = "gz"
pools.core = ["127.0.0.1:7021"]
pools.noncore = ["127.0.0.1:7022"]

[[shards.pins]]
range = "0-63"
idc = "bj"

[[routes]]
name = "orders"
path_prefix = "/orders"
set = "core"
key = ["header:x-user-id"]

[[routes]]
name = "catalog"
path_prefix = "/catalog"
set = "noncore"
sharded = false
"#;

/// Five problems: an unknown set in a route, a pin to an unknown IDC, a duplicated IDC name,
/// a zero timeout, and a pin range outside `0..shard_count`.
const BAD: &str = r#"
cluster = "cli"
shard_count = 128

[sets.core]

[[idcs]]
name = "sh"
pools.core = ["127.0.0.1:7001"]

[[idcs]]
name = "bj"
pools.core = ["127.0.0.1:7011"]

[[idcs]]
name = "sh"
pools.core = ["127.0.0.1:7021"]

[[shards.pins]]
range = "0-63"
idc = "nowhere"

[[shards.pins]]
range = "100-200"
idc = "bj"

[[routes]]
name = "orders"
path_prefix = "/orders"
set = "gold"
key = ["header:x-user-id"]

[[routes]]
name = "slow"
path_prefix = "/slow"
set = "core"
key = ["header:x-user-id"]
timeout_ms = 0
"#;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a topology file");
    path.to_str().expect("a UTF-8 path").to_owned()
}

fn offline(text: &str) -> Topology {
    build(
        RawTopology::parse(text).expect("parses"),
        &Overrides::default(),
        &BuildContext::default(),
        &Upstreams::new(),
    )
    .expect("a valid topology")
}

#[test]
fn validate_lists_every_problem_of_a_bad_document() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let bad = write(dir.path(), "bad.toml", BAD);
    let run = shardgate(&["validate", &bad]);
    assert_eq!(
        run.code, 1,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    // Each problem on a line of its own, naming the field and the reason.
    let expected = [
        ("routes[0].set", "unknown set `gold`"),
        ("shards.pins[0].idc", "unknown IDC `nowhere`"),
        ("idcs[2].name", "`sh` is declared twice"),
        ("routes[1].timeout_ms", "greater than 0"),
        ("shards.pins[1].range", "outside 0..128"),
    ];
    for (field, reason) in expected {
        assert!(
            run.stderr
                .lines()
                .any(|l| l.contains(field) && l.contains(reason)),
            "`{field}: …{reason}…` is not listed:\n{}",
            run.stderr
        );
    }
    assert!(
        !run.stdout.contains("valid."),
        "nothing claims validity: {}",
        run.stdout
    );

    // A syntax error names its line.
    let broken = write(
        dir.path(),
        "broken.toml",
        "cluster = \"x\"\nshard_count = = 3\n",
    );
    let run = shardgate(&["validate", &broken]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("line 2"), "{}", run.stderr);

    // A file that does not exist is refused, not a crash.
    let missing = dir.path().join("missing.toml");
    let run = shardgate(&["validate", missing.to_str().expect("UTF-8 path")]);
    assert_eq!(run.code, 1, "{}", run.stderr);
}

/// `shard_count` past the largest table, and a pin past the table's end: it once sized the pin
/// table by one count and checked ranges against the other, and panicked.
const PANICKED: &str = r#"
cluster = "cli"
shard_count = 2000000

[sets.core]

[[idcs]]
name = "sh"
pools.core = ["127.0.0.1:7001"]

[[shards.pins]]
range = "1048576"
idc = "sh"

[[routes]]
name = "orders"
path_prefix = "/orders"
set = "core"
key = ["header:x-user-id"]
"#;

#[test]
fn a_pin_past_the_largest_shard_table_is_listed_not_a_crash() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = write(dir.path(), "huge.toml", PANICKED);
    let run = shardgate(&["validate", &file]);
    assert_eq!(
        run.code, 1,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    for (field, reason) in [
        ("shard_count", "must be between 1 and 1048576"),
        ("shards.pins[0].range", "`1048576` is outside"),
    ] {
        assert!(
            run.stderr
                .lines()
                .any(|l| l.contains(field) && l.contains(reason)),
            "`{field}: …{reason}…` is not listed:\n{}",
            run.stderr
        );
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);

    // `explain` builds the same document offline: refused the same way.
    let run = shardgate(&["explain", "u1", "--topology", &file]);
    assert_eq!(
        run.code, 1,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(
        run.stderr.contains("shards.pins[0].range"),
        "{}",
        run.stderr
    );
}

#[test]
fn validate_accepts_good_documents() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let good = write(dir.path(), "good.toml", GOOD);
    let run = shardgate(&["validate", &good]);
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    assert!(run.stdout.contains("valid"), "{}", run.stdout);

    // The topology shipped with the repository is valid too.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/topology.toml");
    let run = shardgate(&["validate", shipped]);
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);

    // A usage error is exit code 2.
    let run = shardgate(&["validate"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
}

#[test]
fn explain_computes_the_same_shard_and_idcs_as_the_library() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = write(dir.path(), "good.toml", GOOD);
    let topo = offline(GOOD);
    let pinned = (0..)
        .map(|i| format!("pinned-{i}"))
        .find(|k| Shard::of_key(k.as_bytes(), 256).0 <= 63)
        .expect("a key in the pinned range");
    for key in ["user-42", "123456789", "böb /1", pinned.as_str()] {
        let run = shardgate(&["explain", key, "--topology", &file, "--json"]);
        assert_eq!(run.code, 0, "{key}: {}", run.stderr);
        let v: Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("{key}: not JSON ({e}): {}", run.stdout));
        let shard = Shard::of_key(key.as_bytes(), 256);
        assert_eq!(v["shard"], shard.0, "{key}");
        assert_eq!(v["key"], key);
        assert_eq!(
            v["home_idc"],
            topo.idc(topo.home(shard)).name.as_str(),
            "{key}"
        );
        let serving = topo.serving(shard).expect("served");
        assert_eq!(v["serving_idc"], topo.idc(serving).name.as_str(), "{key}");
    }
    // crc32("123456789") = 0xCBF43926; % 256 = 0x26.
    let run = shardgate(&["explain", "123456789", "--topology", &file, "--json"]);
    let v: Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(v["shard"], 0x26);
    let v: Value = serde_json::from_str(
        &shardgate(&["explain", &pinned, "--topology", &file, "--json"]).stdout,
    )
    .expect("JSON");
    assert_eq!(v["home_idc"], "bj", "the pin decides");

    // The human form says the same.
    let run = shardgate(&["explain", "user-42", "--topology", &file]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let shard = Shard::of_key(b"user-42", 256).0;
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("shard") && l.trim_end().ends_with(&format!(" {shard}"))),
        "{}",
        run.stdout
    );

    // An invalid topology is refused with its problems.
    let bad = write(dir.path(), "bad.toml", BAD);
    let run = shardgate(&["explain", "user-42", "--topology", &bad, "--json"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("unknown set `gold`"), "{}", run.stderr);
}

#[test]
fn serve_refuses_half_a_tls_pair_and_an_unusable_certificate() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let topology = write(dir.path(), "topology.toml", GOOD);
    let cert = write(dir.path(), "gw.pem", "not a certificate");
    let key = write(dir.path(), "gw.key", "not a key");
    // --tls-cert without --tls-key is a usage error.
    let run = shardgate(&["serve", "--topology", &topology, "--tls-cert", &cert]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    // A certificate that cannot be used fails the start, naming the file.
    let run = shardgate(&[
        "serve",
        "--topology",
        &topology,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("gw.pem"), "{}", run.stderr);
    // --redirect-http needs TLS.
    let run = shardgate(&[
        "serve",
        "--topology",
        &topology,
        "--redirect-http",
        "127.0.0.1:0",
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("need TLS"), "{}", run.stderr);
}

#[test]
fn serve_refuses_a_connection_limit_it_cannot_hold() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let topology = write(dir.path(), "topology.toml", GOOD);
    // TOML's largest integer: the listener's semaphore would panic on it.
    let config = write(
        dir.path(),
        "shardgate.toml",
        &format!(
            "topology = \"{topology}\"\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [limits]\nmax_connections = 9223372036854775807\n"
        ),
    );
    let run = shardgate(&["serve", "--config", &config]);
    assert_eq!(
        run.code, 1,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(
        run.stderr
            .contains("limits.max_connections: must be between 1 and 1048576"),
        "{}",
        run.stderr
    );
}
