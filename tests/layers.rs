//! The top-level modules of `src` form layers: no module names, through
//! `crate::` paths, one that names it back, directly or through others.
//!
//! A top-level module is `src/NAME.rs` or `src/NAME/`. An arrow A -> B is a
//! `crate::B` path anywhere in A's files (use lines, grouped uses and inline
//! paths; inline test modules count), comments aside. Files named `tests.rs`
//! hold a module's tests alone and do not count: a test may build what it
//! tests from any layer.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Arrows = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

#[test]
fn top_level_modules_form_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = top_level_modules(&src);
    assert!(modules.len() > 10, "found only {modules:?} under {src:?}");
    let arrows = arrows(&src, &modules);
    let circles = circles(&modules, &arrows);
    let mut report = String::new();
    for circle in &circles {
        report.push_str(&format!("circle: {}\n", circle.join(" <-> ")));
        for a in circle {
            for b in circle {
                for why in arrows[a].get(b).into_iter().flatten().take(4) {
                    report.push_str(&format!("  {a} -> {b}   {why}\n"));
                }
            }
        }
    }
    assert!(
        circles.is_empty(),
        "import circles between modules:\n{report}"
    );
}

/// The order `src/lib.rs` lists the modules in is their layering: each
/// names only modules listed before it.
#[test]
fn modules_name_only_the_layers_listed_before_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = top_level_modules(&src);
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let listed: Vec<&str> = lib
        .lines()
        .filter_map(|line| line.strip_prefix("//! - [`")?.split('`').next())
        .collect();
    let mut unlisted: Vec<&String> = modules
        .iter()
        .filter(|m| !listed.contains(&m.as_str()))
        .collect();
    unlisted.sort();
    assert!(unlisted.is_empty(), "src/lib.rs does not list {unlisted:?}");
    let arrows = arrows(&src, &modules);
    let mut upward = Vec::new();
    for (module, targets) in &arrows {
        let layer = listed.iter().position(|m| m == module).unwrap();
        for (target, why) in targets {
            if listed.iter().position(|m| m == target).unwrap() > layer {
                upward.push(format!(
                    "{module} -> {target}: {}",
                    why.iter().next().unwrap()
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "modules naming a later layer:\n{}",
        upward.join("\n")
    );
}

/// The checker itself: it sees a circle where there is one.
#[test]
fn a_circle_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    fs::create_dir(src.join("engine")).unwrap();
    fs::write(src.join("lib.rs"), "pub mod config; pub mod engine;").unwrap();
    fs::write(
        src.join("config.rs"),
        "// crate::engine in a comment is no arrow\nuse crate::{flow::Port, engine::PortMask};\n",
    )
    .unwrap();
    fs::write(src.join("flow.rs"), "").unwrap();
    fs::write(
        src.join("engine/mod.rs"),
        "fn f() -> crate::flow::Port { todo!() }",
    )
    .unwrap();
    fs::write(src.join("engine/tests.rs"), "use crate::config::Config;").unwrap();
    let modules = top_level_modules(src);
    assert_eq!(modules, ["config", "engine", "flow"]);
    let mut arrows = arrows(src, &modules);
    assert!(
        circles(&modules, &arrows).is_empty(),
        "tests.rs does not count"
    );
    fs::write(src.join("engine/check.rs"), "use crate::config::Document;").unwrap();
    arrows = self::arrows(src, &modules);
    assert_eq!(circles(&modules, &arrows), [vec!["config", "engine"]]);
}

fn top_level_modules(src: &Path) -> Vec<String> {
    let mut modules: Vec<String> = fs::read_dir(src)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_owned();
            match name.strip_suffix(".rs") {
                Some("lib" | "main") => None,
                Some(stem) => Some(stem.to_owned()),
                None if path.is_dir() => Some(name),
                None => None,
            }
        })
        .collect();
    modules.sort();
    modules
}

fn rust_files(path: &Path, files: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), files);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        files.push(path.to_owned());
    }
}

/// Every arrow between modules, with the paths that make it.
fn arrows(src: &Path, modules: &[String]) -> Arrows {
    let mut arrows = Arrows::new();
    for module in modules {
        let mut files = Vec::new();
        let dir = src.join(module);
        match dir.is_dir() {
            true => rust_files(&dir, &mut files),
            false => files.push(src.join(format!("{module}.rs"))),
        }
        let targets = arrows.entry(module.clone()).or_default();
        for file in files.iter().filter(|f| !f.ends_with("tests.rs")) {
            let text = without_comments(&fs::read_to_string(file).unwrap());
            let shown = file.strip_prefix(src).unwrap().display().to_string();
            for path in crate_paths(&text) {
                let target = path.split("::").next().unwrap_or_default();
                if target != module && modules.iter().any(|m| m == target) {
                    let why = format!("{shown}: crate::{path}");
                    targets.entry(target.to_owned()).or_default().insert(why);
                }
            }
        }
    }
    arrows
}

fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths after each `crate::`, a grouped `crate::{a::X, b}` taken
/// apart: `engine::PortMask`, `a::X`, `b`.
fn crate_paths(text: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let preceded = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `mycrate::`, not `crate::`
        }
        match rest.strip_prefix('{') {
            Some(group) => {
                let end = closing_brace(group);
                paths.extend(top_level_items(&group[..end]));
                rest = &group[end..];
            }
            None => {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .unwrap_or(rest.len());
                paths.push(rest[..end].to_owned());
            }
        }
    }
    paths
}

/// Where the group that `text` starts inside of ends.
fn closing_brace(text: &str) -> usize {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

/// The comma-separated items of a use group, nested groups kept whole.
fn top_level_items(group: &str) -> Vec<String> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(group[start..i].trim().to_owned());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(group[start..].trim().to_owned());
    items.retain(|item| !item.is_empty());
    items
}

/// The groups of modules that reach each other (each a circle), sorted.
fn circles(modules: &[String], arrows: &Arrows) -> Vec<Vec<String>> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut next = vec![from.to_owned()];
        while let Some(module) = next.pop() {
            for target in arrows.get(&module).into_iter().flat_map(BTreeMap::keys) {
                if seen.insert(target.clone()) {
                    next.push(target.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&str, BTreeSet<String>> =
        modules.iter().map(|m| (m.as_str(), reach(m))).collect();
    let mut circles: Vec<Vec<String>> = Vec::new();
    for module in modules {
        if !reached[module.as_str()].contains(module)
            || circles.iter().any(|circle| circle.contains(module))
        {
            continue;
        }
        let circle = modules
            .iter()
            .filter(|other| {
                reached[module.as_str()].contains(*other)
                    && reached[other.as_str()].contains(module)
            })
            .cloned()
            .collect();
        circles.push(circle);
    }
    circles
}
