//! Operations: the admin server, PROXY protocol from a trusted load balancer, and the shutdown
//! goodbye for relayed sessions.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A proxy with an admin server, in front of a fake backend: the backend (kept alive by the
/// caller), the proxy and the admin address.
async fn with_admin() -> (FakeBackend, Proxy, std::net::SocketAddr) {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let cfg = plain_config(backend.addr, "").replace("[limits]", "[admin]\nbind = \"127.0.0.1:0\"\n\n[limits]");
    let proxy = Proxy::start(&cfg, USERS).await;
    let admin = proxy.app.admin_addr().unwrap();
    (backend, proxy, admin)
}

#[tokio::test]
async fn admin_serves_metrics_health_and_readiness() {
    let (_backend, proxy, admin) = with_admin().await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    c.until_tagged("a").await;
    // A 5,000-byte command: more than every other session in this test binary relays, so the
    // count below can only come from this session, still open.
    let long = format!("c NOOP {}\r\n", "x".repeat(5_000));
    c.send(long.as_bytes()).await;
    let reply = c.until_tagged("c").await;
    assert!(reply.last().is_some_and(|l| l.starts_with("c ")), "{reply:?}");
    c.send(b"b LOGIN x\r\n").await;
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    // Relayed bytes are counted while the session is still open.
    for (direction, at_least) in [("client_to_backend", long.len() as u64), ("backend_to_client", 1)] {
        let name = format!("portcullis_relayed_bytes_total{{direction=\"{direction}\",protocol=\"imap\"}} ");
        let value = body.lines().find_map(|l| l.strip_prefix(name.as_str())).and_then(|v| v.parse::<u64>().ok());
        assert!(value.is_some_and(|v| v >= at_least), "{direction}: {value:?} in\n{body}");
    }
    for needle in [
        "portcullis_build_info{version=",
        "portcullis_connections_accepted_total{listener=\"plain\",protocol=\"imap\"}",
        "portcullis_logins_total{mechanism=\"login\",protocol=\"imap\",result=\"success\"}",
        "portcullis_backend_up{backend=\"fake\"} 1",
        "portcullis_backend_sessions{backend=\"fake\"} 1",
        "portcullis_backend_login_duration_seconds_bucket{backend=\"fake\"",
        "portcullis_config_last_reload_success_timestamp_seconds ",
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
    // Never a user or a client address in a label (reliability case 62).
    assert!(!body.contains("alice") && !body.contains("127.0.0.1"));
    assert_eq!(http_get(admin, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(http_get(admin, "/readyz").await, (200, "ready\n".to_string()));
    assert_eq!(http_get(admin, "/nope").await.0, 404);
}

/// A connection to `to` from the loopback address `ip`.
async fn connect_from(ip: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(std::net::SocketAddr::from((ip, 0))).unwrap();
    s.connect(to).await.unwrap()
}

/// One address holding idle connections to the admin port gets eight; more from it are closed
/// at once, and others (the scraper, the health probes) are still served.
#[tokio::test]
async fn one_address_cannot_take_every_admin_connection() {
    let (_backend, _proxy, admin) = with_admin().await;
    let from = |ip: [u8; 4]| async move { Ok::<_, std::io::Error>(connect_from(ip, admin).await) };
    // The status of a GET /healthz on `s`, "" if it is closed unanswered.
    let ask = |mut s: tokio::net::TcpStream| async move {
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(out.get(9..12).unwrap_or_default()).to_string()
    };
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(from([127, 0, 0, 3]).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ask(from([127, 0, 0, 3]).await.unwrap()).await, "", "a ninth connection was served");
    assert_eq!(ask(from([127, 0, 0, 4]).await.unwrap()).await, "200", "another address was refused");
    // A held connection closed gives its place back.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ask(from([127, 0, 0, 3]).await.unwrap()).await, "200");
    drop(held);
}

#[tokio::test]
async fn readiness_reports_a_pool_without_healthy_backends_but_stays_ready() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cfg = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nprotocol = \"imap\"\ntls = \"none\"\n[auth]\nsource = \"backend\"\n[[backend]]\nname = \"d\"\naddress = \"{dead}\"\n[backend.health]\ninterval = \"100ms\"\nfall = 1\n[[pool]]\nname = \"p\"\nbackends = [\"d\"]\n[routing]\ndefault = \"p\"\n"
    );
    let proxy = Proxy::start(&cfg, "").await;
    let admin = proxy.app.admin_addr().unwrap();
    let mut last = (0, String::new());
    for _ in 0..50 {
        last = http_get(admin, "/readyz").await;
        if last.1.contains("degraded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every instance shares the backends: failing readiness would take them all out of the
    // load balancer at once, and clients would be refused instead of told to try later.
    assert_eq!(last, (200, "ready\ndegraded: pool p has no imap backend up\n".to_string()));
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(metrics.contains("portcullis_backend_up{backend=\"d\"} 0"));
    assert!(metrics.contains("portcullis_health_checks_total{backend=\"d\",result=\"failure\"}"));
}

fn proxy_config(backend: std::net::SocketAddr, trusted: &str) -> String {
    plain_config(backend, "").replace(
        "allow_plaintext_auth = true",
        &format!("allow_plaintext_auth = true\nproxy_protocol = true\ntrusted_proxies = [{trusted}]"),
    )
}

fn v2_header(src: &str, dst: &str) -> Vec<u8> {
    let h = proxy_header::ProxyHeader::with_address(proxy_header::ProxiedAddress::stream(
        src.parse().unwrap(),
        dst.parse().unwrap(),
    ));
    let mut buf = Vec::new();
    h.encode_v2(&mut buf).unwrap();
    buf
}

#[tokio::test]
async fn proxy_header_from_a_trusted_balancer_sets_the_client_address() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(&proxy_config(backend.addr, "\"127.0.0.0/8\""), USERS).await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.send(&v2_header("192.0.2.7:4242", "198.51.100.1:143")).await;
    assert!(c.line().await.starts_with("* OK"));
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    c.until_tagged("a").await;
    let id = &backend.lines(0)[0];
    assert!(id.contains("\"x-originating-ip\" \"192.0.2.7\" \"x-originating-port\" \"4242\""), "{id}");
    assert!(id.contains("\"x-connected-ip\" \"198.51.100.1\""), "{id}");

    // A v1 header split across two segments (reliability case 53).
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.send(b"PROXY TCP4 203.0.113.9 ").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send(b"198.51.100.1 5555 143\r\n").await;
    assert!(c.line().await.starts_with("* OK"));
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    c.until_tagged("a").await;
    assert!(backend.lines(1)[0].contains("\"203.0.113.9\""));

    // One byte per segment, the CR apart from its LF: each wait is for more of the header.
    let mut c = Client::connect(proxy.addr("plain")).await;
    for b in b"PROXY TCP4 203.0.113.10 198.51.100.1 5555 143\r\n" {
        c.send(&[*b]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(c.line().await.starts_with("* OK"));
    // The header and the client's first command in one segment: the command is not taken
    // with the header.
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.send(b"PROXY TCP4 203.0.113.11 198.51.100.1 5555 143\r\na LOGIN alice@example.test secret\r\n").await;
    assert!(c.line().await.starts_with("* OK"));
    c.until_tagged("a").await;
    assert!(backend.lines(2)[0].contains("\"203.0.113.11\""), "{:?}", backend.lines(2));

    // Reliability case 53: a v2 header with TLVs longer than the first read (a balancer's unique ID and padding;
    // up to 65,535 bytes are allowed), and an IPv4-mapped source given as plain IPv4.
    let mut h = v2_header("[::ffff:192.0.2.8]:4343", "[::ffff:198.51.100.1]:143");
    let tlv_len = 3000u16;
    h.extend_from_slice(&[0x04, (tlv_len >> 8) as u8, tlv_len as u8]);
    h.extend(std::iter::repeat_n(0u8, usize::from(tlv_len)));
    let len = u16::from_be_bytes([h[14], h[15]]) + 3 + tlv_len;
    h[14..16].copy_from_slice(&len.to_be_bytes());
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.send(&h).await;
    assert!(c.line().await.starts_with("* OK"));
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    c.until_tagged("a").await;
    let id = &backend.lines(3)[0];
    assert!(id.contains("\"x-originating-ip\" \"192.0.2.8\" \"x-originating-port\" \"4343\""), "{id}");

    // Malformed: closed without a greeting.
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.send(b"PROXY NONSENSE\r\n").await;
    assert_eq!(c.line().await, "");
    // No header at all on a PROXY listener: also closed (never auto-detected).
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.send(b"a NOOP\r\n").await;
    assert_eq!(c.line().await, "");
}

/// A trusted host (a webmail server) has no per-address cap, and its sessions do not fill the
/// cap of the IPv6 /64 it shares with others: they are counted under its own address.
#[tokio::test]
async fn a_trusted_ipv6_host_does_not_use_up_its_prefixs_connection_cap() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let config = proxy_config(backend.addr, "\"127.0.0.0/8\"").replace(
        "[limits]",
        "[throttle]\ntrusted = [\"2001:db8:1:2::10/128\"]\n\n[limits]\nmax_connections_per_ip = 1",
    );
    let proxy = Proxy::start(&config, USERS).await;
    let from = |src: &'static str| {
        let addr = proxy.addr("plain");
        async move {
            let mut c = Client::connect(addr).await;
            c.send(&v2_header(src, "[2001:db8::1]:143")).await;
            let greeting = c.line().await;
            (c, greeting)
        }
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let (c, greeting) = from("[2001:db8:1:2::10]:1000").await;
        assert!(greeting.starts_with("* OK"), "{greeting:?}");
        held.push(c);
    }
    let (c, greeting) = from("[2001:db8:1:2::20]:1000").await;
    assert!(greeting.starts_with("* OK"), "a neighbour of the trusted host: {greeting:?}");
    held.push(c);
    // The neighbour's /64 has its cap of one.
    let (_, greeting) = from("[2001:db8:1:2::21]:1000").await;
    assert!(!greeting.starts_with("* OK"), "{greeting:?}");
}

/// `header` with raw TLV bytes appended and its length field grown to match.
fn with_tlvs(mut header: Vec<u8>, tlvs: &[u8]) -> Vec<u8> {
    let len = u16::from_be_bytes([header[14], header[15]]) + tlvs.len() as u16;
    header[14..16].copy_from_slice(&len.to_be_bytes());
    header.extend_from_slice(tlvs);
    header
}

/// Reliability case 53 (HAProxy's proxy_protocol_tlv_validation and _embedded_nul tests): a v2
/// header whose TLVs overrun it, or that carries a NUL inside a text TLV, or a UDP address, is
/// closed without a greeting; well-formed TLVs (an authority, SSL facts) are accepted.
#[tokio::test]
async fn malformed_proxy_tlvs_close_the_connection() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(&proxy_config(backend.addr, "\"127.0.0.0/8\""), USERS).await;
    let base = || v2_header("192.0.2.7:4242", "198.51.100.1:143");
    let mut good = vec![0x02, 0, 17];
    good.extend_from_slice(b"mail.example.test");
    good.extend_from_slice(&[0x20, 0, 15, 0x01, 0, 0, 0, 0, 0x21, 0, 7]);
    good.extend_from_slice(b"TLSv1.3");
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.send(&with_tlvs(base(), &good)).await;
    assert!(c.line().await.starts_with("* OK"), "well-formed TLVs refused");

    let datagram = {
        let h = proxy_header::ProxyHeader::with_address(proxy_header::ProxiedAddress::datagram(
            "192.0.2.7:4242".parse().unwrap(),
            "198.51.100.1:143".parse().unwrap(),
        ));
        let mut buf = Vec::new();
        h.encode_v2(&mut buf).unwrap();
        buf
    };
    let cases: [(&str, Vec<u8>); 4] = [
        // A NOOP TLV claiming 256 bytes, four of them inside the header.
        ("overrun", with_tlvs(base(), &[0x04, 0x01, 0x00, 0, 0, 0, 0])),
        ("NUL in the authority", with_tlvs(base(), b"\x02\x00\x09mail\0evil")),
        // The SSL TLV's version TLV claims 16 bytes and has none.
        ("SSL sub-TLV overrun", with_tlvs(base(), &[0x20, 0, 8, 0x01, 0, 0, 0, 0, 0x21, 0, 0x10])),
        ("datagram", datagram),
    ];
    for (what, header) in cases {
        let mut c = Client::connect(proxy.addr("plain")).await;
        c.send(&header).await;
        assert_eq!(c.line().await, "", "{what}: not closed");
    }
    assert_eq!(backend.connections(), 0);
}

#[tokio::test]
async fn ipv4_clients_of_a_dual_stack_listener_are_ipv4_to_limits_and_backends() {
    // A `[::]` listener sees 127.0.0.1 as ::ffff:127.0.0.1; a trusted range written that way
    // is that one address, and the backend is told the IPv4 address.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let cfg = proxy_config(backend.addr, "\"::ffff:127.0.0.1\"").replace("bind = \"127.0.0.1:0\"", "bind = \"[::]:0\"");
    let proxy = Proxy::start(&cfg, USERS).await;
    let port = proxy.addr("plain").port();
    let mut c = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
    c.send(b"PROXY UNKNOWN\r\n").await;
    assert!(c.line().await.starts_with("* OK"));
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    c.until_tagged("a").await;
    let id = &backend.lines(0)[0];
    assert!(id.contains("\"x-originating-ip\" \"127.0.0.1\""), "{id}");
    assert!(id.contains("\"x-connected-ip\" \"127.0.0.1\""), "{id}");
    // The mapped entry does not trust every IPv4 address.
    let proxy = Proxy::start(&proxy_config(backend.addr, "\"::ffff:10.9.9.9\""), USERS).await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.send(b"PROXY TCP4 203.0.113.9 198.51.100.1 5555 143\r\n").await;
    assert_eq!(c.line().await, "");
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_peer_is_refused() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(&proxy_config(backend.addr, "\"10.0.0.0/8\""), USERS).await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.send(&v2_header("192.0.2.7:4242", "198.51.100.1:143")).await;
    assert_eq!(c.line().await, "");
    assert_eq!(backend.connections(), 0);
}

/// A relayed session through a proxy whose `[limits]` get `limits`: the fake backend, the proxy
/// (kept alive by the caller) and the logged-in client.
async fn relayed(limits: &str) -> (FakeBackend, Proxy, Client<tokio::net::TcpStream>) {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(&plain_config(backend.addr, limits), USERS).await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    c.until_tagged("a").await;
    (backend, proxy, c)
}

/// A session at its max duration whose client has stopped reading still ends: the goodbye is
/// written briefly or not at all, and the backend connection is closed.
#[tokio::test]
async fn a_client_that_stops_reading_does_not_outlive_max_session_duration() {
    let (backend, _proxy, mut c) = relayed("max_session_duration = \"1s\"").await;
    // 32 MiB come back; this client reads none of it. The backend's session ends when the
    // proxy closes its connection (its write fails), not before.
    c.send(b"b FETCH 1 BODY[]\r\n").await;
    let ended = || backend.ended.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ended(), 0, "the session ended before its max duration");
    let started = tokio::time::Instant::now();
    while ended() == 0 {
        assert!(started.elapsed() < Duration::from_secs(6), "the session outlived its max duration");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(c);
}

/// A session at its max duration between replies is told so, not that the server is shutting
/// down (which clients may report as an outage).
#[tokio::test]
async fn a_session_at_its_max_duration_is_told_so() {
    let (_backend, _proxy, mut c) = relayed("max_session_duration = \"1s\"").await;
    let started = tokio::time::Instant::now();
    let line = c.line().await;
    assert_eq!(line, "* BYE Session time limit reached.\r\n");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_session_ending_inside_a_reply_closes_without_a_goodbye_inside_it() {
    // The session reaches its max duration while a 32 MiB FETCH is part-way to a slowly
    // reading client: a "* BYE" now would become part of the message's literal.
    let (_backend, _proxy, mut c) = relayed("max_session_duration = \"1s\"").await;
    c.send(b"b FETCH 1 BODY[]\r\n").await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let started = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the session did not end"),
        }
        // About 6 MB/s: the whole message would take five seconds.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(got.len() < 32 << 20, "the whole message arrived: the session did not end inside it");
    assert!(!got.windows(5).any(|w| w == b"* BYE"), "a goodbye inside the reply");
}

#[tokio::test]
async fn relayed_sessions_get_a_goodbye_after_the_grace_period() {
    let (_backend, proxy, mut c) = relayed("shutdown_grace = \"300ms\"").await;
    let app = proxy.app.clone();
    let started = tokio::time::Instant::now();
    let done = tokio::spawn(async move { app.shutdown().await });
    // Reliability case 80: the session goes on during the grace period...
    c.send(b"b NOOP\r\n").await;
    assert_eq!(c.line().await, "b OK done\r\n");
    // ...then hears the protocol's goodbye.
    assert_eq!(c.line().await, "* BYE Server shutting down.\r\n");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(c.closed().await);
    tokio::time::timeout(Duration::from_secs(5), done).await.unwrap().unwrap();
}

#[tokio::test]
async fn health_checks_send_a_local_proxy_header() {
    // A probe is the proxy's own connection: a PROXY v2 backend must not take it for a client
    // at 127.0.0.1 (which backends often trust).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut head = vec![0u8; 16];
            if s.read_exact(&mut head).await.is_ok() {
                let _ = tx.send(head).await;
            }
        }
    });
    let cfg = format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nprotocol = \"imap\"\ntls = \"none\"\n[auth]\nsource = \"backend\"\n[[backend]]\nname = \"h\"\naddress = \"{addr}\"\nclient_address = \"proxy-v2\"\n[backend.health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\n[routing.imap]\ndefault = \"h\"\n"
    );
    let proxy = Proxy::start(&cfg, USERS).await;
    let head = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    assert_eq!(&head[..12], b"\r\n\r\n\0\r\nQUIT\n");
    // Version 2, command LOCAL (0x20), not PROXY (0x21); no address family.
    assert_eq!(head[12], 0x20, "{head:?}");
    assert_eq!(head[13], 0x00, "{head:?}");
    // The checks' connects are not sessions' connect times (the first connect's is recorded
    // by the time the second check has connected).
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    let page = String::from_utf8(proxy.app.render_metrics().1).unwrap();
    assert!(!page.contains("portcullis_backend_connect_duration_seconds_count{backend=\"h\"}"), "{page}");
}

