//! Parsers that survive any bytes (reliability section D and case 53): the PROXY header as the
//! listener reads it, and the auth_http response as the auth client reads it. The front ends and
//! SASL have their campaigns beside their code; `fuzz/` mirrors all of them for cargo-fuzz.

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn proxy_header_never_panics_and_never_overreads(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok((_, len)) = proxy_header::ProxyHeader::parse(&bytes, proxy_header::ParseConfig::default()) {
            prop_assert!(len <= bytes.len());
        }
    }

    #[test]
    fn proxy_header_split_anywhere_is_incomplete_not_wrong(src in any::<[u8; 4]>(), port in any::<u16>(), cut in 0usize..28) {
        let h = proxy_header::ProxyHeader::with_address(proxy_header::ProxiedAddress::stream(
            std::net::SocketAddr::from((src, port)),
            "198.51.100.1:143".parse().unwrap(),
        ));
        let mut buf = Vec::new();
        h.encode_v2(&mut buf).unwrap();
        let cut = cut.min(buf.len() - 1);
        // A prefix is never mistaken for a complete header (the listener then waits for more).
        let r = proxy_header::ProxyHeader::parse(&buf[..cut], proxy_header::ParseConfig::default());
        prop_assert!(matches!(r, Err(proxy_header::Error::BufferTooShort)), "{:?}", r.map(|(_, l)| l));
        let (parsed, len) = proxy_header::ProxyHeader::parse(&buf, proxy_header::ParseConfig::default()).unwrap();
        prop_assert_eq!(len, buf.len());
        prop_assert_eq!(parsed.proxied_address().unwrap().source.port(), port);
    }

    #[test]
    fn auth_http_response_never_panics(pairs in proptest::collection::vec(
        (prop_oneof![Just("Auth-Status"), Just("Auth-Server"), Just("Auth-Port"), Just("Auth-Wait"), Just("Auth-User"),
                     Just("Auth-Pass"), Just("Auth-Error-Code"), Just("Auth-Transport"), Just("X-Other")],
         proptest::collection::vec(0x20u8..0x7f, 0..40)), 0..8)) {
        let mut headers = hyper::HeaderMap::new();
        for (k, v) in pairs {
            headers.append(k, hyper::header::HeaderValue::from_bytes(&v).unwrap());
        }
        if let Ok(portcullis::auth::http::Answer::Fail { message, .. }) = portcullis::auth::http::parse_response(&headers) {
            prop_assert!(message.len() <= 200 && message.bytes().all(|b| (0x20..0x7f).contains(&b)));
        }
    }

    #[test]
    fn nginx_escaping_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let escaped = portcullis::auth::http::escape(&bytes);
        // Nothing a header value cannot carry: no control bytes, no spaces.
        prop_assert!(escaped.iter().all(|b| *b > 0x20));
        // Unescape: %XX back to the byte.
        let mut out = Vec::new();
        let e = escaped.as_slice();
        let mut i = 0;
        while i < e.len() {
            if e[i] == b'%' {
                out.push(u8::from_str_radix(std::str::from_utf8(&e[i + 1..i + 3]).unwrap(), 16).unwrap());
                i += 3;
            } else {
                out.push(e[i]);
                i += 1;
            }
        }
        prop_assert_eq!(out, bytes);
    }
}
