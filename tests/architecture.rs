//! The module layering of ARCHITECTURE.md, checked against the code.
//!
//! Reads every `crate::` path in `src/**/*.rs` (the binary's `main.rs`
//! aside: it uses the library from outside), maps each file to its
//! top-level module, and fails on an import between top-level modules that
//! the layer table forbids (a module may use only modules of lower layers)
//! or on any cycle between them. It also fails when a module exists that
//! the table or `lib.rs`'s module map does not name, or the reverse.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// One `crate::x` use inside top-level module `from`.
#[derive(Debug, Clone)]
struct Edge {
    from: String,
    to: String,
    at: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Top-level modules by layer, from the table rows `| N | `a`, `b` | … |`.
fn layers(architecture: &str) -> BTreeMap<String, u32> {
    let mut layers = BTreeMap::new();
    for line in architecture.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[0].is_empty() {
            continue;
        }
        let Ok(layer) = cells[1].parse::<u32>() else {
            continue;
        };
        for name in cells[2].split('`').skip(1).step_by(2) {
            layers.insert(name.to_owned(), layer);
        }
    }
    layers
}

/// `pub mod x;` / `mod x;` of lib.rs.
fn declared_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned)
        })
        .collect()
}

fn ident(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The first segment of every `crate::` path in `source`, grouped imports
/// (`crate::{a::b, c}`) included, with its line number.
fn crate_paths(source: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (at, _) in source.match_indices("crate::") {
        let before = source[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let line = source[..at].matches('\n').count() + 1;
        let rest = &source[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        item_start = true;
                        continue;
                    }
                    c if c.is_whitespace() => continue,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if item_start && depth == 1 {
                    let name = ident(&group[i..]);
                    if !name.is_empty() {
                        found.push((name.to_owned(), line + group[..i].matches('\n').count()));
                    }
                    item_start = false;
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.push((name.to_owned(), line));
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("src is readable")
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::` use between two different top-level modules of `src`.
fn edges(src: &Path) -> Vec<Edge> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut edges = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a component");
        let first = first.as_os_str().to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "main" || module == "lib" {
            continue;
        }
        let source = fs::read_to_string(&file).expect("source is readable");
        for (to, line) in crate_paths(&source) {
            if to != module {
                edges.push(Edge {
                    from: module.clone(),
                    to,
                    at: format!("src/{}:{line}", rel.display()),
                });
            }
        }
    }
    edges
}

/// Strongly connected components of more than one module.
fn cycles(edges: &[Edge]) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in edges {
        graph.entry(&e.from).or_default().insert(&e.to);
        graph.entry(&e.to).or_default();
    }
    // Kosaraju: finishing order on the graph, then components on its reverse.
    fn visit<'a>(
        v: &'a str,
        g: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        seen: &mut BTreeSet<&'a str>,
        out: &mut Vec<&'a str>,
    ) {
        if !seen.insert(v) {
            return;
        }
        for &w in &g[v] {
            visit(w, g, seen, out);
        }
        out.push(v);
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for &v in graph.keys() {
        visit(v, &graph, &mut seen, &mut order);
    }
    let mut reverse: BTreeMap<&str, BTreeSet<&str>> = graph.keys().map(|&v| (v, BTreeSet::new())).collect();
    for (&v, ws) in &graph {
        for &w in ws {
            reverse.entry(w).or_default().insert(v);
        }
    }
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    for &v in order.iter().rev() {
        let mut component = Vec::new();
        visit(v, &reverse, &mut seen, &mut component);
        if component.len() > 1 {
            component.sort_unstable();
            found.push(component.into_iter().map(str::to_owned).collect());
        }
    }
    found
}

/// Everything wrong with `edges` under `layers`, one line each.
fn violations(edges: &[Edge], layers: &BTreeMap<String, u32>) -> Vec<String> {
    let mut wrong = Vec::new();
    for cycle in cycles(edges) {
        wrong.push(format!("import cycle between {}", cycle.join(", ")));
    }
    for e in edges {
        match (layers.get(&e.from), layers.get(&e.to)) {
            (Some(from), Some(to)) if to < from => {}
            (Some(from), Some(to)) => wrong.push(format!(
                "{}: `{}` (layer {from}) uses `{}` (layer {to}); a module may use only lower layers",
                e.at, e.from, e.to
            )),
            _ => wrong.push(format!(
                "{}: `{}` uses `{}`, and one of them is in no layer of ARCHITECTURE.md",
                e.at, e.from, e.to
            )),
        }
    }
    wrong
}

#[test]
fn top_level_modules_import_only_lower_layers_and_form_no_cycle() {
    let architecture = fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let layers = layers(&architecture);
    let edges = edges(&root().join("src"));
    assert!(edges.len() > 100, "the scan found only {} imports", edges.len());
    let wrong = violations(&edges, &layers);
    assert!(
        wrong.is_empty(),
        "the module layering is broken:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_module_is_in_the_layer_table_and_the_module_map() {
    let architecture = fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let lib = fs::read_to_string(root().join("src/lib.rs")).expect("lib.rs");
    let declared = declared_modules(&lib);
    let layered: BTreeSet<String> = layers(&architecture).into_keys().collect();
    assert!(declared.len() > 20, "lib.rs declares only {declared:?}");
    assert_eq!(
        declared, layered,
        "lib.rs's modules and ARCHITECTURE.md's layer table differ"
    );
    let unmapped: Vec<_> = declared
        .iter()
        .filter(|m| !lib.contains(&format!("[`{m}`]")))
        .collect();
    assert!(
        unmapped.is_empty(),
        "lib.rs's module map does not name {unmapped:?}"
    );
}

fn edge(from: &str, to: &str) -> Edge {
    Edge {
        from: from.into(),
        to: to.into(),
        at: "src/x.rs:1".into(),
    }
}

#[test]
fn the_check_catches_a_back_edge_and_a_cycle() {
    let layers = layers(
        "| layer | modules |\n|---|---|\n| 0 | `clock` | |\n| 1 | `store`, `job` | |\n| 2 | `api` | |\n",
    );
    assert_eq!(layers.len(), 4);
    assert!(violations(&[edge("api", "store"), edge("store", "clock")], &layers).is_empty());
    let back = violations(&[edge("store", "api")], &layers);
    assert_eq!(back.len(), 1, "{back:?}");
    let sideways = violations(&[edge("store", "job")], &layers);
    assert_eq!(sideways.len(), 1, "{sideways:?}");
    let cycle = violations(&[edge("api", "store"), edge("store", "api")], &layers);
    assert!(cycle[0].contains("cycle between api, store"), "{cycle:?}");
    assert_eq!(violations(&[edge("api", "ghost")], &layers).len(), 1);
}

#[test]
fn grouped_and_nested_crate_paths_are_read() {
    let found = crate_paths(
        "use crate::store::Store;\nuse crate::{job::{Job, JobId}, run,\n  metrics::M};\nfn f() { $crate::x; my_crate::y; crate::clock::now(); }",
    );
    let names: Vec<_> = found.iter().map(|(n, l)| format!("{n}:{l}")).collect();
    assert_eq!(names, ["store:1", "job:2", "run:2", "metrics:3", "clock:4"]);
}
