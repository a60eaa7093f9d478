//! The datagram path's pure parts: classify, the control grammar, the
//! template, token and cookie parsing (`udphub::fuzzing::datagram`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| udphub::fuzzing::datagram(data));
