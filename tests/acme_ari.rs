//! ACME Renewal Information (RFC 9773) against a small in-process mock directory: Pebble 2.4 has
//! no renewalInfo endpoint, so the ARI path is tested here and the fallback against Pebble.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::PrivateKeyDer;

/// An HTTPS mock ACME directory with an ARI endpoint; returns (directory URL, CA file, paths seen).
async fn mock_directory(
    dir: &std::path::Path,
    window: (SystemTime, SystemTime),
    retry_after: &'static str,
) -> (String, std::path::PathBuf, Arc<Mutex<Vec<String>>>) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let ca_file = dir.join("mock-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (directory, seen) = mock_directory_under(&ca, window, retry_after).await;
    (directory, ca_file, seen)
}

/// `mock_directory` serving a certificate from `ca`; returns (directory URL, paths seen).
async fn mock_directory_under(
    ca: &CertifiedIssuer<'static, KeyPair>,
    window: (SystemTime, SystemTime),
    retry_after: &'static str,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, ca).unwrap();
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap())
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (b2, s2) = (base.clone(), seen.clone());
    // "flaky-directory": the first directory request gets a 503 (a CA restarting).
    let flaky = Arc::new(std::sync::atomic::AtomicBool::new(retry_after == "flaky-directory"));
    let rfc3339 =
        |t: SystemTime| time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap();
    let (start, end) = (rfc3339(window.0), rfc3339(window.1));
    let issuing = Arc::new(Issuing::new());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, base, seen, start, end, flaky, issuing) =
                (acceptor.clone(), b2.clone(), s2.clone(), start.clone(), end.clone(), flaky.clone(), issuing.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let path = req.uri().path().to_string();
                    seen.lock().unwrap().push(path.clone());
                    let (base, start, end) = (base.clone(), start.clone(), end.clone());
                    let fail_once = path == "/dir" && flaky.swap(false, std::sync::atomic::Ordering::SeqCst);
                    let (seen, issuing) = (seen.clone(), issuing.clone());
                    async move {
                        // "issue": a CA that issues at once (authorizations already valid).
                        let req = if retry_after == "issue" {
                            match issuing.answer(&path, req, &base).await {
                                Ok(resp) => return Ok::<_, Infallible>(resp),
                                Err(req) => req,
                            }
                        } else {
                            req
                        };
                        // "orders": nonces are given, and each new order's JWS payload is noted
                        // (as "/order PAYLOAD") and refused as malformed.
                        // "orders-hang": the order never answered.
                        // "orders-limited": refused as rate-limited instead; "orders-limited-429"
                        // as Let's Encrypt does it for mail.example.test, a 429 with a Retry-After
                        // of a day (other names: without one).
                        let orders = retry_after.starts_with("orders");
                        let refusal =
                            if retry_after.starts_with("orders-limited") { "rateLimited" } else { "malformed" };
                        let resp = if orders && path == "/nonce" {
                            Response::builder().header("replay-nonce", "bW9jaw").body(Full::new(Bytes::new()))
                        } else if retry_after == "orders-hang" && path == "/order" {
                            // A CA that takes its time: the order is still running when the
                            // process ends.
                            seen.lock().unwrap().push("/order (held)".to_string());
                            let never: Infallible = std::future::pending().await;
                            match never {}
                        } else if orders && path == "/order" {
                            let payload = jws_payload(req).await;
                            let (status, wait) =
                                if retry_after == "orders-limited-429" && payload.contains("mail.example.test") {
                                    (429, "86400")
                                } else {
                                    (400, "")
                                };
                            seen.lock().unwrap().push(format!("/order {payload}"));
                            let resp = Response::builder().status(status);
                            let resp = if wait.is_empty() { resp } else { resp.header("retry-after", wait) };
                            resp.header("content-type", "application/problem+json")
                                .header("replay-nonce", "bW9jaw")
                                .body(Full::new(Bytes::from(format!(
                                    r#"{{"type":"urn:ietf:params:acme:error:{refusal}","detail":"mock"}}"#
                                ))))
                        } else if fail_once {
                            Response::builder().status(503).body(Full::new(Bytes::new()))
                        } else if path == "/dir" {
                            let body = format!(
                                r#"{{"newNonce":"{base}/nonce","newAccount":"{base}/acct","newOrder":"{base}/order","renewalInfo":"{base}/ari"}}"#
                            );
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                        } else if path.starts_with("/ari/") && retry_after == "fail" {
                            Response::builder().status(500).body(Full::new(Bytes::new()))
                        } else if path.starts_with("/ari/") {
                            let body = format!(r#"{{"suggestedWindow":{{"start":"{start}","end":"{end}"}}}}"#);
                            Response::builder()
                                .header("content-type", "application/json")
                                .header(
                                    "retry-after",
                                    if orders || retry_after == "issue" { "21600" } else { retry_after },
                                )
                                .body(Full::new(Bytes::from(body)))
                        } else {
                            Response::builder().status(404).body(Full::new(Bytes::new()))
                        };
                        Ok::<_, Infallible>(resp.unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    (format!("{base}/dir"), seen)
}

/// The mock CA's issuing side: an order is ready at once and finalized by signing its CSR, for
/// 90 days.
struct Issuing {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The last certificate issued, PEM.
    issued: Mutex<Option<String>>,
    /// What the last order replaces.
    replaces: Mutex<Option<String>>,
}

impl Issuing {
    fn new() -> Issuing {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_identifier_method = rcgen::KeyIdMethod::Sha256;
        Issuing {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
            issued: Mutex::new(None),
            replaces: Mutex::new(None),
        }
    }

    /// The answer to an issuing request, or the request back for the rest of the mock to answer.
    async fn answer(
        &self,
        path: &str,
        req: Request<hyper::body::Incoming>,
        base: &str,
    ) -> Result<Response<Full<Bytes>>, Request<hyper::body::Incoming>> {
        // A renewal's order says what it replaces, and the CA repeats it (instant-acme checks).
        let replaces = |r: &Option<String>| r.as_ref().map(|r| format!(r#","replaces":"{r}""#)).unwrap_or_default();
        let order = |issued: bool, also: String| {
            let certificate = if issued { format!(r#","certificate":"{base}/cert/1""#) } else { String::new() };
            let status = if issued { "valid" } else { "ready" };
            format!(
                r#"{{"status":"{status}","identifiers":[{{"type":"dns","value":"mail.example.test"}}],"authorizations":["{base}/authz/1"],"finalize":"{base}/finalize/1"{certificate}{also}}}"#
            )
        };
        let json = |status: u16, body: String| {
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .header("replay-nonce", "bW9jaw")
                .header("location", format!("{base}/order/1"))
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };
        let issued = || self.issued.lock().unwrap().clone();
        Ok(match path {
            "/nonce" => json(200, String::new()),
            "/order" => {
                let payload: serde_json::Value = serde_json::from_str(&jws_payload(req).await).unwrap();
                let r = payload["replaces"].as_str().map(str::to_string);
                let body = order(false, replaces(&r));
                *self.replaces.lock().unwrap() = r;
                *self.issued.lock().unwrap() = None;
                json(201, body)
            }
            "/order/1" => json(200, order(issued().is_some(), replaces(&self.replaces.lock().unwrap()))),
            "/authz/1" => json(
                200,
                r#"{"status":"valid","identifier":{"type":"dns","value":"mail.example.test"},"challenges":[]}"#.into(),
            ),
            "/finalize/1" => {
                let payload: serde_json::Value = serde_json::from_str(&jws_payload(req).await).unwrap();
                use base64::Engine;
                let der =
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload["csr"].as_str().unwrap()).unwrap();
                let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der.into()).unwrap();
                let now = SystemTime::now();
                // Backdated an hour, as Let's Encrypt does.
                csr.params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(3600));
                csr.params.not_after = time::OffsetDateTime::from(now + Duration::from_secs(90 * 86400));
                csr.params.use_authority_key_identifier_extension = true;
                let cert = csr.signed_by(&self.issuer).unwrap();
                *self.issued.lock().unwrap() = Some(cert.pem());
                json(200, order(true, replaces(&self.replaces.lock().unwrap())))
            }
            "/cert/1" => Response::builder()
                .header("content-type", "application/pem-certificate-chain")
                .header("replay-nonce", "bW9jaw")
                .body(Full::new(Bytes::from(issued().unwrap_or_default())))
                .unwrap(),
            _ => return Err(req),
        })
    }
}

/// The payload of a request's JWS body, as text.
async fn jws_payload(req: Request<hyper::body::Incoming>) -> String {
    use base64::Engine;
    use http_body_util::BodyExt;
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let jws: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(jws["payload"].as_str().unwrap_or_default())
        .unwrap_or_default();
    String::from_utf8_lossy(&payload).to_string()
}

/// The CA's suggested renewal window for these tests: 2 hours, 10 days after `now`.
fn ten_day_window(now: SystemTime) -> (SystemTime, SystemTime) {
    (now + Duration::from_secs(10 * 86400), now + Duration::from_secs(10 * 86400 + 7200))
}

/// A window that opened an hour ago: a stored certificate is renewed at once.
fn open_window(now: SystemTime) -> (SystemTime, SystemTime) {
    (now - Duration::from_secs(3600), now - Duration::from_secs(1800))
}

/// A window 80 days ahead: any order comes from something else.
fn far_window(now: SystemTime) -> (SystemTime, SystemTime) {
    (now + Duration::from_secs(80 * 86400), now + Duration::from_secs(81 * 86400))
}

/// One test's mock CA: its temp dir (removed when dropped), the moment the ARI window was
/// placed from, the paths the mock directory (`mode` as for `mock_directory`) saw, and a config
/// with a stored account for it and its state directory. Bind `dir` for as long as the test
/// runs: dropped, it takes the state directory with it.
struct MockCa {
    dir: tempfile::TempDir,
    now: SystemTime,
    seen: Arc<Mutex<Vec<String>>>,
    config: portcullis::config::Config,
    state: std::path::PathBuf,
}

async fn mock_ca(window: fn(SystemTime) -> (SystemTime, SystemTime), mode: &'static str) -> MockCa {
    portcullis::tls::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let (directory, ca_file, seen) = mock_directory(dir.path(), window(now), mode).await;
    let (config, state) = config_for(dir.path(), &directory, &ca_file);
    MockCa { dir, now, seen, config, state }
}

/// The renewal plan for a 90-day certificate issued `now`, from a mock CA that suggests
/// `window` with `retry_after`; also the paths the CA was asked for.
async fn plan_from_mock(
    now: SystemTime,
    window: (SystemTime, SystemTime),
    retry_after: &'static str,
) -> (portcullis::tls::acme::Plan, bool, Vec<String>) {
    portcullis::tls::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let (directory, ca_file, seen) = mock_directory(dir.path(), window, retry_after).await;
    let (config, _) = config_for(dir.path(), &directory, &ca_file);
    let settings = config.acme.clone().unwrap();
    let ck = ninety_day_key(now);
    let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
    let (plan, ari) = portcullis::tls::acme::renewal_plan(&settings, certs, &ck).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    (plan, ari, seen)
}

#[tokio::test]
async fn ari_window_shapes_the_renewal_plan() {
    let now = SystemTime::now();
    let window = ten_day_window(now);
    let (plan, ari, seen) = plan_from_mock(now, window, "21600").await;
    assert!(ari, "the ARI window was not used");
    assert!(plan.renew_at >= window.0 && plan.renew_at <= window.1, "{plan:?}");
    // Retry-After (6 h) is earlier than the window: ask again then.
    let recheck = plan.recheck_at.unwrap();
    assert!(recheck > now + Duration::from_secs(6 * 3600 - 60) && recheck < now + Duration::from_secs(6 * 3600 + 60));
    assert!(seen.iter().any(|p| p.starts_with("/ari/")), "{seen:?}");
    // Two-thirds of the lifetime would have been ~59 days: ARI moved it to day 10.
    assert!(plan.renew_at < now + Duration::from_secs(20 * 86400));
}

#[tokio::test]
async fn an_ari_retry_after_of_zero_does_not_make_a_loop() {
    let now = SystemTime::now();
    let (plan, ari, _) = plan_from_mock(now, ten_day_window(now), "0").await;
    assert!(ari);
    // Reliability case 79 (a CA's odd answer): "ask again now" is taken as one minute
    // (RFC 9773's lower bound), not as a loop.
    let recheck = plan.recheck_at.unwrap();
    assert!(recheck >= now + Duration::from_secs(59), "{plan:?}");
}

#[tokio::test]
async fn a_failed_ari_lookup_is_asked_again_within_the_hour() {
    // The CA has ARI but answers 500 (down, or restarting, at the proxy's start): the plan falls
    // back to two thirds of the lifetime for now, and asks again in an hour rather than never
    // before day 60, when a revocation announced through ARI would long have been missed.
    let now = SystemTime::now();
    let (plan, ari, seen) = plan_from_mock(now, ten_day_window(now), "fail").await;
    assert!(!ari);
    assert!(seen.iter().any(|p| p.starts_with("/ari/")), "{seen:?}");
    assert!(plan.renew_at > now + Duration::from_secs(58 * 86400), "{plan:?}");
    let recheck = plan.recheck_at.expect("no re-check planned");
    assert!(recheck > now + Duration::from_secs(3500) && recheck < now + Duration::from_secs(3700), "{plan:?}");
}

/// Waits (up to 10 s) until the mock has seen a path that `hit` picks; whether it has.
async fn seen_within(seen: &Arc<Mutex<Vec<String>>>, hit: impl Fn(&str) -> bool) -> bool {
    for _ in 0..100 {
        if seen.lock().unwrap().iter().any(|p| hit(p)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A failed order's record in a certificate's retry file: one that has ended, not the record
/// written as an order starts.
fn failure_recorded(retry: &std::path::Path) -> bool {
    std::fs::read(retry)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|kept| kept["pending"] == false)
}

/// An order begun: its nonce asked for (the mock gives none), or the order itself.
fn an_order(p: &str) -> bool {
    p.starts_with("/order") || p == "/nonce"
}

/// A stored account for the mock directory (restoring it fetches only the directory: no account
/// request) and a config with `[acme]` for one certificate; returns the config and the state
/// directory.
fn config_for(
    dir: &std::path::Path,
    directory: &str,
    ca_file: &std::path::Path,
) -> (portcullis::config::Config, std::path::PathBuf) {
    let state = dir.join("state");
    std::fs::create_dir_all(state.join("certs")).unwrap();
    let account_key = KeyPair::generate().unwrap();
    use base64::Engine;
    let creds = serde_json::json!({
        "id": format!("{}/acct/1", directory.trim_end_matches("/dir")),
        "key_pkcs8": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(account_key.serialize_der()),
        "directory": directory,
    });
    std::fs::write(state.join("account.json"), creds.to_string()).unwrap();
    let webroot = dir.join("webroot");
    std::fs::create_dir_all(&webroot).unwrap();
    let text = format!(
        "[auth]\nsource = \"backend\"\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n[routing.imap]\ndefault = \"b\"\n[acme]\ndirectory = \"{directory}\"\nca_file = \"{}\"\nterms_agreed = true\nstate_dir = \"{}\"\nhttp01_webroot = \"{}\"\nretry_min = \"1h\"\n[[acme.certificate]]\nnames = [\"mail.example.test\"]\n",
        ca_file.display(),
        state.display(),
        webroot.display()
    );
    (portcullis::config::Config::parse(&dir.join("p.toml"), &text).unwrap(), state)
}

/// A certificate file as the ACME task left it a day ago: a restart does not hold back its
/// renewal (a certificate stored within hours is not ordered again at start).
fn stored_a_day_ago(path: &std::path::Path, pem: &str) {
    std::fs::write(path, pem).unwrap();
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(86400)).unwrap();
}

/// A 90-day certificate for mail.example.test, one day old, issued by some CA (the ARI id only
/// needs its AKI and serial).
/// `ninety_day_leaf` as the certified key a running proxy holds.
fn ninety_day_key(now: SystemTime) -> rustls::sign::CertifiedKey {
    let (leaf, leaf_key) = ninety_day_leaf(now);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::sign::CertifiedKey::from_der(
        vec![leaf.der().clone()],
        PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        &provider,
    )
    .unwrap()
}

fn ninety_day_leaf(now: SystemTime) -> (rcgen::Certificate, KeyPair) {
    let mut issuer_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    issuer_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    issuer_params.key_identifier_method = rcgen::KeyIdMethod::Sha256;
    let issuer = CertifiedIssuer::self_signed(issuer_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["mail.example.test".to_string()]).unwrap();
    leaf_params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(86400));
    leaf_params.not_after = time::OffsetDateTime::from(now + Duration::from_secs(89 * 86400));
    leaf_params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x42, 0x17]));
    leaf_params.use_authority_key_identifier_extension = true;
    (leaf_params.signed_by(&leaf_key, &issuer).unwrap(), leaf_key)
}

/// When the CA's ARI window has opened (well before two thirds of the lifetime), the renewal is
/// ordered at once, and the window is not asked for again and again.
#[tokio::test]
async fn an_open_ari_window_orders_the_renewal_once() {
    let MockCa { dir: _dir, now, seen, config, state, .. } = mock_ca(open_window, "21600").await;
    let settings = config.acme.clone().unwrap();
    // A stored 90-day certificate, one day old: far from two thirds of its life.
    let (leaf, leaf_key) = ninety_day_leaf(now);
    stored_a_day_ago(&state.join("certs/mail.example.test.pem"), &leaf.pem());
    std::fs::write(state.join("certs/mail.example.test.key"), leaf_key.serialize_pem()).unwrap();
    let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let _handle = portcullis::tls::acme::start(settings, certs, stop.clone()).await.unwrap();
    // Until the order is tried (or 10 s), then a second more for any re-plan to show.
    seen_within(&seen, an_order).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let seen = seen.lock().unwrap().clone();
    let ari = seen.iter().filter(|p| p.starts_with("/ari/")).count();
    // The mock has no order endpoint: the order fails, and the next try is retry_min (1 h) away.
    assert_eq!(ari, 1, "renewalInfo asked {ari} times");
    assert!(seen.iter().any(|p| p.starts_with("/order") || p == "/nonce"), "no order was placed: {seen:?}");
}

/// A stored certificate issued long ago and close to its end, whose file is new (copied to a new
/// host, restored from a backup): not held back as one stored just now would be (the hold-off
/// against re-ordering in a loop), which would let it expire; it is renewed at once.
#[tokio::test]
async fn a_certificate_copied_in_close_to_its_end_is_renewed_at_once() {
    let MockCa { dir: _dir, now, seen, config, state, .. } = mock_ca(ten_day_window, "21600").await;
    let settings = config.acme.clone().unwrap();
    let mut issuer_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    issuer_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = CertifiedIssuer::self_signed(issuer_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["mail.example.test".to_string()]).unwrap();
    leaf_params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(89 * 86400));
    leaf_params.not_after = time::OffsetDateTime::from(now + Duration::from_secs(3 * 3600));
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    // Written now: the file's time says "stored just now".
    std::fs::write(state.join("certs/mail.example.test.pem"), leaf.pem()).unwrap();
    std::fs::write(state.join("certs/mail.example.test.key"), leaf_key.serialize_pem()).unwrap();
    let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let _handle = portcullis::tls::acme::start(settings, certs, stop.clone()).await.unwrap();
    let ordered = seen_within(&seen, an_order).await;
    stop.cancel();
    assert!(ordered, "not ordered: {:?}", seen.lock().unwrap());
}

