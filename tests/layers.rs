//! Layers point one way. docs/ARCHITECTURE.md's layer table says which
//! folders of `src/` each folder may use; this test reads that table and
//! every `crate::…` path in `src/**/*.rs` (code only: comments and strings
//! are skipped) and fails on a path the table does not allow — and on a
//! table that does not point one way, or that misses a folder.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A row of the layer table.
#[derive(Debug)]
struct Layer {
    /// Its rank: a folder may use only folders of a lower rank.
    rank: u32,
    /// The folders it may use.
    may_use: BTreeSet<String>,
}

/// The layer table of docs/ARCHITECTURE.md: the one whose header is
/// `| layer | folder | may use | … |`, by folder.
fn layer_table(root: &Path) -> BTreeMap<String, Layer> {
    let text = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with("| layer | folder | may use |"));
    assert!(
        lines.next().is_some(),
        "docs/ARCHITECTURE.md has no layer table"
    );
    let mut table = BTreeMap::new();
    for line in lines.skip(1).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let rank = cells[0]
            .parse()
            .unwrap_or_else(|_| panic!("layer {:?} is not a number: {line}", cells[0]));
        let names = |cell: &str| -> BTreeSet<String> {
            cell.split(',')
                .map(|n| n.trim().trim_matches('`').trim_end_matches('/').to_string())
                .filter(|n| !n.is_empty() && n != "—" && n != "nothing")
                .collect()
        };
        for folder in names(cells[1]) {
            let row = Layer {
                rank,
                may_use: names(cells[2]),
            };
            assert!(
                table.insert(folder.clone(), row).is_none(),
                "{folder} twice"
            );
        }
    }
    table
}

/// The top-level modules of `src/`: its folders and its files other than
/// `lib.rs` and `main.rs`.
fn modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_stem()?.to_str()?.to_string();
            let is_module = p.is_dir() || p.extension().is_some_and(|e| e == "rs");
            (is_module && name != "lib" && name != "main").then_some(name)
        })
        .collect()
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `source` with comments, strings and character literals blanked out
/// (lines kept, for messages).
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&chars, i) {
            // A raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                match chars.get(j) {
                    None => break,
                    Some('"') if (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) => {
                        j += 1 + hashes;
                        break;
                    }
                    Some(_) => j += 1,
                }
            }
            out.extend(chars[i..j.min(chars.len())].iter().map(|&c| blank(c)));
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if let Some(&c) = chars.get(i) {
                    out.push(blank(c));
                }
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && next == Some('\\') {
            // '\n', '\'', '\u{..}'
            let mut j = i + 2;
            while j < chars.len() && chars[j] != '\'' {
                j += 1;
            }
            out.extend(chars[i..=j.min(chars.len() - 1)].iter().map(|&c| blank(c)));
            i = j + 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            out.push_str("   ");
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Whether the character before `i` continues an identifier (so `r` is not
/// a raw string's prefix, as in `for"`… never, but `bar"`).
fn ident_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// The first segment of every `crate::` path in `code`, with its line:
/// `crate::net::socket` gives `net`; `crate::{core::x, net::y}` gives both.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let line = code[..at].matches('\n').count() + 1;
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            let mut items = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => items.push(std::mem::take(&mut item)),
                    _ if depth == 0 => item.push(c),
                    _ => {}
                }
            }
            items.push(item);
            for item in items {
                let first = first_segment(&item);
                if !first.is_empty() && first != "self" {
                    found.push((line, first));
                }
            }
        } else {
            found.push((line, first_segment(rest)));
        }
    }
    found
}

/// The identifier `path` starts with.
fn first_segment(path: &str) -> String {
    path.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The table points one way and covers exactly the modules of `src/`
/// (and `lib.rs` declares exactly them).
#[test]
fn the_layer_table_points_one_way_and_covers_src() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let table = layer_table(root);
    for (folder, layer) in &table {
        for used in &layer.may_use {
            let below = table
                .get(used)
                .unwrap_or_else(|| panic!("{folder} may use {used}, which has no row"));
            assert!(
                below.rank < layer.rank,
                "{folder} (layer {}) may use {used} (layer {}): layers must point down",
                layer.rank,
                below.rank
            );
        }
    }
    let src = root.join("src");
    let in_table: BTreeSet<String> = table.keys().cloned().collect();
    assert_eq!(
        modules(&src),
        in_table,
        "src/'s modules and ARCHITECTURE.md's layer table differ"
    );
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect();
    assert_eq!(
        declared, in_table,
        "lib.rs's modules and the layer table differ"
    );
}

/// No module uses a layer above it, or beside it, unless the table says it
/// may.
#[test]
fn no_module_imports_a_layer_it_may_not_use() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let table = layer_table(root);
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let module = relative
            .iter()
            .next()
            .and_then(|c| Path::new(c).file_stem())
            .and_then(|s| s.to_str())
            .unwrap()
            .to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let layer = table
            .get(&module)
            .unwrap_or_else(|| panic!("src/{module} has no row in the layer table"));
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        for (line, used) in crate_paths(&code) {
            if used != module && !layer.may_use.contains(&used) {
                wrong.push(format!(
                    "src/{}:{line}: {module} uses crate::{used}",
                    relative.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports the layer table (docs/ARCHITECTURE.md) does not allow:\n{}",
        wrong.join("\n")
    );
}

/// The scanner itself: paths in code count, in comments and strings not.
#[test]
fn the_scanner_reads_code_not_comments_or_strings() {
    let source = r##"
use crate::core::hub;
use crate::{net::socket, runtime::{self, relay}};
// use crate::cli::config;
/* crate::servers::echo */
let s = "crate::clients::chat";
let r = r#"crate::cluster"#;
let c = '"'; let d = crate::error::Error::Config;
fn f<'a>(x: &'a str) -> &'a str { $crate::config::x }
"##;
    let found: Vec<String> = crate_paths(&code_only(source))
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert_eq!(found, ["core", "net", "runtime", "error", "config"]);
}
