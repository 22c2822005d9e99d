//! The crate's layering, checked from its source: every `use` and every `crate::`/`super::`
//! path in `src/` (test modules aside) is an import edge between modules, and
//! - among the children of any module (the top-level modules of the crate, the folders inside
//!   `compute/`, …) the imports form no circle: an edge between two files counts as an edge
//!   between the siblings whose subtrees hold them, while a module and its own descendants are
//!   one unit (a `mod.rs` is its children's facade);
//! - each top-level module imports only the modules `docs/ARCHITECTURE.md` §1 allows it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// A module path inside the crate, e.g. `["compute", "cpu", "kernels"]`; `[]` is the root.
type ModPath = Vec<String>;

/// What each top-level module may import (besides itself). The order is the layering, lowest
/// first: a module imports only modules above it in this list.
const ALLOWED: &[(&str, &[&str])] = &[
    ("device", &[]),
    ("compute", &["device"]),
    ("formats", &["compute", "device"]),
    ("models", &["formats", "compute", "device"]),
    ("text", &["formats"]),
    ("request", &["text"]),
    ("scheduler", &["request"]),
    (
        "engine",
        &["scheduler", "request", "models", "formats", "compute", "text", "device"],
    ),
    ("output", &["engine", "request", "text"]),
    ("catalog", &["request", "models", "formats", "text"]),
    ("config", &["engine", "request", "text", "device"]),
    (
        "server",
        &[
            "config", "catalog", "output", "engine", "request", "models", "formats", "text", "device",
        ],
    ),
    ("bench", &["server", "request"]),
];

#[test]
fn no_import_circles_among_siblings() {
    let edges = import_edges();
    let mut sibling_edges: BTreeMap<ModPath, BTreeSet<(String, String)>> = BTreeMap::new();
    for (from, tos) in &edges {
        for to in tos {
            let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // a module and its own descendant
            }
            sibling_edges
                .entry(from[..common].to_vec())
                .or_default()
                .insert((from[common].clone(), to[common].clone()));
        }
    }
    let mut circles = Vec::new();
    for (parent, edges) in &sibling_edges {
        if let Some(circle) = find_circle(edges) {
            let at = if parent.is_empty() {
                "crate".into()
            } else {
                parent.join("::")
            };
            circles.push(format!("in {at}: {}", circle.join(" → ")));
        }
    }
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
}

#[test]
fn top_level_modules_import_only_what_the_layering_allows() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = BTreeSet::new();
    for (from, tos) in import_edges() {
        let (Some(a), false) = (from.first(), from.is_empty()) else {
            continue;
        };
        if a == "main" {
            continue; // the binary sits above everything
        }
        let Some(may) = allowed.get(a.as_str()) else {
            panic!("top-level module `{a}` is missing from ALLOWED (and from ARCHITECTURE.md §1)");
        };
        for to in tos {
            let b = &to[0];
            if b != a && !may.contains(&b.as_str()) {
                wrong.insert(format!("{} imports {}", from.join("::"), to.join("::")));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_checker_sees_circles_and_relative_paths() {
    // A → B → C → A is a circle; A → B, A → C is not.
    let set = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert!(find_circle(&set(&[("a", "b"), ("b", "c"), ("c", "a")])).is_some());
    assert!(find_circle(&set(&[("a", "b"), ("a", "c"), ("b", "c")])).is_none());
    // `super::`, a child module by its bare name and `crate::` paths all resolve.
    let modules: BTreeSet<ModPath> = [vec![], p("x"), p("x::a"), p("x::b"), p("y")].into_iter().collect();
    let file: syn::File = syn::parse_quote! {
        use super::y::Thing;
        use a::Other;
        fn f() { crate::x::b::g(); }
        #[cfg(test)]
        mod tests { use crate::y::Hidden; }
    };
    let mut seen = Collector::new(&modules, p("x"));
    seen.visit_file(&file);
    let want: BTreeSet<ModPath> = [p("y"), p("x::a"), p("x::b")].into_iter().collect();
    assert_eq!(seen.edges, want);
}

fn p(s: &str) -> ModPath {
    s.split("::").map(String::from).collect()
}

/// Every file module's imports of other modules (resolved to the deepest module that exists).
fn import_edges() -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = module_files(&src);
    assert!(
        files.len() > 50,
        "found only {} source files under {}",
        files.len(),
        src.display()
    );
    let modules: BTreeSet<ModPath> = files.keys().cloned().collect();
    let mut edges = BTreeMap::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut c = Collector::new(&modules, module.clone());
        c.visit_file(&file);
        c.edges.remove(module);
        edges.insert(module.clone(), c.edges);
    }
    edges
}

/// `src/` file → module path (`foo/mod.rs` and `foo.rs` are `foo`; `lib.rs` the root; `main.rs`
/// the binary, named `main`).
fn module_files(src: &Path) -> BTreeMap<ModPath, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: ModPath = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
                parts.pop();
            }
            out.insert(parts, path);
        }
    }
    out
}

