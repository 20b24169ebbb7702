//! The layout shown in `src/lib.rs` and docs/architecture.md, checked: modules grouped by
//! role import each other without a cycle, the topology snapshot imports no part of the data
//! path but route matching and the upstream pool, the upstream pool imports nothing above it,
//! and neither the data path nor the control plane reaches up into the operator side or the
//! development tools.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const GROUPS: [&str; 4] = ["data", "control", "operator", "dev"];

/// `group::module` for a file under a role directory, `module` for one at the top.
fn module_of(rel: &Path) -> Option<String> {
    let parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let first = parts.first()?;
    if first == "lib" || first == "main" || parts.last().is_some_and(|l| l == "tests") {
        return None;
    }
    let depth = if GROUPS.contains(&first.as_str()) {
        2
    } else {
        1
    };
    (parts.len() >= depth).then(|| parts[..depth].join("::"))
}

/// The module named by a path after `crate::`.
fn target_of(path: &str) -> String {
    let segs: Vec<&str> = path.split("::").collect();
    let depth = if GROUPS.contains(&segs[0]) { 2 } else { 1 };
    segs[..depth.min(segs.len())].join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Module → the modules it imports (`crate::…` outside comments and test code).
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src/");
        let Some(module) = module_of(rel) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("a source file is readable");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let edges = graph.entry(module.clone()).or_default();
        for line in code.lines() {
            let line = line.split("//").next().unwrap_or_default();
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c == ':'))
                    .unwrap_or(rest.len());
                let path = rest[..end].trim_end_matches(':');
                if path.is_empty() {
                    continue;
                }
                let target = target_of(path);
                if target != module && !target.starts_with(char::is_uppercase) {
                    edges.insert(target);
                }
            }
        }
    }
    graph
}

/// A cycle through `from`, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

fn imports_of<'a>(
    graph: &'a BTreeMap<String, BTreeSet<String>>,
    module: &str,
) -> &'a BTreeSet<String> {
    graph.get(module).unwrap_or_else(|| {
        panic!("{module} is not in src/ any more: update this test and the module map")
    })
}

#[test]
fn the_scan_sees_the_modules_and_their_imports() {
    let graph = import_graph();
    // The scan itself can be wrong: it must see what is known to be there.
    assert!(imports_of(&graph, "data::proxy").contains("control::topology"));
    assert!(imports_of(&graph, "data::forward").contains("data::upstream"));
    assert!(graph.len() >= 25, "only {} modules found", graph.len());
}

#[test]
fn modules_import_each_other_without_a_cycle() {
    let graph = import_graph();
    assert_eq!(cycle(&graph), None, "an import cycle between modules");
}

#[test]
fn the_topology_snapshot_imports_no_data_path_module_but_routes_and_pools() {
    let graph = import_graph();
    let wrong: Vec<&String> = imports_of(&graph, "control::topology")
        .iter()
        .filter(|m| {
            !matches!(m.as_str(), "data::route" | "data::upstream")
                && !m.starts_with("control::")
                && !matches!(m.as_str(), "config" | "telemetry" | "util")
        })
        .collect();
    assert!(wrong.is_empty(), "control::topology imports {wrong:?}");
}

#[test]
fn the_upstream_pool_imports_nothing_above_it() {
    let graph = import_graph();
    let wrong: Vec<&String> = imports_of(&graph, "data::upstream")
        .iter()
        .filter(|m| !matches!(m.as_str(), "config" | "telemetry" | "util"))
        .collect();
    assert!(wrong.is_empty(), "data::upstream imports {wrong:?}");
}

#[test]
fn the_gateway_itself_never_imports_the_operator_side_or_dev_tools() {
    let graph = import_graph();
    let mut wrong = Vec::new();
    for (module, imports) in &graph {
        if module.starts_with("data::") || module.starts_with("control::") || !module.contains("::")
        {
            for m in imports {
                if m.starts_with("operator::") || m.starts_with("dev::") {
                    wrong.push(format!("{module} -> {m}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "upward imports: {wrong:?}");
}