/// A name added to a certificate whose stored pair is in date: the stored certificate goes on
/// being served for the names it has (not a self-signed stand-in for all of them) while the new
/// one is ordered, at once.
#[tokio::test]
async fn an_added_name_keeps_the_stored_certificate_while_ordering() {
    // A window far ahead: the order below can only come from the added name.
    let MockCa { dir: _dir, now, seen, config, state, .. } = mock_ca(far_window, "21600").await;
    let mut settings = config.acme.clone().unwrap();
    settings.certificates[0].names.push("new.example.test".to_string());
    let (leaf, leaf_key) = ninety_day_leaf(now);
    stored_a_day_ago(&state.join("certs/mail.example.test.pem"), &leaf.pem());
    std::fs::write(state.join("certs/mail.example.test.key"), leaf_key.serialize_pem()).unwrap();
    let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let _handle = portcullis::tls::acme::start(settings, certs.clone(), stop.clone()).await.unwrap();
    let ordered = seen_within(&seen, an_order).await;
    let served = certs.lookup(Some("mail.example.test")).expect("a certificate for mail.example.test");
    stop.cancel();
    assert!(ordered, "the added name was not ordered at once: {:?}", seen.lock().unwrap());
    assert!(served.cert[0].as_ref() == leaf.der().as_ref(), "the stored certificate is not the one served");
}

