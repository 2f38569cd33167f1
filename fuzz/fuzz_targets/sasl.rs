//! SASL decoding on any bytes (mirrors the proptests in src/protocol/sasl.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = portcullis::protocol::sasl::decode_plain(data);
    let _ = portcullis::protocol::sasl::decode_response(data);
});
