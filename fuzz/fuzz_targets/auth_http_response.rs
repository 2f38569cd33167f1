//! auth_http response headers (mirrors tests/parsers.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = hyper::HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(i) = line.iter().position(|b| *b == b':') else { continue };
        let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(&line[..i]),
            hyper::header::HeaderValue::from_bytes(&line[i + 1..]),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let _ = portcullis::auth::http::parse_response(&headers);
});
