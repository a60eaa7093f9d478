//! Replays the committed fuzzing corpus (fuzz/corpus/) through the same
//! entry points libFuzzer runs, on stable: whatever the fuzzer once found
//! stays fixed.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("read a corpus file");
        run(&data);
        n += 1;
    }
    n
}

/// Every datagram-corpus input runs through classify, the grammar, the
/// template, token and cookie parsing without a panic.
#[test]
fn datagram_corpus_replays() {
    assert!(
        replay("datagram", udphub::fuzzing::datagram) > 0,
        "empty corpus"
    );
}

/// Every hub-corpus script runs with every invariant holding.
#[test]
fn hub_corpus_replays() {
    assert!(replay("hub", udphub::fuzzing::hub) > 0, "empty corpus");
}

/// Every cluster-corpus script runs through batch parsing, the tag check
/// and the stream state with every invariant holding.
#[test]
fn cluster_corpus_replays() {
    assert!(
        replay("cluster", udphub::fuzzing::cluster) > 0,
        "empty corpus"
    );
}