/// A stored certificate issued by another directory (the config moved from staging to
/// production, say) is served while this directory is asked for one at once, instead of being
/// kept until two thirds of its life as if this CA had issued it. The issuer is read from the
/// record beside the certificate, or (stored before that was kept) from account.json.
#[tokio::test]
async fn a_certificate_from_another_directory_is_replaced_at_once() {
    portcullis::tls::init_crypto();
    for recorded in [true, false] {
        let MockCa { dir: _dir, now, seen, config, state, .. } = mock_ca(far_window, "21600").await;
        let (leaf, leaf_key) = ninety_day_leaf(now);
        stored_a_day_ago(&state.join("certs/mail.example.test.pem"), &leaf.pem());
        std::fs::write(state.join("certs/mail.example.test.key"), leaf_key.serialize_pem()).unwrap();
        let staging = "https://staging.example.test/dir";
        if recorded {
            std::fs::write(state.join("certs/mail.example.test.directory"), staging).unwrap();
        } else {
            let mut account: serde_json::Value =
                serde_json::from_slice(&std::fs::read(state.join("account.json")).unwrap()).unwrap();
            account["directory"] = staging.into();
            std::fs::write(state.join("account.json"), account.to_string()).unwrap();
        }
        // A configured certificate for the same name, which a stand-in gives way to.
        let mut tls = config.tls.clone();
        tls.self_signed_names = vec!["mail.example.test".to_string()];
        let certs = Arc::new(portcullis::tls::certs::CertStore::load(&tls).unwrap());
        let configured = certs.lookup(Some("mail.example.test")).unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let _handle =
            portcullis::tls::acme::start(config.acme.clone().unwrap(), certs.clone(), stop.clone()).await.unwrap();
        let ordered = seen_within(&seen, an_order).await;
        let interim = certs.acme_certificate("mail.example.test").expect("an ACME certificate installed");
        let served = certs.lookup(Some("mail.example.test")).expect("a certificate for mail.example.test");
        stop.cancel();
        assert!(ordered, "recorded {recorded}: no order at the new directory: {:?}", seen.lock().unwrap());
        // The stored certificate stands in (not a self-signed one)...
        assert!(interim.cert[0].as_ref() == leaf.der().as_ref(), "recorded {recorded}: not the stored certificate");
        // ...but, perhaps from staging, gives way to a configured certificate.
        assert!(Arc::ptr_eq(&served, &configured), "recorded {recorded}: taken as issued by this directory");
    }
}

