//! The nginx auth_http-compatible service, driven by an in-process HTTP server that answers as
//! nginx's documentation describes.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type Seen = Arc<Mutex<Vec<HashMap<String, String>>>>;
type Answers = Arc<dyn Fn(&str, &str, u32) -> Vec<(String, String)> + Send + Sync>;

/// A scripted auth service: `answer(user, pass, attempt)` gives the response headers.
async fn auth_service(answer: Answers) -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let seen = s2.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    let answer = answer.clone();
                    async move {
                        let h: HashMap<String, String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                            .collect();
                        let unescape = |s: &str| {
                            let mut out = Vec::new();
                            let b = s.as_bytes();
                            let mut i = 0;
                            while i < b.len() {
                                if b[i] == b'%' && i + 2 < b.len() {
                                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                                    i += 3;
                                } else {
                                    out.push(b[i]);
                                    i += 1;
                                }
                            }
                            String::from_utf8(out).unwrap()
                        };
                        let user = unescape(h.get("auth-user").map(String::as_str).unwrap_or(""));
                        let pass = unescape(h.get("auth-pass").map(String::as_str).unwrap_or(""));
                        let attempt = h.get("auth-login-attempt").and_then(|a| a.parse().ok()).unwrap_or(0);
                        seen.lock().unwrap().push(h);
                        let mut resp = Response::builder().status(200);
                        for (k, v) in answer(&user, &pass, attempt) {
                            resp = resp.header(k, v);
                        }
                        Ok::<_, Infallible>(resp.body(Full::new(Bytes::new())).unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    (addr, seen)
}

/// `cfg` with a throttle that blocks a user or an address after two counted failures (and
/// no penalty before): what would be counted shows at once.
fn strict_throttle(cfg: String) -> String {
    cfg.replace("[limits]", "[throttle]\npenalty_after = 100\nblock_after = 2\nuser_block_after = 2\n\n[limits]")
}

/// An OK that sends the login to 127.0.0.1:`port`, the headers an answer starts with.
fn ok_at(port: u16) -> Vec<(String, String)> {
    vec![
        ("Auth-Status".to_string(), "OK".to_string()),
        ("Auth-Server".to_string(), "127.0.0.1".to_string()),
        ("Auth-Port".to_string(), port.to_string()),
    ]
}

fn config(auth: SocketAddr, pool_backend: SocketAddr, extra_urls: &str) -> String {
    format!(
        r#"
[limits]
auth_failure_delay = "10ms"

[[listener]]
name = "plain"
bind = "127.0.0.1:0"
protocol = "imap"
tls = "none"
allow_plaintext_auth = true

[auth]
source = "http"
[auth.http]
urls = [{extra_urls}"http://{auth}/auth"]
timeout = "2s"
headers = {{ "X-Auth-Key" = "s3cret" }}

[[backend]]
name = "pooled"
address = "{pool_backend}"
health = {{ enabled = false }}

[[pool]]
name = "mailpool"
backends = ["pooled"]
"#
    )
}

/// An auth service as nginx's docs describe one; `direct_port` is where "direct" users live.
fn answers(direct_port: u16) -> Answers {
    Arc::new(move |user: &str, pass: &str, _attempt: u32| {
        let h = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match (user, pass) {
            ("direct@example.test", "pw") => {
                h(&[("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", &direct_port.to_string())])
            }
            ("pooled@example.test", "p w%\u{e9}") => h(&[
                ("Auth-Status", "OK"),
                ("Auth-Server", "mailpool"),
                ("Auth-User", "real@example.test"),
                ("Auth-Pass", "backendpw"),
            ]),
            // A case-sensitive service: Alice's account, not alice's.
            ("Alice@example.test", "pw") => h(&[("Auth-Status", "OK"), ("Auth-Server", "mailpool")]),
            ("slow@example.test", _) => h(&[("Auth-Status", "Try again later, please"), ("Auth-Wait", "1")]),
            ("unusable@example.test", _) => {
                h(&[("Auth-Status", "OK"), ("Auth-Server", "mailpool"), ("Auth-User", "Shared Sales")])
            }
            // XCLIENT is POP3's and SMTP's: for an IMAP login it would lose the client's address.
            ("misfit@example.test", _) => h(&[
                ("Auth-Status", "OK"),
                ("Auth-Server", "127.0.0.1"),
                ("Auth-Port", &direct_port.to_string()),
                ("Auth-Client-Address", "xclient"),
            ]),
            (_, _) => h(&[("Auth-Status", "Invalid login or password")]),
        }
    })
}

#[tokio::test]
async fn service_routes_by_address_and_by_pool_with_credential_override() {
    let direct = FakeBackend::start(Behaviour::Normal).await;
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let (auth, seen) = auth_service(answers(direct.addr.port())).await;
    let proxy = Proxy::start(&config(auth, pooled.addr, ""), "").await;

    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN direct@example.test pw\r\n").await;
    assert!(c.until_tagged("a").await.last().unwrap().starts_with("a OK"));
    assert_eq!(direct.lines(0)[1], "P3 LOGIN \"direct@example.test\" \"pw\"\r\n");

    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send("b LOGIN pooled@example.test \"p w%\u{e9}\"\r\n".as_bytes()).await;
    assert!(c.until_tagged("b").await.last().unwrap().starts_with("b OK"));
    // Auth-User / Auth-Pass replaced what the backend got.
    assert_eq!(pooled.lines(0)[1], "P3 LOGIN \"real@example.test\" \"backendpw\"\r\n");

    let seen = seen.lock().unwrap();
    let req = &seen[1];
    assert_eq!(req["auth-method"], "plain");
    // nginx sends bytes above 0x7f as they are (see tests/e2e/test_auth_http_nginx.py).
    assert_eq!(req["auth-pass"], "p%20w%25\u{e9}");
    assert_eq!(req["auth-protocol"], "imap");
    assert_eq!(req["auth-login-attempt"], "1");
    assert_eq!(req["client-ip"], "127.0.0.1");
    assert_eq!(req["x-auth-key"], "s3cret");
}

/// `config` with the pool's backend logging in as master user `m` (password `mp`).
fn master_config(auth: SocketAddr, pooled: SocketAddr) -> String {
    config(auth, pooled, "").replace(
        "health = { enabled = false }",
        "health = { enabled = false }\nlogin = \"master\"\nmaster_user = \"m\"\nmaster_password = \"mp\"",
    )
}

#[tokio::test]
async fn an_unusable_auth_user_is_an_outage_not_the_clients_own_name() {
    // "Shared Sales" is no user name: the session must not go on as the client's own name
    // (which a master or XCLIENT login would open), nor reach the backend at all.
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let (auth, _) = auth_service(answers(1)).await;
    let proxy = Proxy::start(&master_config(auth, pooled.addr), "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN unusable@example.test pw\r\n").await;
    assert_eq!(c.line().await, "a NO [UNAVAILABLE] Server unavailable, try again later.\r\n");
    assert_eq!(pooled.connections(), 0);
}

/// A master-user (or XCLIENT) login gives the backend the name the service judged, as the
/// client sent it (nginx does the same), never the proxy's canonical form of it: a service
/// that tells `Alice` from `alice` said yes to Alice, and the backend must open Alice's mailbox.
#[tokio::test]
async fn a_master_login_carries_the_name_the_service_judged() {
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let (auth, seen) = auth_service(answers(1)).await;
    let proxy = Proxy::start(&master_config(auth, pooled.addr), "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN Alice@example.test pw\r\n").await;
    assert!(c.until_tagged("a").await.last().unwrap().starts_with("a OK"));
    assert_eq!(seen.lock().unwrap()[0]["auth-user"], "Alice@example.test");
    // base64("Alice@example.test\0m\0mp")
    assert_eq!(pooled.lines(0).last().unwrap(), "P3 AUTHENTICATE PLAIN QWxpY2VAZXhhbXBsZS50ZXN0AG0AbXA=\r\n");
}

/// An `Auth-Client-Address` the protocol has no way to send (XCLIENT for IMAP, ID for POP3 and
/// SMTP) is the service's mistake, refused as the config refuses it: handled like an outage,
/// never a login that silently tells the backend no client address.
#[tokio::test]
async fn an_auth_client_address_that_does_not_fit_the_protocol_is_an_outage() {
    let direct = FakeBackend::start(Behaviour::Normal).await;
    let (auth, _) = auth_service(answers(direct.addr.port())).await;
    let proxy = Proxy::start(&config(auth, direct.addr, ""), "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN misfit@example.test pw\r\n").await;
    assert_eq!(c.line().await, "a NO [UNAVAILABLE] Server unavailable, try again later.\r\n");
    assert_eq!(direct.connections(), 0);
}

#[tokio::test]
async fn failure_text_is_shown_and_without_auth_wait_the_connection_closes() {
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let (auth, _) = auth_service(answers(1)).await;
    let proxy = Proxy::start(&config(auth, pooled.addr, ""), "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN who@example.test nope\r\n").await;
    assert_eq!(c.line().await, "a NO Invalid login or password\r\n");
    assert!(c.closed().await);
}

#[tokio::test]
async fn pop3_refusals_carry_a_response_code_and_nothing_follows_the_last() {
    // CAPA announces AUTH-RESP-CODE: a refusal says [AUTH], with Auth-Wait too (nginx documents
    // "Invalid login or password" with a wait; [SYS/TEMP] would have the client retry the same
    // password). After the last refusal the connection closes without an unsolicited reply.
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let (auth, _) = auth_service(answers(1)).await;
    let cfg = config(auth, pooled.addr, "").replace("protocol = \"imap\"", "protocol = \"pop3\"");
    let proxy = Proxy::start(&cfg, "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"USER slow@example.test\r\nPASS x\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
    assert_eq!(c.line().await, "-ERR [AUTH] Try again later, please\r\n");
    c.send(b"USER who@example.test\r\nPASS nope\r\nNOOP\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
    assert_eq!(c.line().await, "-ERR [AUTH] Invalid login or password\r\n");
    assert_eq!(c.line().await, "", "nothing follows the refusal, not even an answer to NOOP");
}

#[tokio::test]
async fn auth_wait_delays_and_lets_the_client_retry() {
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let (auth, seen) = auth_service(answers(1)).await;
    let proxy = Proxy::start(&config(auth, pooled.addr, ""), "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    let start = tokio::time::Instant::now();
    c.send(b"a LOGIN slow@example.test x\r\n").await;
    assert_eq!(c.line().await, "a NO Try again later, please\r\n");
    assert!(start.elapsed() >= std::time::Duration::from_millis(950));
    c.send(b"b LOGIN slow@example.test y\r\n").await;
    assert_eq!(c.line().await, "b NO Try again later, please\r\n");
    assert_eq!(seen.lock().unwrap()[1]["auth-login-attempt"], "2");
}

/// nginx's example of a refusal for now (its database down): `Auth-Error-Code: 451 4.3.0`. It is
/// answered with the service's text, but like an outage it never counts against the client
/// (reliability case 61): not throttled, not cached, the connection kept. `Auth-Status: WAIT`
/// is asked again after its `Auth-Wait`, the client none the wiser; a header sent twice is read
/// as nginx reads it, any refusal among them refusing.
#[tokio::test]
async fn temporary_refusals_waits_and_repeated_headers_are_read_as_nginx_does() {
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let d2 = down.clone();
    let (auth, seen) = auth_service(Arc::new(move |user: &str, _: &str, _: u32| {
        let h = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match user {
            "twice@example.test" => {
                h(&[("Auth-Status", "OK"), ("Auth-Server", "mailpool"), ("Auth-Status", "Invalid login")])
            }
            "waited@example.test" if d2.swap(false, std::sync::atomic::Ordering::SeqCst) => {
                h(&[("Auth-Status", "WAIT"), ("Auth-Wait", "1")])
            }
            "waited@example.test" => h(&[("Auth-Status", "OK"), ("Auth-Server", "mailpool")]),
            _ => h(&[("Auth-Status", "Temporary server problem, try again later"), ("Auth-Error-Code", "451 4.3.0")]),
        }
    }))
    .await;
    let cfg = strict_throttle(config(auth, pooled.addr, ""))
        .replace("timeout = \"2s\"", "timeout = \"2s\"\nnegative_cache_ttl = \"1h\"");
    let proxy = Proxy::start(&cfg, "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    // More than max_auth_attempts (3) and block_after (2), the same password each time.
    for tag in ["a", "b", "c", "d"] {
        c.send(format!("{tag} LOGIN x@example.test y\r\n").as_bytes()).await;
        assert_eq!(c.line().await, format!("{tag} NO [UNAVAILABLE] Temporary server problem, try again later\r\n"));
    }
    assert_eq!(seen.lock().unwrap().len(), 4, "a refusal for now was answered from the cache");
    // Every request is an attempt, as nginx counts them, refused for now or not.
    let numbers: Vec<String> = seen.lock().unwrap().iter().map(|h| h["auth-login-attempt"].clone()).collect();
    assert_eq!(numbers, ["1", "2", "3", "4"]);
    // The cache key holds the attempt number: the same first attempt, on two new connections,
    // is asked about both times, never answered from the negative cache.
    for _ in 0..2 {
        let mut fresh = Client::connect(proxy.addr("plain")).await;
        fresh.line().await;
        fresh.send(b"a LOGIN x@example.test y\r\n").await;
        assert_eq!(fresh.line().await, "a NO [UNAVAILABLE] Temporary server problem, try again later\r\n");
    }
    assert_eq!(seen.lock().unwrap().len(), 6, "a refusal for now was answered from the cache");
    c.send(b"e LOGIN twice@example.test y\r\n").await;
    assert_eq!(c.line().await, "e NO Invalid login\r\n");
    drop(c);
    // Not blocked: the temporary refusals did not count. The WAIT is asked about again.
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    let start = tokio::time::Instant::now();
    c.send(b"f LOGIN waited@example.test pw\r\n").await;
    let reply = c.until_tagged("f").await;
    assert!(reply.last().unwrap().starts_with("f OK"), "{reply:?}");
    assert!(start.elapsed() >= std::time::Duration::from_millis(950), "{:?}", start.elapsed());
    let asked = seen.lock().unwrap().iter().filter(|h| h["auth-user"] == "waited@example.test").count();
    assert_eq!(asked, 2);
}

/// A POP3 backend the service names by address gets XCLIENT where it announces it, and a login
/// without it where not: nginx never sends XCLIENT for POP3, so a backend moved over from
/// behind it need not take it. `Auth-Client-Address: xclient` in the answer fails closed there.
#[tokio::test]
async fn a_pop3_backend_named_by_address_gets_xclient_only_where_announced_unless_asked() {
    for (behaviour, named, xclient, logged_in) in [
        (Behaviour::Pop3, false, true, true),
        (Behaviour::Pop3NoXclient, false, false, true),
        (Behaviour::Pop3NoXclient, true, false, false),
    ] {
        let backend = FakeBackend::start(behaviour).await;
        let port = backend.addr.port();
        let (auth, _) = auth_service(Arc::new(move |_: &str, _: &str, _: u32| {
            let mut h = ok_at(port);
            if named {
                h.push(("Auth-Client-Address".to_string(), "xclient".to_string()));
            }
            h
        }))
        .await;
        let cfg = config(auth, backend.addr, "").replace("protocol = \"imap\"", "protocol = \"pop3\"");
        let proxy = Proxy::start(&cfg, "").await;
        let mut c = Client::connect(proxy.addr("plain")).await;
        c.line().await;
        c.send(b"USER alice@example.test\r\nPASS secret\r\n").await;
        assert_eq!(c.line().await, "+OK\r\n");
        let reply = c.line().await;
        let what = format!("{behaviour:?}, Auth-Client-Address named: {named}");
        if logged_in {
            assert_eq!(reply, "+OK Logged in.\r\n", "{what}");
            let got = backend.lines(0);
            assert_eq!(got[0].starts_with("XCLIENT ADDR=127.0.0.1 "), xclient, "{what}: {got:?}");
        } else {
            assert_eq!(reply, "-ERR [SYS/TEMP] Server unavailable, try again later.\r\n", "{what}");
        }
    }
}

#[tokio::test]
async fn outage_is_a_temporary_failure_and_never_counts_against_the_user() {
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cfg = config(down, pooled.addr, "").replace("auth_failure_delay = \"10ms\"", "auth_failure_delay = \"200ms\"");
    let proxy = Proxy::start(&cfg, "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    // More outages than max_auth_attempts (3): the connection stays open. Each answer is paced
    // like a failed login (reliability case 54): a client looping on LOGIN cannot turn the
    // outage into a request per round trip.
    let started = tokio::time::Instant::now();
    for tag in ["a", "b", "c", "d"] {
        c.send(format!("{tag} LOGIN x@example.test y\r\n").as_bytes()).await;
        assert_eq!(c.line().await, format!("{tag} NO [UNAVAILABLE] Server unavailable, try again later.\r\n"));
    }
    assert!(started.elapsed() >= std::time::Duration::from_millis(800), "{:?}", started.elapsed());
}

/// Reliability case 61, the throttle's side: outages, however many and with whatever
/// passwords, are not guesses. Once the service is back the user logs in, where as many
/// failures would have blocked the user and the address.
#[tokio::test]
async fn outages_are_never_counted_by_the_throttle() {
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let u2 = up.clone();
    let (auth, seen) = auth_service(Arc::new(move |_: &str, _: &str, _: u32| {
        if u2.load(std::sync::atomic::Ordering::SeqCst) {
            vec![("Auth-Status".to_string(), "OK".to_string()), ("Auth-Server".to_string(), "mailpool".to_string())]
        } else {
            // No Auth-Status: the service is broken, an outage.
            Vec::new()
        }
    }))
    .await;
    let cfg = strict_throttle(config(auth, pooled.addr, ""));
    let proxy = Proxy::start(&cfg, "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    for (tag, password) in [("a", "p1"), ("b", "p2"), ("c", "p3"), ("d", "p4")] {
        c.send(format!("{tag} LOGIN x@example.test {password}\r\n").as_bytes()).await;
        assert!(c.line().await.starts_with(&format!("{tag} NO [UNAVAILABLE]")));
    }
    assert_eq!(seen.lock().unwrap().len(), 4);
    drop(c);
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"e LOGIN x@example.test p5\r\n").await;
    let reply = c.until_tagged("e").await;
    assert!(reply.last().unwrap().starts_with("e OK"), "{reply:?}");
}

/// Reliability case 61 with an auth service that takes the connection and never answers: each
/// URL gets `timeout`, then the next one answers; with none left the login is a temporary
/// failure that never counts against the user (more of them than max_auth_attempts, and the
/// connection stays open).
#[tokio::test]
async fn a_hanging_auth_service_times_out_to_the_next_url_or_a_temporary_failure() {
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging = hang.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let direct = FakeBackend::start(Behaviour::Normal).await;
    let (auth, _) = auth_service(answers(direct.addr.port())).await;
    let short = |cfg: String| cfg.replace("timeout = \"2s\"", "timeout = \"1s\"");
    let proxy = Proxy::start(&short(config(auth, direct.addr, &format!("\"http://{hanging}/auth\", "))), "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN direct@example.test pw\r\n").await;
    assert!(c.until_tagged("a").await.last().unwrap().starts_with("a OK"));

    let proxy = Proxy::start(&short(config(hanging, direct.addr, "")), "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    for tag in ["a", "b", "c", "d"] {
        c.send(format!("{tag} LOGIN direct@example.test pw\r\n").as_bytes()).await;
        assert_eq!(c.line().await, format!("{tag} NO [UNAVAILABLE] Server unavailable, try again later.\r\n"));
    }
}

#[tokio::test]
async fn second_url_answers_when_the_first_is_down() {
    let direct = FakeBackend::start(Behaviour::Normal).await;
    let (auth, _) = auth_service(answers(direct.addr.port())).await;
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proxy = Proxy::start(&config(auth, direct.addr, &format!("\"http://{down}/auth\", ")), "").await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN direct@example.test pw\r\n").await;
    assert!(c.until_tagged("a").await.last().unwrap().starts_with("a OK"));
}

/// Reliability case 44 with an auth service that renames the user (`Auth-User`): the failures
/// were counted under the name the client gave, and a correct login takes them back from the
/// address's count although the session goes on under the service's name.
#[tokio::test]
async fn a_login_renamed_by_the_service_takes_back_its_own_failures() {
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let (auth, _) = auth_service(answers(1)).await;
    let cfg = config(auth, pooled.addr, "")
        + "\n[throttle]\nenabled = true\npenalty_after = 100\nblock_after = 3\nuser_block_after = 100\n";
    let proxy = Proxy::start(&cfg, "").await;
    // The service's refusal closes the connection (no Auth-Wait): one attempt per connection.
    let attempt = |user: &'static str, pass: &'static str| {
        let addr = proxy.addr("plain");
        async move {
            let mut c = Client::connect(addr).await;
            c.line().await;
            c.send(format!("a LOGIN {user} \"{pass}\"\r\n").as_bytes()).await;
            c.until_tagged("a").await.last().unwrap().clone()
        }
    };
    for pass in ["typo1", "typo2"] {
        assert_eq!(attempt("pooled@example.test", pass).await, "a NO Invalid login or password\r\n");
    }
    assert!(attempt("pooled@example.test", "p w%\u{e9}").await.starts_with("a OK"));
    // Failures for someone else: with the two typos still counted, the address would reach
    // block_after (3) after the first and the second would be refused as throttled.
    for pass in ["guess1", "guess2"] {
        assert_eq!(attempt("other@example.test", pass).await, "a NO Invalid login or password\r\n", "{pass}");
    }
}

/// An SMTP backend the auth service names by address (nginx's way, with no SMTP backend in the
/// config) has its extensions shown in EHLO once a login has learned them; before, only the
/// proxy's own STARTTLS and AUTH ever were.
#[tokio::test]
async fn ehlo_shows_what_a_backend_named_by_address_offers() {
    let pooled = FakeBackend::start(Behaviour::Normal).await;
    let direct = FakeBackend::start(Behaviour::Smtp).await;
    let (auth, _) = auth_service(answers(direct.addr.port())).await;
    let cfg = config(auth, pooled.addr, "").replace("protocol = \"imap\"", "protocol = \"smtp\"");
    let proxy = Proxy::start(&cfg, "").await;
    let ehlo = |proxy_addr| async move {
        let mut c = Client::connect(proxy_addr).await;
        assert!(c.line().await.starts_with("220 "));
        c.send(b"EHLO client.example\r\n").await;
        let lines = c.smtp_reply().await;
        (c, lines)
    };
    let (mut c, before) = ehlo(proxy.addr("plain")).await;
    assert_eq!(before[1..], ["250 AUTH PLAIN LOGIN\r\n"]);
    // base64("\0direct@example.test\0pw")
    c.send(b"AUTH PLAIN AGRpcmVjdEBleGFtcGxlLnRlc3QAcHc=\r\n").await;
    assert_eq!(c.line().await, "235 2.7.0 Authentication successful\r\n");
    let (_c, after) = ehlo(proxy.addr("plain")).await;
    assert_eq!(after[1..], EHLO_WITH_FAKE_SMTP);
}

/// A service that only routes (OK without Auth-Pass, as nginx and Angie document) leaves the
/// password to the backend: its refusals are guesses, throttled like any wrong password. One
/// that sends the password to use has checked the client's: the backend's refusal is then the
/// two disagreeing, not a guess, and not throttled.
#[tokio::test]
async fn backend_refusals_after_a_routing_only_service_are_throttled() {
    let rejecting = FakeBackend::start(Behaviour::RejectLogin).await;
    let port = rejecting.addr.port();
    // Without Auth-Pass, or with the client's own password echoed (nginx wants an Auth-Pass in
    // an IMAP or POP3 OK, so a routing-only script sends the one it was given): the backend's
    // refusals are guesses. With a password of the service's own: the service checked.
    // The echo may come back without the blanks at its ends (an HTTP stack trims header values):
    // still the client's own.
    for (with_pass, throttled_after) in
        [(None, Some(2)), (Some("echo"), Some(2)), (Some("echo-trimmed"), Some(2)), (Some("service-chosen"), None)]
    {
        let (auth, _) = auth_service(Arc::new(move |_: &str, pass: &str, _: u32| {
            let mut h = ok_at(port);
            match with_pass {
                Some("echo") => h.push(("Auth-Pass".to_string(), pass.to_string())),
                Some("echo-trimmed") => h.push(("Auth-Pass".to_string(), pass.trim().to_string())),
                Some(own) => h.push(("Auth-Pass".to_string(), own.to_string())),
                None => {}
            }
            h
        }))
        .await;
        let cfg = config(auth, rejecting.addr, "").replace(
            "[limits]",
            "[throttle]\npenalty_after = 100\nblock_after = 2\nuser_block_after = 100\n\n[limits]",
        );
        let proxy = Proxy::start(&cfg, "").await;
        for i in 0..4 {
            let mut c = Client::connect(proxy.addr("plain")).await;
            c.line().await;
            c.send(format!("a LOGIN someone@example.test \"guess{i} \"\r\n").as_bytes()).await;
            let line = c.line().await;
            let expected = if throttled_after.is_some_and(|n| i >= n) {
                "a NO [UNAVAILABLE] Too many login failures"
            } else {
                "a NO [AUTHENTICATIONFAILED]"
            };
            assert!(line.starts_with(expected), "Auth-Pass {with_pass:?}, attempt {i}: {line}");
        }
    }
}

/// A routing-only service's OK is no check of the password: logins the backend has yet to
/// verify do not take the user's session slot (an attacker's guesses held at the backend would
/// lock the user out).
#[tokio::test]
async fn logins_a_routing_only_service_passed_do_not_fill_the_user_cap_before_the_backend_verifies() {
    let held = FakeBackend::start(Behaviour::HangAfterGreeting).await;
    let port = held.addr.port();
    let (auth, _) = auth_service(Arc::new(move |_: &str, _: &str, _: u32| {
        [("Auth-Status", "OK".to_string()), ("Auth-Server", "127.0.0.1".to_string()), ("Auth-Port", port.to_string())]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }))
    .await;
    let cfg = config(auth, held.addr, "")
        .replace("[limits]", "[limits]\nmax_sessions_per_user = 1\nbackend_login_timeout = \"2s\"");
    let proxy = Proxy::start(&cfg, "").await;
    let mut attacker = Client::connect(proxy.addr("plain")).await;
    attacker.line().await;
    attacker.send(b"a LOGIN victim@example.test guess\r\n").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut victim = Client::connect(proxy.addr("plain")).await;
    victim.line().await;
    victim.send(b"b LOGIN victim@example.test secret\r\n").await;
    let reply = victim.until_tagged("b").await;
    assert!(!reply.last().unwrap().contains("Too many sessions"), "{reply:?}");
}

/// A routing-only service that renames the login (Auth-User, no Auth-Pass): the backend's
/// refusals count for the user under the name the client typed, which is the name the next
/// attempt is checked under (they were counted under the service's name, which nothing checks).
#[tokio::test]
async fn refusals_of_a_renamed_login_count_for_the_name_the_client_typed() {
    let rejecting = FakeBackend::start(Behaviour::RejectLogin).await;
    let port = rejecting.addr.port();
    let (auth, _) = auth_service(Arc::new(move |_: &str, _: &str, _: u32| {
        let mut h = ok_at(port);
        h.push(("Auth-User".to_string(), "robert@example.test".to_string()));
        h
    }))
    .await;
    let cfg = config(auth, rejecting.addr, "")
        .replace("[limits]", "[throttle]\npenalty_after = 100\nblock_after = 100\nuser_block_after = 2\n\n[limits]");
    let proxy = Proxy::start(&cfg, "").await;
    for i in 0..3 {
        let mut c = Client::connect(proxy.addr("plain")).await;
        c.line().await;
        c.send(format!("a LOGIN bob@example.test guess{i}\r\n").as_bytes()).await;
        let line = c.line().await;
        let expected =
            if i >= 2 { "a NO [UNAVAILABLE] Too many login failures" } else { "a NO [AUTHENTICATIONFAILED]" };
        assert!(line.starts_with(expected), "attempt {i}: {line}");
    }
}
