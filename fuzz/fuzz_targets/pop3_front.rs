//! The pop3 front end on any bytes: no panic, bounded output (mirrors the proptest in
//! src/protocol/pop3/front.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::config::Protocol;
use portcullis::protocol::harness::{run_front, settings};

fuzz_target!(|data: &[u8]| {
    let (out, _) = run_front(Protocol::Pop3, settings(), vec![data.to_vec()]);
    assert!(out.len() < 64 * 1024);
});