/// An account stored for another directory is neither used (it would send every order back to
/// that CA) nor overwritten: a new one is made at the configured directory, in its own file.
#[tokio::test]
async fn an_account_from_another_directory_is_not_used() {
    portcullis::tls::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let window = (now + Duration::from_secs(80 * 86400), now + Duration::from_secs(81 * 86400));
    // Both directories under one CA, so the old one is reachable: the case where its stored
    // account would be used.
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let ca_file = dir.path().join("mock-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (old_directory, old_seen) = mock_directory_under(&ca, window, "21600").await;
    let (directory, seen) = mock_directory_under(&ca, window, "21600").await;
    let (config, state) = config_for(dir.path(), &old_directory, &ca_file);
    let mut settings = config.acme.clone().unwrap();
    settings.directory = directory.clone();
    let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let _handle = portcullis::tls::acme::start(settings, certs, stop.clone()).await.unwrap();
    // The mock answers no nonce, so the account is asked for up to that point.
    let asked_new = seen_within(&seen, |p| p == "/nonce" || p == "/acct").await;
    stop.cancel();
    assert!(asked_new, "no account asked of the new directory: {:?}", seen.lock().unwrap());
    assert!(old_seen.lock().unwrap().is_empty(), "the old directory was used: {:?}", old_seen.lock().unwrap());
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("account.json")).unwrap()).unwrap();
    assert_eq!(stored["directory"], old_directory.as_str(), "the old directory's account was overwritten");
}

