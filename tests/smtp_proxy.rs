//! SMTP submission through the proxy against scripted fake backends.

mod common;

use std::time::Duration;

use common::*;

async fn setup_with(behaviour: Behaviour, backend_extra: &str, limits_extra: &str) -> (Proxy, FakeBackend) {
    let backend = FakeBackend::start(behaviour).await;
    let config = protocol_config("smtp", backend.addr, limits_extra)
        .replace(
            &format!("address = \"{}\"", backend.addr),
            &format!("address = \"{}\"\n{backend_extra}", backend.addr),
        )
        .replace("[limits]", "[server]\nhostname = \"proxy.example.test\"\n\n[limits]");
    let proxy = Proxy::start(&config, USERS).await;
    (proxy, backend)
}

async fn setup(behaviour: Behaviour) -> (Proxy, FakeBackend) {
    setup_with(behaviour, "", "").await
}

async fn greeted(proxy: &Proxy) -> Client<tokio::net::TcpStream> {
    let mut c = Client::connect(proxy.addr("plain")).await;
    assert_eq!(c.line().await, "220 proxy.example.test ESMTP ready\r\n");
    c
}

/// Greeted, `EHLO name` answered, and AUTH PLAIN as alice sent: its reply is next.
async fn authenticating(proxy: &Proxy, name: &str) -> Client<tokio::net::TcpStream> {
    let mut c = greeted(proxy).await;
    c.send(format!("EHLO {name}\r\n").as_bytes()).await;
    c.smtp_reply().await;
    c.send(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n").await;
    c
}

/// Greeted, EHLO answered, and logged in as alice with AUTH PLAIN.
async fn logged_in(proxy: &Proxy) -> Client<tokio::net::TcpStream> {
    let mut c = greeted(proxy).await;
    c.send(b"EHLO c\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n").await;
    c.smtp_reply().await;
    assert_eq!(c.line().await, "235 2.7.0 Authentication successful\r\n");
    c
}

async fn wait_for_extensions(proxy: &Proxy) {
    for _ in 0..100 {
        if proxy.app.ehlo_cache().get("fake").is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("backend probe did not fill the EHLO cache");
}

/// Reliability case 48: only extensions the backend offers, and never CHUNKING (BDAT after login
/// is refused: a chunk's count could hide a command from the guard).
#[tokio::test]
async fn honest_ehlo_shows_the_backends_extensions() {
    let (proxy, _b) = setup(Behaviour::Smtp).await;
    wait_for_extensions(&proxy).await;
    let mut c = greeted(&proxy).await;
    c.send(b"EHLO client.example\r\n").await;
    // The proxy's own AUTH, then the backend's pass-through extensions; never its VRFY, AUTH
    // or XCLIENT.
    let got = c.smtp_reply().await;
    assert_eq!(got[0], "250-proxy.example.test\r\n");
    assert_eq!(got[1..], EHLO_WITH_FAKE_SMTP);
}

#[tokio::test]
async fn auth_then_xclient_then_pipelined_transaction_in_order() {
    let (proxy, backend) = setup(Behaviour::Smtp).await;
    let mut c = greeted(&proxy).await;
    c.send(b"EHLO client.example\r\n").await;
    c.smtp_reply().await;
    // Reliability case 25: MAIL/RCPT pipelined after a good AUTH go upstream in order.
    c.send(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n").await;
    assert_eq!(c.line().await, "235 2.7.0 Authentication successful\r\n");
    assert_eq!(c.line().await, "250 2.0.0 Ok\r\n");
    assert_eq!(c.line().await, "250 2.0.0 Ok\r\n");
    c.send(b"DATA\r\n").await;
    assert!(c.line().await.starts_with("354"));
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n").await;
    assert_eq!(c.line().await, "250 2.0.0 Ok: queued\r\n");
    assert_eq!(c.line().await, "221 2.0.0 Bye\r\n");
    let got = backend.lines(backend.connections() - 1);
    assert_eq!(got[0], "EHLO proxy.example.test\r\n");
    assert!(got[1].starts_with("XCLIENT ADDR=127.0.0.1 PORT="), "{got:?}");
    assert!(
        got[1].ends_with(" NAME=[UNAVAILABLE] PROTO=ESMTP HELO=client.example LOGIN=alice@example.test\r\n"),
        "{got:?}"
    );
    assert_eq!(got[2], "EHLO client.example\r\n");
    assert_eq!(&got[3..6], ["MAIL FROM:<alice@example.test>\r\n", "RCPT TO:<bob@example.test>\r\n", "DATA\r\n"]);
}

#[tokio::test]
async fn failed_auth_pipelined_mail_gets_530_and_never_goes_upstream() {
    let (proxy, backend) = setup(Behaviour::Smtp).await;
    let mut c = greeted(&proxy).await;
    c.send(b"EHLO c\r\n").await;
    c.smtp_reply().await;
    // Reliability case 25, second half.
    c.send(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==\r\nMAIL FROM:<a@b>\r\n").await;
    assert_eq!(c.line().await, "535 5.7.8 Authentication credentials invalid\r\n");
    assert_eq!(c.line().await, "530 5.7.0 Authentication required\r\n");
    // Only the proxy's own EHLO probe ever reached the backend.
    let all: Vec<String> = (0..backend.connections()).flat_map(|i| backend.lines(i)).collect();
    assert!(all.iter().all(|l| l.starts_with("EHLO proxy.example.test") || l == "QUIT\r\n"), "{all:?}");
}

#[tokio::test]
async fn replay_login_uses_auth_plain() {
    let (proxy, backend) = setup_with(Behaviour::Smtp, "login = \"replay\"\nclient_address = \"none\"", "").await;
    let _c = logged_in(&proxy).await;
    let got = backend.lines(backend.connections() - 1);
    assert_eq!(got, vec!["EHLO proxy.example.test\r\n", "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n"]);
}

/// A backend that offers LOGIN but not PLAIN (Exchange: `AUTH NTLM LOGIN`) is logged in to
/// with LOGIN: user name and password each on their own base64 line.
#[tokio::test]
async fn replay_login_falls_back_to_auth_login() {
    let (proxy, backend) =
        setup_with(Behaviour::SmtpAuthLoginOnly, "login = \"replay\"\nclient_address = \"none\"", "").await;
    let mut c = greeted(&proxy).await;
    c.send(b"EHLO c\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\nMAIL FROM:<alice@example.test>\r\n").await;
    c.smtp_reply().await;
    assert_eq!(c.line().await, "235 2.7.0 Authentication successful\r\n");
    assert_eq!(c.line().await, "250 2.0.0 Ok\r\n");
    let got = backend.lines(backend.connections() - 1);
    // alice@example.test and secret.
    assert_eq!(
        got,
        vec![
            "EHLO proxy.example.test\r\n",
            "AUTH LOGIN\r\n",
            "YWxpY2VAZXhhbXBsZS50ZXN0\r\n",
            "c2VjcmV0\r\n",
            "MAIL FROM:<alice@example.test>\r\n"
        ]
    );
}

/// RFC 5321 §3.8: a server closes on its own only after a 421, the idle timeout included.
#[tokio::test]
async fn relay_idle_timeout_sends_421() {
    let (proxy, _backend) = setup_with(Behaviour::Smtp, "", "idle_timeout = \"300ms\"").await;
    let mut c = logged_in(&proxy).await;
    assert_eq!(c.line().await, "421 4.4.2 Error: timeout exceeded, closing connection\r\n");
    assert!(c.closed().await);
}

async fn login_fails_unavailable(behaviour: Behaviour, backend_extra: &str) {
    let (proxy, _backend) = setup_with(behaviour, backend_extra, "").await;
    let mut c = authenticating(&proxy, "c").await;
    assert_eq!(c.line().await, "454 4.7.0 Temporary authentication failure\r\n");
    c.send(b"NOOP\r\n").await;
    assert_eq!(c.line().await, "250 2.0.0 OK\r\n");
}

#[tokio::test]
async fn backend_rejecting_xclient_fails_closed() {
    login_fails_unavailable(Behaviour::SmtpRejectXclient, "").await;
}

#[tokio::test]
async fn backend_xclient_without_addr_fails_closed() {
    // The client's address is what XCLIENT is for; sending the rest would lose it silently.
    login_fails_unavailable(Behaviour::SmtpXclientWithoutAddr, "").await;
}

#[tokio::test]
async fn an_ehlo_name_the_backend_refuses_is_the_clients_failure_not_the_backends() {
    // The backend takes the proxy's EHLO and refuses the client's, replayed after XCLIENT. That
    // must not count against the backend: one client could otherwise mark a whole pool down.
    // Either when it is replayed or when XCLIENT carries it (HELO=).
    for behaviour in [Behaviour::SmtpStrictHelo, Behaviour::SmtpStrictXclientHelo] {
        ehlo_name_refused(behaviour).await;
    }
}

async fn ehlo_name_refused(behaviour: Behaviour) {
    let (proxy, _backend) = setup(behaviour).await;
    for _ in 0..4 {
        let mut c = authenticating(&proxy, "odd_name").await;
        assert_eq!(c.line().await, "550 5.7.1 The mail server refused your EHLO name.\r\n");
    }
    assert!(proxy.app.health().is_up("fake"));
    let mut c = authenticating(&proxy, "client.example").await;
    assert_eq!(c.line().await, "235 2.7.0 Authentication successful\r\n");
}

/// Postfix runs its client restrictions again for the address XCLIENT gives, and a refusal
/// there names the client: the client's own, answered as temporary and not counted against the
/// backend (one client could otherwise mark a pool down for everyone).
#[tokio::test]
async fn a_refusal_of_the_clients_address_at_xclient_is_the_clients_not_the_backends() {
    let (proxy, _backend) = setup(Behaviour::SmtpXclientClientRefused).await;
    for _ in 0..4 {
        let mut c = authenticating(&proxy, "c").await;
        assert_eq!(c.line().await, "454 4.7.0 The mail server cannot take your connection now, try again later.\r\n");
    }
    assert!(proxy.app.health().is_up("fake"));
}

/// With the client's address in a PROXY v2 header, Postfix applies its per-client limits before
/// the greeting and names the client in the refusal (`421 4.7.0 host Error: too many connections
/// from ADDR`): the client's own, as at XCLIENT above, not counted against the backend (one
/// office behind one address, or one guesser, could otherwise mark it down for everyone).
#[tokio::test]
async fn a_greeting_refusal_naming_the_client_behind_proxy_v2_is_the_clients() {
    let (proxy, backend) =
        setup_with(Behaviour::SmtpProxyV2ClientLimit, "client_address = \"proxy-v2\"\nlogin = \"replay\"", "").await;
    for _ in 0..4 {
        let mut c = authenticating(&proxy, "c").await;
        assert_eq!(c.line().await, "454 4.7.0 The mail server cannot take your connection now, try again later.\r\n");
    }
    assert!(backend.connections() >= 4);
    assert!(proxy.app.health().is_up("fake"));
}

/// A client's EHLO name cannot break the proxy's XCLIENT: one whose xtext is over Postfix's 255
/// bytes (`+` triples) is left out of it (the replayed EHLO still carries it), and what
/// Postfix's tokenizer reads as quoting (a `\` before the space, a `"`) is encoded, so the
/// `LOGIN=` after it stays an attribute of its own.
#[tokio::test]
async fn ehlo_names_cannot_break_the_proxys_xclient() {
    let (proxy, backend) = setup(Behaviour::Smtp).await;
    let pluses = "+".repeat(86);
    for (i, name) in [pluses.as_str(), "x\\", "a\"b"].into_iter().enumerate() {
        let before = backend.connections();
        let mut c = authenticating(&proxy, name).await;
        assert_eq!(c.line().await, "235 2.7.0 Authentication successful\r\n", "{name}");
        let xclient = (before..backend.connections())
            .flat_map(|conn| backend.lines(conn))
            .find(|l| l.starts_with("XCLIENT "))
            .unwrap();
        let attrs: Vec<&str> = xclient.trim_end().split(' ').collect();
        assert!(attrs.iter().any(|a| a.starts_with("LOGIN=")), "{xclient}");
        assert!(attrs.iter().all(|a| a.len() <= 255 + 8 && !a.contains(['\\', '"'])), "{xclient}");
        assert_eq!(attrs.iter().any(|a| a.starts_with("HELO=")), i > 0, "{xclient}");
    }
    assert!(proxy.app.health().is_up("fake"));
}

/// A user name whose xtext is over Postfix's 255 bytes cannot go in XCLIENT LOGIN (Postfix
/// would refuse the XCLIENT): the login is not sent to such a backend at all (no connection for
/// it), the client hears a temporary failure, and the backend, which did nothing wrong, stays up
/// however often the user tries.
#[tokio::test]
async fn a_user_name_too_long_for_xclient_login_is_not_sent_nor_counted_against_the_backend() {
    use base64::Engine;
    // 86 `+`, three bytes each as xtext: 258 before the domain.
    let user = format!("{}@example.test", "+".repeat(86));
    let backend = FakeBackend::start(Behaviour::Smtp).await;
    let config = protocol_config("smtp", backend.addr, "")
        .replace("[limits]", "[server]\nhostname = \"proxy.example.test\"\n\n[limits]");
    let proxy = Proxy::start(&config, &format!("{USERS}{user}:{{PLAIN}}secret\n")).await;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0secret"));
    for _ in 0..4 {
        let before = backend.connections();
        let mut c = greeted(&proxy).await;
        c.send(format!("EHLO c\r\nAUTH PLAIN {plain}\r\n").as_bytes()).await;
        c.smtp_reply().await;
        assert_eq!(c.line().await, "454 4.7.0 Temporary authentication failure\r\n");
        let sent: Vec<String> = (before..backend.connections()).flat_map(|conn| backend.lines(conn)).collect();
        assert!(!sent.iter().any(|l| l.starts_with("XCLIENT")), "{sent:?}");
        // Not even connected to: only the EHLO probe's connections, if one ran meanwhile.
        assert!(sent.iter().all(|l| l.starts_with("EHLO") || l.starts_with("QUIT")), "{sent:?}");
    }
    assert!(proxy.app.health().is_up("fake"));
    // A name that fits still logs in.
    let mut c = logged_in(&proxy).await;
    c.send(b"QUIT\r\n").await;
}

/// A backend that offers AUTH to the proxy but not for the client's address (named by XCLIENT)
/// refuses this client, not everyone: a temporary failure, not counted against its health.
#[tokio::test]
async fn auth_withheld_from_the_clients_address_is_not_the_backends_failure() {
    let (proxy, _backend) = setup_with(Behaviour::SmtpNoAuthForClient, "login = \"replay\"", "").await;
    for _ in 0..4 {
        let mut c = authenticating(&proxy, "c").await;
        assert_eq!(c.line().await, "454 4.7.0 Temporary authentication failure\r\n");
    }
    assert!(proxy.app.health().is_up("fake"));
}

#[tokio::test]
async fn backend_dropping_after_ehlo_fails_closed() {
    login_fails_unavailable(Behaviour::SmtpDropAfterEhlo, "").await;
}

#[tokio::test]
async fn backend_refusing_starttls_fails_closed() {
    // Reliability case 12.
    login_fails_unavailable(Behaviour::SmtpRefuseStartTls, "transport = \"starttls\"\ntls_verify = false").await;
}

/// Reliability case 12: a backend that does not offer STARTTLS where the config asks for it is
/// never sent the login in the clear; nothing but EHLO reaches it.
#[tokio::test]
async fn backend_without_starttls_fails_closed() {
    let (proxy, backend) = setup_with(Behaviour::Smtp, "transport = \"starttls\"\ntls_verify = false", "").await;
    let mut c = authenticating(&proxy, "c").await;
    assert_eq!(c.line().await, "454 4.7.0 Temporary authentication failure\r\n");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(backend.connections() >= 1);
    for conn in 0..backend.connections() {
        let lines = backend.lines(conn);
        assert!(lines.iter().all(|l| l.starts_with("EHLO ") || l.starts_with("QUIT")), "{lines:?}");
    }
}

/// Reliability case 10: bytes after the backend's 220 to STARTTLS (they would be taken as if
/// they came inside TLS) end the login there: no handshake, nothing more sent.
#[tokio::test]
async fn backend_starttls_reply_with_extra_bytes_aborts() {
    let (proxy, backend) =
        setup_with(Behaviour::SmtpStartTlsExtraBytes, "transport = \"starttls\"\ntls_verify = false", "").await;
    let mut c = authenticating(&proxy, "c").await;
    assert_eq!(c.line().await, "454 4.7.0 Temporary authentication failure\r\n");
    // The fake records what followed STARTTLS when the proxy closes the connection.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // The login's connection, and the EHLO probe's before it: nothing after STARTTLS.
    assert!(backend.connections() >= 1);
    for conn in 0..backend.connections() {
        let lines = backend.lines(conn);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("EHLO "), "{lines:?}");
        assert_eq!(lines[1], "STARTTLS\r\n", "nothing after STARTTLS: {lines:?}");
    }
}

#[tokio::test]
async fn backend_answering_starttls_without_tls_fails_closed() {
    // Reliability case 72: the handshake fails, and nothing falls back to plaintext.
    login_fails_unavailable(Behaviour::SmtpStartTlsNotTls, "transport = \"starttls\"\ntls_verify = false").await;
}

#[tokio::test]
async fn early_talker_is_refused() {
    let (proxy, _b) = setup_with(Behaviour::Smtp, "", "smtp_greeting_delay = \"300ms\"").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    // Reliability case 36.
    c.send(b"EHLO eager\r\n").await;
    assert_eq!(c.line().await, "421 4.7.0 Error: SMTP protocol synchronization, closing connection\r\n");
    assert!(c.closed().await);
    let mut c = Client::connect(proxy.addr("plain")).await;
    assert_eq!(c.line().await, "220 proxy.example.test ESMTP ready\r\n");
}

#[tokio::test]
async fn a_command_split_over_segments_is_one_command() {
    let (proxy, _b) = setup(Behaviour::Smtp).await;
    let mut c = greeted(&proxy).await;
    // Reliability case 22: `HEL` … 100 ms … `O example.com` is one HELO.
    c.send_in_pieces(&[b"HEL", b"O client.example.test\r\n"]).await;
    let helo = c.smtp_reply().await;
    assert_eq!(helo.len(), 1, "{helo:?}");
    assert!(helo[0].starts_with("250 proxy.example.test"), "{helo:?}");
    // Reliability case 23: `FOO B` … `AR` gets exactly one error; the next reply is NOOP's.
    c.send_in_pieces(&[b"FOO B", b"AR\r\n"]).await;
    let err = c.smtp_reply().await;
    assert!(err.len() == 1 && err[0].starts_with("5"), "{err:?}");
    c.send(b"NOOP\r\n").await;
    let noop = c.smtp_reply().await;
    assert!(noop[0].starts_with("250"), "{noop:?}");
}
