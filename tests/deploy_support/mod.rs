//! What tests/deploy.rs checks the files under deploy/ with: loading (YAML with several
//! documents, JSON), a small schema of the Kubernetes kinds the manifests use and the references
//! between them (k8s.rs), and the metric names, labels and PromQL of the alert rules and the
//! Grafana dashboard against what the gateway exports (promql.rs). Every check adds a problem
//! to a list, so one run names everything that is wrong; the tests assert the list is empty,
//! and feed deliberately broken copies to show each kind of check fails.

// Each test uses a different part of this module.
#![allow(dead_code)]

pub mod fixtures;
pub mod k8s;
pub mod promql;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

/// Every file under `dir`, sorted, as paths relative to the repository root.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out.into_iter()
        .map(|p| p.strip_prefix(repo()).map(Path::to_path_buf).unwrap_or(p))
        .collect()
}

pub fn read(path: &Path) -> String {
    let full = repo().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Every document of a YAML file (`---` separated), as JSON values. An empty document is an
/// error: nothing is dropped on the way.
pub fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        if v.is_null() {
            return Err(format!("document {} is empty", i + 1));
        }
        docs.push(v);
    }
    if docs.is_empty() {
        return Err("no YAML document".into());
    }
    Ok(docs)
}

/// A parsed file under deploy/: which documents it holds.
pub struct Loaded {
    pub path: PathBuf,
    pub docs: Vec<Value>,
}

/// Files under deploy/ that hold no YAML or JSON, and what checks them instead.
pub const NOT_DATA: [(&str, &str); 3] = [
    (
        "deploy/Dockerfile",
        "the_image_runs_what_the_manifests_expect",
    ),
    ("deploy/README.md", "the_readme_names_every_deploy_file"),
    (
        "deploy/shardgate.service",
        "a systemd unit, documented in deploy/README.md",
    ),
];

/// Parses every file under deploy/: YAML and JSON by extension; the few others must be listed
/// in `NOT_DATA`. Returns the parsed files and every problem.
pub fn load_deploy() -> (Vec<Loaded>, Vec<String>) {
    let mut loaded = Vec::new();
    let mut problems = Vec::new();
    for path in files_under(&deploy_dir()) {
        let shown = path.display().to_string();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let docs = match ext {
            "yaml" | "yml" => yaml_documents(&read(&path)),
            "json" => serde_json::from_str::<Value>(&read(&path))
                .map(|v| vec![v])
                .map_err(|e| e.to_string()),
            _ if NOT_DATA.iter().any(|(p, _)| *p == shown) => continue,
            _ => Err("neither YAML nor JSON, and not a known file: add a check for it".into()),
        };
        match docs {
            Ok(docs) => {
                for (i, d) in docs.iter().enumerate() {
                    if !d.is_object() {
                        problems.push(format!("{shown}: document {} is not a mapping", i + 1));
                    }
                }
                loaded.push(Loaded { path, docs });
            }
            Err(e) => problems.push(format!("{shown}: {e}")),
        }
    }
    (loaded, problems)
}

/// A document of `loaded` by its path.
pub fn loaded_file<'a>(loaded: &'a [Loaded], path: &str) -> &'a Loaded {
    loaded
        .iter()
        .find(|l| l.path == Path::new(path))
        .unwrap_or_else(|| panic!("{path} is missing"))
}

/// GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to `-`.
pub fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Checks a `path#anchor` link relative to the repository root: the file exists and has a
/// heading with that anchor.
pub fn doc_link_problem(link: &str) -> Option<String> {
    let (file, anchor) = link.split_once('#').unwrap_or((link, ""));
    let Ok(text) = std::fs::read_to_string(repo().join(file)) else {
        return Some(format!("`{link}`: no file {file}"));
    };
    if anchor.is_empty() {
        return None;
    }
    let found = text
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| l.trim_start_matches('#'))
        .any(|h| anchor_of(h) == anchor);
    (!found).then(|| format!("`{link}`: {file} has no heading with anchor #{anchor}"))
}