/// A failed order's backoff outlives the process (reliability case 79): started again (a crash
/// loop, or a reload that restarts the certificate tasks), the manager waits out the stored
/// retry time instead of ordering at once, which against Let's Encrypt would spend its five
/// failed validations per name and hour. A change of the certificate's names starts afresh.
#[tokio::test]
async fn a_failed_orders_backoff_survives_a_restart() {
    let MockCa { dir: _dir, now, seen, config, state, .. } = mock_ca(ten_day_window, "21600").await;
    let settings = config.acme.clone().unwrap();
    let retry = state.join("certs/mail.example.test.retry");
    let run = |settings: portcullis::config::AcmeSettings| {
        let (tls, seen, retry) = (config.tls.clone(), seen.clone(), retry.clone());
        async move {
            seen.lock().unwrap().clear();
            let certs = Arc::new(portcullis::tls::certs::CertStore::load(&tls).unwrap());
            let stop = tokio_util::sync::CancellationToken::new();
            let handle = portcullis::tls::acme::start(settings, certs, stop.clone()).await.unwrap();
            // An order tried (the mock has none to give: it fails), or 10 s without one.
            let ordered = seen_within(&seen, an_order).await;
            // The failure recorded (the retry file written) before the manager stops.
            for _ in 0..100 {
                if !ordered || failure_recorded(&retry) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop.cancel();
            drop(handle);
            tokio::time::sleep(Duration::from_millis(300)).await;
            ordered
        }
    };
    // No certificate yet: ordered at once, and it fails.
    assert!(run(settings.clone()).await, "the first start did not order");
    let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&retry).unwrap()).unwrap();
    assert_eq!(kept["failures"], 1, "{kept}");
    let next = kept["next"].as_u64().unwrap();
    let unix = now.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    // retry_min is 1 h, with ±25 % jitter.
    assert!(next >= unix + 2700 - 5 && next <= unix + 4500 + 30, "{kept}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&retry).unwrap().permissions().mode() & 0o777, 0o600);
    // Started again: the stored retry time is an hour off, so no order.
    assert!(!run(settings.clone()).await, "a restart ordered again at once: {:?}", seen.lock().unwrap());
    // Another name for the certificate: what was tried before is not what is ordered now.
    let mut more = settings.clone();
    more.certificates[0].names.push("new.example.test".to_string());
    assert!(run(more).await, "a changed certificate waited out the old backoff");
}