/// Walks one file, resolving paths against the module they are written in (inline modules
/// such as `mod imp { … }` included) and skipping `#[cfg(test)]` items.
struct Collector<'a> {
    modules: &'a BTreeSet<ModPath>,
    /// The module the walk is in now.
    here: ModPath,
    edges: BTreeSet<ModPath>,
}

impl<'a> Collector<'a> {
    fn new(modules: &'a BTreeSet<ModPath>, here: ModPath) -> Self {
        Self {
            modules,
            here,
            edges: BTreeSet::new(),
        }
    }

    /// Records the module a path names, if it names one of the crate's: the deepest module
    /// along it, or the module it starts from when it names that module's item.
    fn record(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else { return };
        let (mut base, mut rest): (ModPath, &[String]) = match first.as_str() {
            "crate" | "mlxd" => (vec![], &segments[1..]),
            "self" => (self.here.clone(), &segments[1..]),
            "super" => (self.here.clone(), segments),
            _ => {
                let mut child = self.here.clone();
                child.push(first.clone());
                if !self.modules.contains(&child) {
                    return; // an item, a local or another crate
                }
                (self.here.clone(), segments)
            }
        };
        while rest.first().is_some_and(|s| s == "super") {
            base.pop();
            rest = &rest[1..];
        }
        let mut target = base.clone();
        let mut deepest = base;
        for s in rest {
            target.push(s.clone());
            if self.modules.contains(&target) {
                deepest = target.clone();
            }
        }
        if self.modules.contains(&deepest) {
            self.edges.insert(deepest);
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.leaf(prefix, &n.ident),
            syn::UseTree::Rename(r) => self.leaf(prefix, &r.ident),
            syn::UseTree::Glob(_) => self.record(&prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    fn leaf(&mut self, prefix: &[String], ident: &syn::Ident) {
        let mut full = prefix.to_vec();
        if ident != "self" {
            full.push(ident.to_string());
        }
        self.record(&full);
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| a.path().is_ident("cfg") && a.parse_args::<syn::Meta>().is_ok_and(|m| m.path().is_ident("test")))
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            _ => &[],
        };
        if is_cfg_test(attrs) {
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if m.content.is_none() {
            return; // a file module: walked on its own
        }
        self.here.push(m.ident.to_string());
        syn::visit::visit_item_mod(self, m);
        self.here.pop();
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if segments.len() > 1 {
            self.record(&segments);
        }
        syn::visit::visit_path(self, path);
    }
}

/// One circle in a directed graph, as its nodes in order (the first repeated at the end).
fn find_circle(edges: &BTreeSet<(String, String)>) -> Option<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges {
        next.entry(a).or_default().push(b);
    }
    // 0 unseen, 1 on the current path, 2 done.
    let mut state: BTreeMap<&str, u8> = BTreeMap::new();
    let mut path: Vec<&str> = Vec::new();
    fn dfs<'a>(
        n: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(n, 1);
        path.push(n);
        for &m in next.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|&x| x == m).unwrap();
                    let mut circle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                    circle.push(m.to_string());
                    return Some(circle);
                }
                0 => {
                    if let Some(c) = dfs(m, next, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n, 2);
        None
    }
    let nodes: Vec<&str> = next.keys().copied().collect();
    for n in nodes {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = dfs(n, &next, &mut state, &mut path) {
                return Some(c);
            }
        }
    }
    None
}
