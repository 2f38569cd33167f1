//! PROXY header parsing as the listener uses it (mirrors tests/parsers.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, len)) = proxy_header::ProxyHeader::parse(data, proxy_header::ParseConfig::default()) {
        assert!(len <= data.len());
    }
});