/// An order the process dies during (a crash, an OOM kill, a crash loop under a supervisor) is
/// counted as failed: the next start waits out its backoff rather than ordering again at each
/// start (reliability case 79). An ordinary stop during an order leaves nothing behind.
#[tokio::test]
async fn an_order_the_process_died_during_counts_as_failed() {
    let MockCa { dir: _dir, now, seen, config, state, .. } = mock_ca(ten_day_window, "orders-hang").await;
    let settings = config.acme.clone().unwrap();
    let retry = state.join("certs/mail.example.test.retry");
    let held = |p: &str| p == "/order (held)";

    // Stopped as usual while the CA holds the order: no record is left.
    let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = portcullis::tls::acme::start(settings.clone(), certs, stop.clone()).await.unwrap();
    assert!(seen_within(&seen, held).await, "no order: {:?}", seen.lock().unwrap());
    assert!(retry.exists(), "the running order is not on record");
    handle.stop().await;
    assert!(!retry.exists(), "an ordinary stop left the order counted as failed");

    // The process dies while the CA holds the order: its runtime goes away with every task,
    // and nothing runs after that, as with a kill.
    seen.lock().unwrap().clear();
    let (tls, started) = (config.tls.clone(), settings.clone());
    let (died_tx, died_rx) = std::sync::mpsc::channel::<()>();
    let process = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let certs = Arc::new(portcullis::tls::certs::CertStore::load(&tls).unwrap());
        let handle = rt.block_on(portcullis::tls::acme::start(started, certs, Default::default())).unwrap();
        let _ = died_rx.recv();
        std::mem::forget(handle);
        rt.shutdown_background();
    });
    assert!(seen_within(&seen, held).await, "no order: {:?}", seen.lock().unwrap());
    died_tx.send(()).unwrap();
    process.join().unwrap();
    let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&retry).unwrap()).unwrap();
    assert_eq!((kept["failures"].as_u64(), kept["pending"].as_bool()), (Some(1), Some(true)), "{kept}");
    let unix = now.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let next = kept["next"].as_u64().unwrap();
    // retry_min is 1 h, with ±25 % jitter.
    assert!(next >= unix + 2700 - 5 && next <= unix + 4500 + 30, "{kept}");

    // Started again: the interrupted order's backoff is waited out.
    seen.lock().unwrap().clear();
    let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = portcullis::tls::acme::start(settings, certs, stop.clone()).await.unwrap();
    assert!(!seen_within(&seen, an_order).await, "ordered again at once: {:?}", seen.lock().unwrap());
    handle.stop().await;
}

