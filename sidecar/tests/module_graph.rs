//! The shape of the code, checked: no cycle between the top-level modules of the data plane
//! (`sidecar/src`) or of the CLI (`sidecar/cli/src`). An edge is a `crate::<module>` path outside
//! `#[cfg(test)]` code. A cycle means two modules can only be read together; break it by moving
//! the shared piece down (as `decide/` and `telemetry/` sit below `l4/` and `l7/`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file belongs to: the first component below `root`, without `.rs`.
fn top_module(root: &Path, file: &Path) -> String {
    let first = file
        .strip_prefix(root)
        .unwrap()
        .components()
        .next()
        .unwrap();
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

/// Module names after `crate::`, and inside `use crate::{a, b::c}` groups.
fn references(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(group.split(',').map(|p| ident(p.trim())));
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self" && m != "super");
    out
}

fn graph(root: &Path) -> Graph {
    let mut files = Vec::new();
    sources(root, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let module = top_module(root, &file);
        if ["lib", "main", "test_util"].contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let to = graph.entry(module.clone()).or_default();
        to.extend(references(code).into_iter().filter(|m| *m != module));
    }
    graph
}

/// Every cycle a depth-first walk meets, as the list of modules around it.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    fn visit(
        g: &Graph,
        n: &str,
        seen: &mut BTreeMap<String, bool>,
        stack: &mut Vec<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        seen.insert(n.to_owned(), true);
        stack.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            match seen.get(m) {
                Some(true) => {
                    let from = stack.iter().position(|s| s == m).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(m.clone());
                    found.push(cycle);
                }
                Some(false) => {}
                None => visit(g, m, seen, stack, found),
            }
        }
        stack.pop();
        seen.insert(n.to_owned(), false);
    }
    let (mut seen, mut found) = (BTreeMap::new(), Vec::new());
    for n in graph.keys() {
        if !seen.contains_key(n) {
            visit(graph, n, &mut seen, &mut Vec::new(), &mut found);
        }
    }
    found
}

fn assert_acyclic(dir: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let g = graph(&root);
    assert!(g.len() > 3, "{dir}: only {} modules read", g.len());
    let found = cycles(&g);
    assert!(found.is_empty(), "{dir}: module cycles {found:?}");
}

#[test]
fn the_data_plane_modules_form_no_cycle() {
    assert_acyclic("src");
}

#[test]
fn the_cli_modules_form_no_cycle() {
    assert_acyclic("cli/src");
}

#[test]
fn a_cycle_is_found() {
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c", "a"]]);
}

#[test]
fn references_read_paths_and_use_groups() {
    let code = "use crate::{l4::x, telemetry};\nlet y = crate::decide::pick::choose();";
    let r: Vec<String> = references(code).into_iter().collect();
    assert_eq!(r, ["decide", "l4", "telemetry"]);
}
