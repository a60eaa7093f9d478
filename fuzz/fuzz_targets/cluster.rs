//! The cluster's receiving side: batch parsing, the tag check under the
//! cluster key, and one room's stream state (`udphub::fuzzing::cluster`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| udphub::fuzzing::cluster(data));