/// A certificate that is due for renewal as soon as it arrives (here the CA's ARI window is open
/// already; in life also a clock far ahead) is ordered again after `retry_min`, and each one in
/// a row waits twice as long as the last, as failures do: at `retry_min` every time, an hour's
/// default would spend Let's Encrypt's five duplicate certificates a week in five hours.
#[tokio::test]
async fn certificates_due_on_arrival_are_reordered_ever_more_slowly() {
    let MockCa { dir: _dir, seen, config, .. } = mock_ca(open_window, "issue").await;
    let mut settings = config.acme.clone().unwrap();
    settings.retry_min = Duration::from_millis(400);
    let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = portcullis::tls::acme::start(settings.clone(), certs.clone(), stop.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    handle.stop().await;
    let orders = seen.lock().unwrap().iter().filter(|p| *p == "/order").count();
    let issued = seen.lock().unwrap().iter().filter(|p| *p == "/cert/1").count();
    // Each order takes the mock about half a second; then waits of 0.4, 0.8, 1.6 and 3.2 s
    // (±25 %): four orders in 6 s. At 0.4 s each, seven.
    assert!(issued >= 2, "the CA issued fewer than two certificates: {:?}", seen.lock().unwrap());
    assert!(orders <= 5, "{orders} orders in 6 s: {:?}", seen.lock().unwrap());

    // Started again (a crash loop, a reload): the certificate stored just now is not ordered
    // again at once, though it is due.
    seen.lock().unwrap().clear();
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = portcullis::tls::acme::start(settings, certs, stop.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    handle.stop().await;
    assert!(!seen.lock().unwrap().iter().any(|p| p == "/order"), "ordered again at start: {:?}", seen.lock().unwrap());
}

/// A stored account is replaced only when it cannot be loaded: a CA that fails the directory
/// request once (restarting) makes the attempt fail and wait for its retry, and the account is
/// kept, not replaced by a new one (its key lost, the CA's new-account limit spent). One whose
/// key does not load is put aside as `account.json.unusable` and a new one is asked for.
#[tokio::test]
async fn a_stored_account_outlives_a_ca_outage_but_not_a_broken_key() {
    portcullis::tls::init_crypto();
    for broken_key in [false, true] {
        let mode = if broken_key { "21600" } else { "flaky-directory" };
        let MockCa { dir: _dir, seen, config, state, .. } = mock_ca(ten_day_window, mode).await;
        let account = state.join("account.json");
        if broken_key {
            let mut creds: serde_json::Value = serde_json::from_slice(&std::fs::read(&account).unwrap()).unwrap();
            creds["key_pkcs8"] = "AAAA".into();
            std::fs::write(&account, creds.to_string()).unwrap();
        }
        let stored = std::fs::read(&account).unwrap();
        let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        let _handle = portcullis::tls::acme::start(config.acme.clone().unwrap(), certs, stop.clone()).await.unwrap();
        let new_account = |p: &str| p == "/nonce" || p == "/acct";
        let asked_new = if broken_key {
            seen_within(&seen, new_account).await
        } else {
            // The directory asked for (and refused), then a moment for what would follow.
            seen_within(&seen, |p| p == "/dir").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            seen.lock().unwrap().iter().any(|p| new_account(p))
        };
        stop.cancel();
        let seen = seen.lock().unwrap().clone();
        if broken_key {
            assert!(asked_new, "no new account asked for: {seen:?}");
            assert_eq!(std::fs::read(state.join("account.json.unusable")).unwrap(), stored);
        } else {
            assert!(!asked_new, "a new account was asked for while the CA was down: {seen:?}");
            assert_eq!(std::fs::read(&account).unwrap(), stored);
            assert!(seen.iter().any(|p| p == "/dir"), "{seen:?}");
        }
    }
}

/// A stored account that cannot be read (here a directory in its place; in life a permission
/// or I/O error) is not taken for a missing one: no new account is asked for.
#[tokio::test]
async fn an_unreadable_stored_account_is_not_replaced() {
    let MockCa { dir: _dir, seen, config, state, .. } = mock_ca(ten_day_window, "21600").await;
    std::fs::remove_file(state.join("account.json")).unwrap();
    std::fs::create_dir(state.join("account.json")).unwrap();
    let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let _handle = portcullis::tls::acme::start(config.acme.clone().unwrap(), certs, stop.clone()).await.unwrap();
    // The order starts at once (no certificate yet); give it a moment to get to the account.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.iter().any(|p| p == "/nonce" || p == "/acct"), "a new account was asked for: {seen:?}");
    // It did try, and failed (its backoff is kept): not a manager that never got this far.
    assert!(state.join("certs/mail.example.test.retry").exists(), "no failed attempt recorded: {seen:?}");
    assert!(state.join("account.json").is_dir());
}

/// A renewal names the certificate it replaces (RFC 9773 §5, which exempts it from Let's
/// Encrypt's new-order limits); refused as such, it is ordered again as a new one. A first
/// certificate names none.
#[tokio::test]
async fn a_renewal_names_the_certificate_it_replaces() {
    portcullis::tls::init_crypto();
    // (a stored certificate to replace, the mock's refusal, orders expected)
    for (stored, mode, want) in [(true, "orders", 2), (false, "orders", 1), (true, "orders-limited", 1)] {
        // A window already open: the stored certificate is renewed at once.
        let MockCa { dir: _dir, now, seen, config, state, .. } = mock_ca(open_window, mode).await;
        let (leaf, leaf_key) = ninety_day_leaf(now);
        if stored {
            stored_a_day_ago(&state.join("certs/mail.example.test.pem"), &leaf.pem());
            std::fs::write(state.join("certs/mail.example.test.key"), leaf_key.serialize_pem()).unwrap();
        }
        let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        let _handle = portcullis::tls::acme::start(config.acme.clone().unwrap(), certs, stop.clone()).await.unwrap();
        for _ in 0..100 {
            if seen.lock().unwrap().iter().filter(|p| p.starts_with("/order ")).count() >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
        let orders: Vec<serde_json::Value> = seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|p| p.strip_prefix("/order "))
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        // Rate-limited is not a refusal of the replacement: not placed again at once.
        assert_eq!(orders.len(), want, "stored {stored}, {mode}: {orders:?}");
        for o in &orders {
            assert_eq!(o["identifiers"][0]["value"], "mail.example.test", "{o}");
        }
        if stored {
            let id = instant_acme::CertificateIdentifier::try_from(leaf.der()).unwrap().to_string();
            assert_eq!(orders[0]["replaces"], id.as_str(), "{:?}", orders[0]);
            if want == 2 {
                assert!(orders[1].get("replaces").is_none(), "the second try still names it: {:?}", orders[1]);
            }
        } else {
            assert!(orders[0].get("replaces").is_none(), "{:?}", orders[0]);
        }
    }
}

/// A rate limit that says how long to wait (Let's Encrypt: a 429 with Retry-After) is waited
/// out, longer than the backoff (an hour here), and the wait is what the retry file keeps; by
/// the order that got it only: another certificate's order, failing at the same time without
/// one, keeps its backoff.
#[tokio::test]
async fn a_rate_limits_retry_after_is_waited_out() {
    let MockCa { dir: _dir, now, seen, mut config, state, .. } = mock_ca(ten_day_window, "orders-limited-429").await;
    let mut acme = config.acme.take().unwrap();
    acme.certificates.push(portcullis::config::AcmeCertSpec::new(vec!["other.example.test".into()], false));
    let retries = ["mail.example.test", "other.example.test"].map(|l| state.join(format!("certs/{l}.retry")));
    let certs = Arc::new(portcullis::tls::certs::CertStore::load(&config.tls).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let _handle = portcullis::tls::acme::start(acme, certs, stop.clone()).await.unwrap();
    assert!(seen_within(&seen, |p| p.starts_with("/order ")).await, "no order: {:?}", seen.lock().unwrap());
    for _ in 0..100 {
        if retries.iter().all(|r| failure_recorded(r)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let unix = now.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let next = |r: &std::path::Path| {
        let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(r).unwrap()).unwrap();
        (kept["next"].as_u64().unwrap(), kept)
    };
    let (limited, kept) = next(&retries[0]);
    assert!(limited >= unix + 86_400 - 5 && limited <= unix + 86_400 + 60, "a day, not the hour's backoff: {kept}");
    // retry_min is 1 h, with ±25 % jitter.
    let (other, kept) = next(&retries[1]);
    assert!(other >= unix + 2700 - 5 && other <= unix + 4500 + 30, "the other's backoff: {kept}");
}
