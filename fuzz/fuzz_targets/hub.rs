//! The whole hub driven by a script of datagrams and time
//! (`udphub::fuzzing::hub`): every datagram counted once, caps held.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| udphub::fuzzing::hub(data));
