//! POP3 through the proxy against scripted fake backends.

mod common;

use common::*;

async fn setup(behaviour: Behaviour, extra_backend: &str) -> (Proxy, FakeBackend) {
    let backend = FakeBackend::start(behaviour).await;
    let config = protocol_config("pop3", backend.addr, "").replace(
        &format!("address = \"{}\"", backend.addr),
        &format!("address = \"{}\"\n{extra_backend}", backend.addr),
    );
    let proxy = Proxy::start(&config, USERS).await;
    (proxy, backend)
}

async fn greeted(proxy: &Proxy) -> Client<tokio::net::TcpStream> {
    let mut c = Client::connect(proxy.addr("plain")).await;
    assert_eq!(c.line().await, "+OK POP3 proxy ready.\r\n");
    c
}

#[tokio::test]
async fn user_pass_with_xclient_and_pipelined_commands() {
    let (proxy, backend) = setup(Behaviour::Pop3, "").await;
    let mut c = greeted(&proxy).await;
    c.send(b"USER alice@example.test\r\nPASS secret\r\nSTAT\r\nQUIT\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
    // The client's PASS gets the backend's own +OK; pipelined commands follow in order.
    assert_eq!(c.line().await, "+OK Logged in.\r\n");
    assert_eq!(c.line().await, "+OK 1 42\r\n");
    assert_eq!(c.line().await, "+OK Logging out.\r\n");
    assert!(c.closed().await);
    let got = backend.lines(0);
    assert!(got[0].starts_with("XCLIENT ADDR=127.0.0.1 PORT="), "{got:?}");
    assert!(got[0].contains(" SESSION=") && got[0].ends_with(" TTL=5\r\n"), "{got:?}");
    assert_eq!(&got[1..], ["USER alice@example.test\r\n", "PASS secret\r\n", "STAT\r\n", "QUIT\r\n"]);
}

#[tokio::test]
async fn dovecot_gets_xclient_and_user_in_one_write_others_one_at_a_time() {
    use std::sync::atomic::Ordering;
    // A backend that announces XCLIENT is Dovecot, which pipelines: XCLIENT and USER go in one
    // write (the backend reads XCLIENT with USER already there); PASS waits for their replies.
    let (proxy, backend) = setup(Behaviour::Pop3, "").await;
    let mut c = greeted(&proxy).await;
    c.send(b"USER alice@example.test\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
    c.send(b"PASS secret\r\n").await;
    assert_eq!(c.line().await, "+OK Logged in.\r\n");
    let got = backend.lines(0);
    assert!(
        got[0].starts_with("XCLIENT ") && got[1..] == ["USER alice@example.test\r\n", "PASS secret\r\n"],
        "{got:?}"
    );
    assert_eq!(backend.pipelined.load(Ordering::SeqCst), 1);
    // Without XCLIENT, nothing says the backend pipelines: one command at a time.
    let (proxy, backend) = setup(Behaviour::Pop3, "client_address = \"none\"").await;
    let mut c = greeted(&proxy).await;
    c.send(b"USER alice@example.test\r\nPASS secret\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
    assert_eq!(c.line().await, "+OK Logged in.\r\n");
    assert_eq!(backend.lines(0), ["USER alice@example.test\r\n", "PASS secret\r\n"]);
    assert_eq!(backend.pipelined.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn auth_plain_and_master_user() {
    let (proxy, backend) = setup(
        Behaviour::Pop3,
        "login = \"master\"\nmaster_user = \"proxy\"\nmaster_password = \"mpw\"\nclient_address = \"none\"",
    )
    .await;
    let mut c = greeted(&proxy).await;
    c.send(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n").await;
    assert_eq!(c.line().await, "+OK Logged in.\r\n");
    // base64("alice@example.test\0proxy\0mpw")
    assert_eq!(backend.lines(0), vec!["AUTH PLAIN YWxpY2VAZXhhbXBsZS50ZXN0AHByb3h5AG1wdw==\r\n"]);
}

#[tokio::test]
async fn wrong_password_never_reaches_the_backend() {
    let (proxy, backend) = setup(Behaviour::Pop3, "").await;
    let mut c = greeted(&proxy).await;
    c.send(b"USER alice@example.test\r\nPASS nope\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
    assert_eq!(c.line().await, "-ERR [AUTH] Authentication failed.\r\n");
    assert_eq!(backend.connections(), 0);
    // The last allowed failure (max_auth_attempts, 3) closes with its own reply only: POP3 has
    // no unsolicited replies, so a second -ERR would answer the pipelined NOOP.
    for last in [false, true] {
        let noop = if last { "NOOP\r\n" } else { "" };
        c.send(format!("USER alice@example.test\r\nPASS nope\r\n{noop}").as_bytes()).await;
        assert_eq!(c.line().await, "+OK\r\n");
        assert_eq!(c.line().await, "-ERR [AUTH] Authentication failed.\r\n");
    }
    assert_eq!(c.line().await, "", "closed after the third failure, nothing more");
}

#[tokio::test]
async fn backend_without_xclient_fails_closed() {
    let (proxy, _backend) = setup(Behaviour::Pop3NoXclient, "").await;
    let mut c = greeted(&proxy).await;
    c.send(b"USER alice@example.test\r\nPASS secret\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
    assert_eq!(c.line().await, "-ERR [SYS/TEMP] Server unavailable, try again later.\r\n");
}

#[tokio::test]
async fn a_refused_xclient_or_user_stops_the_login_before_pass() {
    // XCLIENT and USER share a write; PASS goes only after both said +OK.
    for (behaviour, answer) in [
        // A refused XCLIENT is the proxy's problem (not the user's): a temporary failure.
        (Behaviour::Pop3RejectXclient, "-ERR [SYS/TEMP] Server unavailable, try again later.\r\n"),
        (Behaviour::Pop3BusyUser, "-ERR [SYS/TEMP] Server unavailable, try again later.\r\n"),
    ] {
        let (proxy, backend) = setup(behaviour, "").await;
        let mut c = greeted(&proxy).await;
        c.send(b"USER alice@example.test\r\nPASS secret\r\n").await;
        assert_eq!(c.line().await, "+OK\r\n");
        assert_eq!(c.line().await, answer, "{behaviour:?}");
        let got = backend.lines(0);
        assert!(got[0].starts_with("XCLIENT ") && got[1] == "USER alice@example.test\r\n", "{got:?}");
        assert!(!got.iter().any(|l| l.starts_with("PASS")), "{behaviour:?}: {got:?}");
    }
}

/// Sessions that reached the backend and sent it `verb`.
fn sessions_with(backend: &FakeBackend, verb: &str) -> usize {
    (0..backend.connections()).filter(|&i| backend.lines(i).iter().any(|l| l.starts_with(verb))).count()
}

/// A proxy in front of a fake POP3 backend with active checks on (rarely run): a backend marked
/// down would then be skipped, not tried.
async fn with_checks(behaviour: Behaviour) -> (Proxy, FakeBackend) {
    let backend = FakeBackend::start(behaviour).await;
    let config = protocol_config("pop3", backend.addr, "")
        .replace("health = { enabled = false }", "health = { enabled = true, interval = \"1h\" }");
    (Proxy::start(&config, USERS).await, backend)
}

/// Five USER/PASS logins, each on its own connection, each answered with `reply`.
async fn five_logins(proxy: &Proxy, reply: &str) {
    for _ in 0..5 {
        let mut c = greeted(proxy).await;
        c.send(b"USER alice@example.test\r\nPASS secret\r\n").await;
        assert_eq!(c.line().await, "+OK\r\n");
        assert_eq!(c.line().await, reply);
    }
}

/// One user's locked mailbox is not the backend's fault: however often it happens (past the
/// health `fall` of 3), the backend is not marked down and the next login still reaches it.
#[tokio::test]
async fn a_mailbox_in_use_does_not_mark_the_backend_down() {
    let (proxy, backend) = with_checks(Behaviour::Pop3InUse).await;
    // RFC 2449's code, so the client can tell its user why.
    five_logins(&proxy, "-ERR [IN-USE] Mailbox is in use, try again later.\r\n").await;
    assert_eq!(sessions_with(&backend, "PASS"), 5);
}

/// Each try at a locked mailbox costs a backend login: the answer is paced like a failed
/// login's and counted, so one connection cannot loop on it (reliability cases 54, 55).
#[tokio::test]
async fn a_mailbox_in_use_is_paced_and_counted() {
    let backend = FakeBackend::start(Behaviour::Pop3InUse).await;
    let config = protocol_config("pop3", backend.addr, "")
        .replace("auth_failure_delay = \"10ms\"", "auth_failure_delay = \"300ms\"");
    let proxy = Proxy::start(&config, USERS).await;
    let mut c = greeted(&proxy).await;
    for _ in 0..3 {
        let sent = tokio::time::Instant::now();
        c.send(b"USER alice@example.test\r\nPASS secret\r\n").await;
        assert_eq!(c.line().await, "+OK\r\n");
        assert_eq!(c.line().await, "-ERR [IN-USE] Mailbox is in use, try again later.\r\n");
        assert!(sent.elapsed() >= std::time::Duration::from_millis(300), "{:?}", sent.elapsed());
    }
    assert_eq!(c.line().await, "", "closed after max_auth_attempts (3)");
    assert_eq!(sessions_with(&backend, "PASS"), 3);
}

/// A backend without active checks that sessions marked down is still tried (nothing else
/// would ever mark it up again): a lone one, or one the auth service names by address.
#[tokio::test]
async fn a_backend_without_checks_is_tried_after_being_marked_down() {
    // A refused XCLIENT, before any credentials: the backend's (or its config's) fault.
    let (proxy, backend) = setup(Behaviour::Pop3RejectXclient, "").await;
    five_logins(&proxy, "-ERR [SYS/TEMP] Server unavailable, try again later.\r\n").await;
    assert!(!proxy.app.health().is_up("fake"));
    assert_eq!(sessions_with(&backend, "XCLIENT"), 5);
}

/// A login the backend refuses for now (`-ERR [SYS/TEMP]`, which Dovecot also answers when one
/// user has too many connections) is not counted against the backend: however often one user
/// brings it about (past the health `fall` of 3), the backend stays up for everyone.
#[tokio::test]
async fn a_refused_login_does_not_mark_the_backend_down() {
    let (proxy, backend) = with_checks(Behaviour::Pop3BusyUser).await;
    five_logins(&proxy, "-ERR [SYS/TEMP] Server unavailable, try again later.\r\n").await;
    assert!(proxy.app.health().is_up("fake"));
    assert_eq!(sessions_with(&backend, "USER"), 5);
}

#[tokio::test]
async fn password_that_would_inject_a_command_is_not_replayed() {
    // Backend-verified auth: SASL PLAIN can carry CR LF inside a password, USER/PASS cannot.
    let backend = FakeBackend::start(Behaviour::Pop3).await;
    let config = protocol_config("pop3", backend.addr, "").replace("passwd_file = \"users\"", "source = \"backend\"");
    let proxy = Proxy::start(&config, "").await;
    let mut c = greeted(&proxy).await;
    // base64("\0eve@example.test\0pw\r\nDELE 1")
    c.send(b"AUTH PLAIN AGV2ZUBleGFtcGxlLnRlc3QAcHcNCkRFTEUgMQ==\r\n").await;
    assert_eq!(c.line().await, "-ERR [AUTH] Authentication failed.\r\n");
    assert!(backend.lines(0).iter().all(|l| !l.starts_with("DELE")));
}

#[tokio::test]
async fn a_command_split_over_segments_is_one_command() {
    let (proxy, _b) = setup(Behaviour::Pop3, "").await;
    let mut c = greeted(&proxy).await;
    // Reliability case 22: `CA` … `PA` is one CAPA.
    c.send_in_pieces(&[b"CA", b"PA\r\n"]).await;
    assert!(c.line().await.starts_with("+OK"));
    while c.line().await != ".\r\n" {}
    // Reliability case 23: `FOO B` … `AR` gets exactly one error; the next reply is USER's.
    c.send_in_pieces(&[b"FOO B", b"AR\r\n"]).await;
    assert!(c.line().await.starts_with("-ERR"));
    c.send(b"USER alice@example.test\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
}

#[tokio::test]
async fn over_the_connection_cap_is_a_temporary_server_condition_not_a_locked_mailbox() {
    // RFC 3206 [SYS/TEMP]; [IN-USE] (RFC 2449) would tell the client its maildrop is locked.
    let backend = FakeBackend::start(Behaviour::Pop3).await;
    let proxy = Proxy::start(&protocol_config("pop3", backend.addr, "max_connections_per_ip = 1"), USERS).await;
    let _first = greeted(&proxy).await;
    let mut second = Client::connect(proxy.addr("plain")).await;
    assert_eq!(second.line().await, "-ERR [SYS/TEMP] Too many connections, try again later.\r\n");
    // A trusted network (a webmail server: all its users' sessions from one address) has no
    // per-address cap; the others stay.
    let config = protocol_config("pop3", backend.addr, "max_connections_per_ip = 1")
        .replace("[limits]", "[throttle]\ntrusted = [\"127.0.0.0/8\"]\n\n[limits]");
    let proxy = Proxy::start(&config, USERS).await;
    let _first = greeted(&proxy).await;
    let _second = greeted(&proxy).await;
}

/// Reliability case 57: over the proxy's whole cap, and over a listener's, IMAP and SMTP
/// clients are told in their protocol's words and closed; the first connection goes on.
#[tokio::test]
async fn over_the_global_and_listener_caps_imap_and_smtp_clients_are_told() {
    for (protocol, behaviour, cap, greeting, refusal) in [
        ("imap", Behaviour::Normal, "max_connections = 1", "* OK", "* BYE Too many connections, try again later.\r\n"),
        (
            "smtp",
            Behaviour::Smtp,
            "max_connections_per_listener = 1",
            "220 ",
            "421 4.7.0 Too many connections, try again later\r\n",
        ),
    ] {
        let backend = FakeBackend::start(behaviour).await;
        let proxy = Proxy::start(&protocol_config(protocol, backend.addr, cap), USERS).await;
        let mut first = Client::connect(proxy.addr("plain")).await;
        assert!(first.line().await.starts_with(greeting), "{protocol}");
        let mut second = Client::connect(proxy.addr("plain")).await;
        assert_eq!(second.line().await, refusal, "{protocol}");
        assert!(second.closed().await, "{protocol}");
        first.send(b"a NOOP\r\n").await;
        assert!(!first.line().await.is_empty(), "{protocol}");
    }
}

/// A backend refusing USER on a link it calls insecure (Dovecot's disable_plaintext_auth),
/// reporting a permanent failure of its own (RFC 3206 [SYS/PERM]), or a user who logged in too
/// recently (RFC 2449 [LOGIN-DELAY]): its condition or the user's, not a wrong password, so not
/// logged for fail2ban; the client gets the temporary failure.
#[tokio::test]
async fn a_backend_refusing_plaintext_or_failing_permanently_is_not_a_wrong_password() {
    let replies: [&'static [u8]; 3] = [
        b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n",
        b"-ERR [SYS/PERM] internal error\r\n",
        b"-ERR [LOGIN-DELAY] wait 15 minutes between logins\r\n",
    ];
    for reply in replies {
        let (addr, _seen) = scripted_backend(b"+OK ready\r\n", reply).await;
        let config = protocol_config("pop3", addr, "")
            .replace(&format!("address = \"{addr}\""), &format!("address = \"{addr}\"\nclient_address = \"none\""))
            .replace("passwd_file = \"users\"", "source = \"backend\"");
        let proxy = Proxy::start(&config, USERS).await;
        let mut c = greeted(&proxy).await;
        c.send(b"USER alice@example.test\r\nPASS secret\r\n").await;
        assert_eq!(c.line().await, "+OK\r\n");
        let what = String::from_utf8_lossy(reply).into_owned();
        assert_eq!(c.line().await, "-ERR [SYS/TEMP] Server unavailable, try again later.\r\n", "{what}");
    }
}

/// Reliability cases 67, 12 and 10 for POP3: a backend that greets with IMAP or HTTP, refuses
/// STLS, or sends bytes after its STLS reply gets no USER or PASS (nothing at all, or STLS
/// alone), and the client a temporary failure.
#[tokio::test]
async fn a_backend_that_is_not_pop3_or_fumbles_stls_gets_no_credentials() {
    let cases: [(&'static [u8], &'static [u8], &str, &str); 4] = [
        (b"* OK IMAP4rev1 ready\r\n", b"", "", ""),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", b"", "", ""),
        (b"+OK ready\r\n", b"-ERR not now\r\n", "transport = \"starttls\"", "STLS\r\n"),
        (b"+OK ready\r\n", b"+OK begin\r\n+OK stray\r\n", "transport = \"starttls\"", "STLS\r\n"),
    ];
    for (greeting, reply, transport, sent) in cases {
        let (addr, seen) = scripted_backend(greeting, reply).await;
        let config = protocol_config("pop3", addr, "")
            .replace(
                &format!("address = \"{addr}\""),
                &format!("address = \"{addr}\"\nclient_address = \"none\"\n{transport}"),
            )
            // Past the client's read timeout: a reply proves the proxy did not wait for the clock.
            .replace("backend_login_timeout = \"500ms\"", "backend_login_timeout = \"30s\"");
        let proxy = Proxy::start(&config, USERS).await;
        let mut c = greeted(&proxy).await;
        c.send(b"USER alice@example.test\r\nPASS secret\r\n").await;
        assert_eq!(c.line().await, "+OK\r\n");
        let what = String::from_utf8_lossy(greeting).into_owned() + &String::from_utf8_lossy(reply);
        assert_eq!(c.line().await, "-ERR [SYS/TEMP] Server unavailable, try again later.\r\n", "{what:?}");
        assert_eq!(String::from_utf8_lossy(&seen.lock().unwrap()), sent, "{what:?}");
    }
}

/// A health check's test login is the proxy's own connection: no XCLIENT with a made-up client
/// address (Dovecot refuses its port 0, so every check failed and the backend went down).
#[tokio::test]
async fn a_health_check_login_sends_no_xclient() {
    let backend = FakeBackend::start(Behaviour::Pop3).await;
    let config = protocol_config("pop3", backend.addr, "").replace(
        "health = { enabled = false }",
        "health = { enabled = true, interval = \"100ms\", login_user = \"probe@example.test\", login_password = \"pw\" }",
    );
    assert!(config.contains("login_user"));
    let _proxy = Proxy::start(&config, USERS).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while backend.connections() == 0 || !backend.lines(0).iter().any(|l| l.starts_with("PASS")) {
        assert!(tokio::time::Instant::now() < deadline, "no health check login");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let lines = backend.lines(0);
    assert!(lines.iter().any(|l| l.starts_with("USER probe@example.test")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with("XCLIENT")), "{lines:?}");
}