async fn http_raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    out
}

#[tokio::test]
async fn the_admin_server_refuses_browsers_renewals_and_caps_its_connections() {
    let (_backend, _proxy, admin) = with_admin().await;
    let post = |extra: &str| {
        format!("POST /acme/renew/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n{extra}Connection: close\r\n\r\n")
    };
    // From this host, as `portcullis renew` asks: heard (no such certificate here).
    assert!(http_raw(admin, &post("")).await.starts_with("HTTP/1.1 404"));
    // A web page open in a browser on this host cannot ask (cross-site request forgery).
    for header in
        ["Origin: https://evil.example\r\n", "Sec-Fetch-Site: cross-site\r\n", "Referer: https://e.example/\r\n"]
    {
        assert!(http_raw(admin, &post(header)).await.starts_with("HTTP/1.1 403"), "{header}");
    }
    // Connections that send nothing hold a slot each; past the cap new ones are closed unheard,
    // and a slot freed is usable again.
    // From eight addresses, eight each: one address gets no more (see below).
    let mut idle = Vec::new();
    for i in 0..64u8 {
        idle.push(connect_from([127, 0, 1, 10 + i / 8], admin).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let get = "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    assert_eq!(http_raw(admin, get).await, "");
    idle.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(http_raw(admin, get).await.starts_with("HTTP/1.1 200"));
}

/// A renewal through the admin server carries the token the proxy wrote into its ACME state
/// directory, readable by its own user only: another local user who can reach the admin port
/// cannot make it spend the CA's limits (nor learn which certificates there are).
#[tokio::test]
async fn a_renewal_through_the_admin_server_needs_the_token_in_the_state_directory() {
    use std::os::unix::fs::PermissionsExt;
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let config = |state: &std::path::Path| {
        format!(
            "{}\n[acme]\ndirectory = \"https://127.0.0.1:1/dir\"\nterms_agreed = true\nstate_dir = \"{}\"\nchallenge = \"tls-alpn-01\"\ntls_alpn01_bind = \"127.0.0.1:{}\"\nretry_min = \"1h\"\n[[acme.certificate]]\nnames = [\"mail.example.test\"]\n",
            plain_config(backend.addr, "").replace("[limits]", "[admin]\nbind = \"127.0.0.1:0\"\n\n[limits]"),
            state.display(),
            free_port()
        )
    };
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(state.path()), USERS).await;
    let admin = proxy.app.admin_addr().unwrap();
    let file = state.path().join(portcullis::tls::acme::RENEW_TOKEN_FILE);
    let token = std::fs::read_to_string(&file).unwrap();
    assert_eq!(token.len(), 64);
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let post = |name: &str, token: &str| {
        format!(
            "POST /acme/renew/{name} HTTP/1.1\r\nHost: a\r\nX-Renew-Token: {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    for wrong in ["", "0", &"0".repeat(64), &token[..63]] {
        for name in ["mail.example.test", "nosuch"] {
            assert!(http_raw(admin, &post(name, wrong)).await.starts_with("HTTP/1.1 403"), "{wrong:?} {name}");
        }
    }
    assert!(http_raw(admin, &post("mail.example.test", &token)).await.starts_with("HTTP/1.1 202"));
    assert!(http_raw(admin, &post("nosuch", &token)).await.starts_with("HTTP/1.1 404"));
    drop(proxy);

    // A token that cannot be written (a directory in its place) refuses every renewal through
    // the admin server, and ACME runs on: it is never a reason to stop renewing.
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(state.path().join(portcullis::tls::acme::RENEW_TOKEN_FILE).join("x")).unwrap();
    let proxy = Proxy::start(&config(state.path()), USERS).await;
    assert!(proxy.app.acme_ca_file_digest().await.is_some(), "ACME runs");
    let admin = proxy.app.admin_addr().unwrap();
    assert!(http_raw(admin, &post("mail.example.test", "")).await.starts_with("HTTP/1.1 403"));
}

#[tokio::test]
async fn an_ipv4_and_an_ipv6_wildcard_on_one_port_both_bind() {
    // The usual pair `["0.0.0.0:993", "[::]:993"]`: with Linux's default dual-stack sockets the
    // IPv6 one claimed the IPv4 port too, and the second bind failed at start.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let port = free_port();
    let cfg = plain_config(backend.addr, "")
        .replace("bind = \"127.0.0.1:0\"", &format!("bind = [\"0.0.0.0:{port}\", \"[::]:{port}\"]"));
    let proxy = Proxy::start(&cfg, USERS).await;
    assert_eq!(proxy.app.local_addrs("plain").len(), 2);
    for ip in ["127.0.0.1", "::1"] {
        let addr = std::net::SocketAddr::new(ip.parse().unwrap(), port);
        let mut c = Client::connect(addr).await;
        assert!(c.line().await.starts_with("* OK"), "{ip}");
    }
}

#[tokio::test]
async fn concurrent_scrapes_all_see_every_backend() {
    // Two Prometheus servers scraping at once: each page has the backend's series (the gauges
    // are reset and set again on every scrape).
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(&plain_config(backend.addr, ""), USERS).await;
    let scrapers: Vec<_> = (0..2)
        .map(|_| {
            let app = proxy.app.clone();
            std::thread::spawn(move || {
                (0..3000)
                    .filter(|_| {
                        let page = String::from_utf8(app.render_metrics().1).unwrap();
                        !page.contains("portcullis_backend_up{backend=\"fake\"}")
                    })
                    .count()
            })
        })
        .collect();
    let missing: Vec<usize> = scrapers.into_iter().map(|s| s.join().unwrap()).collect();
    assert_eq!(missing, [0, 0]);
}

/// The counter series the shipped alerts watch are exported at 0 before their first count:
/// `increase()` cannot see a series' first value, so a burst that created one would never fire.
#[tokio::test]
async fn the_alerted_counters_are_exported_at_zero_before_their_first_count() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let cfg = protocol_config("pop3", backend.addr, "")
        .replace("name = \"plain\"", "name = \"zeroed\"")
        .replace("name = \"fake\"", "name = \"never-failed\"")
        .replace("\"fake\"", "\"never-failed\"");
    let proxy = Proxy::start(&cfg, USERS).await;
    let page = String::from_utf8(proxy.app.render_metrics().1).unwrap();
    for series in [
        "portcullis_connections_rejected_total{listener=\"zeroed\",protocol=\"pop3\",reason=\"limit_global\"} 0",
        "portcullis_accept_errors_total{listener=\"zeroed\"} 0",
        "portcullis_logins_total{mechanism=\"login\",protocol=\"pop3\",result=\"backend_rejected\"} 0",
        "portcullis_logins_total{mechanism=\"sasl-login\",protocol=\"pop3\",result=\"backend_rejected\"} 0",
        "portcullis_backend_errors_total{backend=\"never-failed\",reason=\"local_resources\"} 0",
    ] {
        assert!(page.lines().any(|l| l == series), "missing {series} in\n{page}");
    }
    // What a reload adds, from the reload on.
    write_file(&proxy.config_path(), &cfg.replace("never-failed", "added-later"));
    proxy.app.reload(false).await.unwrap();
    let page = String::from_utf8(proxy.app.render_metrics().1).unwrap();
    let series = "portcullis_backend_errors_total{backend=\"added-later\",reason=\"local_resources\"} 0";
    assert!(page.lines().any(|l| l == series), "missing {series} in\n{page}");
    drop(proxy);

    // An ACME challenge responder's port is watched by the same alert as the listeners.
    let state = tempfile::tempdir().unwrap();
    let acme = format!(
        "{cfg}\n[acme]\ndirectory = \"https://127.0.0.1:1/dir\"\nterms_agreed = true\nstate_dir = \"{}\"\nchallenge = \"tls-alpn-01\"\ntls_alpn01_bind = \"127.0.0.1:{}\"\nretry_min = \"1h\"\n[[acme.certificate]]\nnames = [\"mail.example.test\"]\n",
        state.path().display(),
        free_port()
    );
    let proxy = Proxy::start(&acme, USERS).await;
    let page = String::from_utf8(proxy.app.render_metrics().1).unwrap();
    let series = "portcullis_accept_errors_total{listener=\"acme-tls-alpn-01\"} 0";
    assert!(page.lines().any(|l| l == series), "missing {series} in\n{page}");
}
