//! ARCHITECTURE.md's crate table is a rule, not a picture: every crate's dependencies on our
//! other crates (normal and build, from `cargo metadata`) point only to crates listed above it,
//! and the table's "must not" rules that order alone cannot express hold too. A change that
//! breaks one fails here, naming the edge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Our crates in the order ARCHITECTURE.md's crate table lists them (lowest first).
fn table_order() -> Vec<String> {
    let doc = std::fs::read_to_string(workspace().join("ARCHITECTURE.md")).unwrap();
    let mut section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Crates"))
        .expect("ARCHITECTURE.md has a `## Crates` section")
        .lines();
    let mut order = Vec::new();
    for line in section.by_ref() {
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        if let Some((name, _)) = rest.split_once('`')
            && name.starts_with("firkin")
        {
            order.push(name.to_owned());
        }
    }
    order
}

/// Each workspace crate's normal and build dependencies on our crates.
fn our_dependencies() -> BTreeMap<String, Vec<String>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                // Dev-dependencies may reach anywhere: a test may use a higher crate's fixture.
                .filter(|d| d["kind"].is_null() || d["kind"] == "build")
                .filter_map(|d| d["name"].as_str())
                .filter(|n| n.starts_with("firkin"))
                .map(str::to_owned)
                .collect();
            (p["name"].as_str().unwrap().to_owned(), deps)
        })
        .collect()
}

/// The table's "must not" column, where it forbids a crate listed *below* (which the order
/// alone would allow).
const FORBIDDEN: &[(&str, &str, &str)] = &[
    ("firkin-vmm", "firkin-envd", "the VMM knows nothing of E2B"),
    (
        "firkin-vmm",
        "firkin-e2b-wire",
        "the VMM knows nothing of E2B",
    ),
    (
        "firkin-vmm",
        "firkin-e2b-contract",
        "the VMM knows nothing of E2B",
    ),
    (
        "firkin-vmm",
        "firkin-admission",
        "the VMM knows nothing of capacity",
    ),
    (
        "firkin-server",
        "firkin-vmm",
        "the server never spawns QEMU itself",
    ),
    (
        "firkin-server",
        "firkin-guest",
        "the server never builds guest assets itself",
    ),
    (
        "firkin-e2b-contract",
        "firkin-admission",
        "the contract is plain data",
    ),
];

#[test]
fn every_dependency_points_down_the_crate_table() {
    let order = table_order();
    assert!(order.len() >= 10, "crate table not found: {order:?}");
    let rank = |name: &str| order.iter().position(|n| n == name);
    let deps = our_dependencies();
    let mut broken = Vec::new();
    for (krate, uses) in &deps {
        let Some(mine) = rank(krate) else {
            broken.push(format!("{krate} is not in ARCHITECTURE.md's crate table"));
            continue;
        };
        for dep in uses {
            match rank(dep) {
                Some(theirs) if theirs < mine => {}
                Some(_) => broken.push(format!(
                    "{krate} depends on {dep}, which the crate table lists above it"
                )),
                None => broken.push(format!("{dep} (used by {krate}) is not in the table")),
            }
        }
    }
    for (krate, dep, why) in FORBIDDEN {
        if deps.get(*krate).is_some_and(|d| d.iter().any(|x| x == dep)) {
            broken.push(format!("{krate} depends on {dep}: {why}"));
        }
    }
    for name in &order {
        if !deps.contains_key(name) {
            broken.push(format!(
                "the crate table lists {name}, which is not in the workspace"
            ));
        }
    }
    assert!(
        broken.is_empty(),
        "crate rules broken:\n{}",
        broken.join("\n")
    );
}
