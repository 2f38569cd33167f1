//! An nginx `auth_http`-compatible auth and routing client.
//!
//! The request is the one nginx's mail module sends (a `GET` with `Auth-Method`, `Auth-User`,
//! `Auth-Pass` escaped exactly as nginx escapes them (checked against a real nginx), `Auth-Protocol`, `Auth-Login-Attempt`, `Client-IP`,
//! `Client-Host` and `Auth-SMTP-Helo` for SMTP, `Auth-SSL*`, and configured extra headers), and
//! the response is read the way nginx reads it: the status code is ignored, `Auth-Status: OK`
//! with `Auth-Server`/`Auth-Port` routes, any other `Auth-Status` is the failure text shown to the
//! client, `Auth-Wait` delays and lets the client retry on the same connection, `Auth-Error-Code`
//! is the SMTP reply code, `Auth-User`/`Auth-Pass` replace what is sent to the backend.
//! `docs/auth-http.md` documents the mapping and what is added beyond nginx (keep-alive, HTTPS,
//! several URLs, caching, pool names as `Auth-Server`).
//!
//! A service that cannot be reached, times out or answers without `Auth-Status` is an outage:
//! the client gets a temporary failure and it never counts as the user's failed login.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use siphasher::sip::SipHasher13;
use tokio::time::Instant;

use crate::config::{AuthHttpSettings, ClientAddress, Protocol, Transport};
use crate::tls::TlsInfo;

/// Longest failure text passed on to a client.
const MAX_MESSAGE: usize = 200;
/// The most of a response body read (and thrown away).
const MAX_BODY: usize = 64 * 1024;
/// Longest `Auth-Wait` honoured.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Most cached answers kept.
const MAX_CACHE: usize = 100_000;
/// Most `Auth-Status: WAIT` answers followed for one login.
const MAX_WAITS: u32 = 5;

/// What the proxy knows about the login attempt.
#[derive(Clone)]
pub struct Query<'a> {
    pub protocol: Protocol,
    /// `Auth-Method`: `plain`, or `external` (SASL EXTERNAL: no password, the client
    /// certificate speaks for the user).
    pub method: &'static str,
    pub user: &'a str,
    pub password: &'a [u8],
    /// 1 for the first attempt on a connection, counting up.
    pub attempt: u32,
    pub client_ip: IpAddr,
    pub helo: Option<&'a str>,
    /// Protocol version, cipher suite and client certificate when the client connection is TLS.
    pub tls: Option<TlsInfo>,
}

impl std::fmt::Debug for Query<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("protocol", &self.protocol)
            .field("method", &self.method)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("attempt", &self.attempt)
            .field("client_ip", &self.client_ip)
            .field("helo", &self.helo)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The service's decision.
#[derive(Clone, PartialEq, Eq)]
pub enum Answer {
    Ok {
        /// An address, a host name, or the name of a configured pool or backend.
        server: String,
        port: Option<u16>,
        /// Replacements for the credentials sent to the backend.
        user: Option<String>,
        pass: Option<Vec<u8>>,
        /// Extensions: `Auth-Transport` (plain, tls, starttls) and `Auth-Client-Address`.
        transport: Option<Transport>,
        client_address: Option<ClientAddress>,
    },
    Fail {
        message: String,
        wait: Option<Duration>,
        error_code: Option<String>,
    },
    /// `Auth-Status: WAIT` (nginx, undocumented): ask again after `Auth-Wait` seconds, the
    /// client none the wiser.
    Wait(Duration),
}

/// Whether a refusal's `Auth-Error-Code` is a 4xx reply (nginx's example: `451 4.3.0`, "try
/// again later"): the service's own trouble, not the client's wrong password.
pub fn is_temporary(error_code: Option<&str>) -> bool {
    error_code.is_some_and(|code| code.starts_with('4'))
}

/// `Auth-Pass` is a password: never shown.
impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Ok { server, port, user, pass, transport, client_address } => f
                .debug_struct("Ok")
                .field("server", server)
                .field("port", port)
                .field("user", user)
                .field("pass", &pass.as_ref().map(|_| "<redacted>"))
                .field("transport", transport)
                .field("client_address", client_address)
                .finish(),
            Answer::Fail { message, wait, error_code } => f
                .debug_struct("Fail")
                .field("message", message)
                .field("wait", wait)
                .field("error_code", error_code)
                .finish(),
            Answer::Wait(wait) => f.debug_tuple("Wait").field(wait).finish(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("auth service unavailable: {0}")]
pub struct Outage(pub String);

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

pub struct AuthHttp {
    settings: AuthHttpSettings,
    client: HttpClient,
    cache: Mutex<HashMap<u64, (Instant, Answer)>>,
}

impl std::fmt::Debug for AuthHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Without query strings, where a token may be (`shown`).
        let urls: Vec<&str> = self.settings.urls.iter().map(|u| shown(u)).collect();
        f.debug_struct("AuthHttp").field("urls", &urls).finish()
    }
}

/// The answer's headers, its (ignored) body drained on the side so the connection can be
/// reused: the answer is acted on as soon as its headers are in, as nginx does, not after a
/// body the service is slow to end. The drain is bounded in bytes and time: a service that
/// sends more, or never ends it, costs a connection, not memory or a login's wait.
fn drained(resp: hyper::Response<hyper::body::Incoming>, within: Duration) -> HeaderMap {
    let (parts, body) = resp.into_parts();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(within, http_body_util::Limited::new(body, MAX_BODY).collect()).await;
    });
    parts.headers
}

/// A service URL as logs and errors show it: without its query string or fragment, where a
/// token may be (`https://auth.example/check?key=...`). `check` refuses credentials in the
/// authority for the same reason.
pub(crate) fn shown(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

impl AuthHttp {
    pub fn new(settings: AuthHttpSettings) -> Result<AuthHttp, String> {
        let roots = match &settings.ca_file {
            Some(path) => crate::tls::load_roots(path)?,
            None => crate::tls::system_roots(),
        };
        AuthHttp::with_roots(settings, roots)
    }

    /// The client, verifying https services against `roots`. None to verify with is refused
    /// where a URL is https: every login would fail as an outage, the cause only in a log line.
    fn with_roots(settings: AuthHttpSettings, roots: rustls::RootCertStore) -> Result<AuthHttp, String> {
        if roots.is_empty() && settings.urls.iter().any(|u| u.starts_with("https://")) {
            return Err(format!(
                "no CA certificates to verify the https auth service with: {}; set ca_file",
                crate::tls::no_system_roots()
            ));
        }
        let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        // Title-case header names (Auth-User, Client-Ip): closer to nginx's spelling for services
        // that compare names case-sensitively, although HTTP says they must not.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .http1_title_case_headers(true)
            .build(connector);
        Ok(AuthHttp { settings, client, cache: Mutex::new(HashMap::new()) })
    }

    /// Ask the service (or the cache). Tries each URL in turn until one answers. An answer of
    /// `WAIT` is asked again after its wait, as nginx does, up to `MAX_WAITS` times (then it is
    /// an outage); the login's own deadline bounds it too.
    pub async fn query(&self, q: &Query<'_>) -> Result<Answer, Outage> {
        let key = cache_key(q);
        if let Some(answer) = self.cached(key) {
            return Ok(answer);
        }
        for _ in 0..MAX_WAITS {
            match self.ask(q, key).await? {
                Answer::Wait(wait) => tokio::time::sleep(wait).await,
                answer => return Ok(answer),
            }
        }
        Err(Outage(format!("still WAIT after {MAX_WAITS} answers")))
    }

    async fn ask(&self, q: &Query<'_>, key: u64) -> Result<Answer, Outage> {
        let mut last = String::from("no URL");
        for url in &self.settings.urls {
            let req = match build_request(url, q, &self.settings.headers, self.settings.pass_client_cert) {
                Ok(r) => r,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let resp = tokio::time::timeout(self.settings.timeout, self.client.request(req)).await;
            match resp {
                Ok(Ok(resp)) => match parse_response(&drained(resp, self.settings.timeout)) {
                    Ok(answer) => {
                        self.remember(key, &answer);
                        return Ok(answer);
                    }
                    Err(e) => last = format!("{}: {e}", shown(url)),
                },
                Ok(Err(e)) => last = format!("{}: {e}", shown(url)),
                Err(_) => last = format!("{}: timed out", shown(url)),
            }
            tracing::warn!(error = %last, "auth service failed; trying the next URL if any");
        }
        Err(Outage(last))
    }

    fn cached(&self, key: u64) -> Option<Answer> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(&key).filter(|(until, _)| Instant::now() < *until).map(|(_, a)| a.clone())
    }

    fn remember(&self, key: u64, answer: &Answer) {
        let ttl = match answer {
            Answer::Ok { .. } => self.settings.cache_ttl,
            // Not kept: each would refuse the client again after the service has recovered.
            Answer::Wait(_) => return,
            Answer::Fail { error_code, .. } if is_temporary(error_code.as_deref()) => return,
            Answer::Fail { .. } => self.settings.negative_cache_ttl,
        };
        if ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHE {
            let now = Instant::now();
            cache.retain(|_, (until, _)| *until > now);
            if cache.len() >= MAX_CACHE {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now() + ttl, answer.clone()));
    }
}

/// A process-local key for an attempt (the password never leaves memory in clear and is not
/// stored: only this keyed hash is).
fn cache_key(q: &Query<'_>) -> u64 {
    static KEY: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    let (k0, k1) = *KEY.get_or_init(|| {
        let mut b = [0u8; 16];
        let _ = getrandom_fill(&mut b);
        (
            u64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
            u64::from_le_bytes(b[8..].try_into().unwrap_or_default()),
        )
    });
    // Everything the request tells the service that it may answer by: the TLS state (a service
    // that refuses logins without Auth-SSL must not see its answer to an IMAPS login reused for
    // a plaintext one), the client certificate's verdict and fingerprint, HELO, the attempt.
    let tls = q.tls.as_ref().map_or(String::new(), |t| format!("{} {}", t.version, t.cipher));
    let cert = q.tls.as_ref().and_then(|t| t.client_cert.as_ref());
    let verify = cert.map_or("", |c| c.verify.as_str());
    let fingerprint = cert.and_then(|c| c.cert.as_ref()).map_or("", |c| c.fingerprint.as_str());
    let mut buf = Vec::new();
    for part in [
        q.protocol.as_str().as_bytes(),
        q.method.as_bytes(),
        q.user.as_bytes(),
        q.password,
        q.client_ip.to_string().as_bytes(),
        tls.as_bytes(),
        verify.as_bytes(),
        fingerprint.as_bytes(),
        q.helo.unwrap_or("").as_bytes(),
        &q.attempt.to_le_bytes(),
    ] {
        buf.extend_from_slice(&(part.len() as u64).to_le_bytes());
        buf.extend_from_slice(part);
    }
    SipHasher13::new_with_keys(k0, k1).hash(&buf)
}

fn getrandom_fill(buf: &mut [u8]) -> Result<(), ()> {
    rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(buf).map_err(|_| ())
}

/// nginx's `NGX_ESCAPE_MAIL_AUTH`: space, `%` and bytes below 0x20 become `%XX`; every other
/// byte, UTF-8 included, is sent as is (as HTTP obs-text). Measured against nginx 1.22 in
/// `tests/e2e/test_auth_http_nginx.py`. One difference: DEL (0x7f), which nginx sends raw, is
/// `%7F` here, since an HTTP header value may not hold it (the login would otherwise fail as
/// an auth service outage); a service that unescapes, as it must, sees the same byte.
pub fn escape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        if b <= 0x20 || b == b'%' || b == 0x7f {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

/// The request nginx would send for `q` (header order as nginx writes them).
/// With `pass_cert`, a client certificate is sent too (`Auth-SSL-Cert`).
pub fn build_request(
    url: &str,
    q: &Query<'_>,
    extra: &[(String, String)],
    pass_cert: bool,
) -> Result<Request<Empty<Bytes>>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{}: {e}", shown(url)))?;
    let host = uri.authority().map(|a| a.to_string()).ok_or_else(|| format!("{}: no host", shown(url)))?;
    let mut headers: Vec<(&str, Vec<u8>)> = vec![
        ("Host", host.into_bytes()),
        ("Auth-Method", q.method.as_bytes().to_vec()),
        ("Auth-User", escape(q.user.as_bytes())),
        ("Auth-Pass", escape(q.password)),
        ("Auth-Protocol", q.protocol.as_str().into()),
        ("Auth-Login-Attempt", q.attempt.to_string().into_bytes()),
        ("Client-IP", q.client_ip.to_string().into_bytes()),
    ];
    if q.protocol == Protocol::Smtp {
        headers.push(("Client-Host", b"[UNAVAILABLE]".to_vec()));
        headers.push(("Auth-SMTP-Helo", escape(q.helo.unwrap_or("").as_bytes())));
        headers.push(("Auth-SMTP-From", Vec::new()));
        headers.push(("Auth-SMTP-To", Vec::new()));
    }
    if let Some(tls) = &q.tls {
        headers.push(("Auth-SSL", b"on".to_vec()));
        headers.push(("Auth-SSL-Protocol", tls.version.clone().into_bytes()));
        headers.push(("Auth-SSL-Cipher", tls.cipher.clone().into_bytes()));
        // Only on listeners that ask for client certificates (nginx: auth_http_pass_client_cert).
        if let Some(client) = &tls.client_cert {
            headers.push(("Auth-SSL-Verify", client.verify.clone().into_bytes()));
            if let Some(c) = &client.cert {
                headers.push(("Auth-SSL-Subject", c.subject.clone().into_bytes()));
                headers.push(("Auth-SSL-Issuer", c.issuer.clone().into_bytes()));
                headers.push(("Auth-SSL-Serial", c.serial.clone().into_bytes()));
                headers.push(("Auth-SSL-Fingerprint", c.fingerprint.clone().into_bytes()));
                if pass_cert {
                    headers.push(("Auth-SSL-Cert", escape(c.pem().as_bytes())));
                }
            }
        }
    }
    let mut builder = Request::get(uri);
    for (k, v) in headers {
        builder = builder.header(k, HeaderValue::from_bytes(&v).map_err(|e| e.to_string())?);
    }
    for (k, v) in extra {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?;
        builder = builder.header(name, HeaderValue::from_str(v).map_err(|e| e.to_string())?);
    }
    builder.body(Empty::new()).map_err(|e| e.to_string())
}

/// Read the service's answer from its headers (the status code is ignored, as nginx does). A
/// header sent more than once is read as nginx reads it: any `Auth-Status` other than `OK` (or
/// `WAIT`) refuses, whatever else came with it, and of the other headers the last one counts.
pub fn parse_response(headers: &HeaderMap) -> Result<Answer, String> {
    // Header values may hold any octet (a service answering in its own language sends UTF-8):
    // read them as text either way, so a refusal stays a refusal and is not taken for an outage.
    let text = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).trim().to_string();
    let last = |name: &str| headers.get_all(name).iter().next_back();
    let get = |name: &str| last(name).map(text);
    let statuses: Vec<String> = headers.get_all("Auth-Status").iter().map(text).collect();
    if statuses.is_empty() {
        return Err("no Auth-Status header".into());
    }
    // An Auth-Wait that is not a number of seconds is ignored, as nginx does.
    let wait = get("Auth-Wait").and_then(|w| w.parse::<u64>().ok()).map(|n| Duration::from_secs(n).min(MAX_WAIT));
    if let Some(status) = statuses.iter().rev().find(|s| *s != "OK" && *s != "WAIT") {
        // A refusal's wait of 0 is no wait: nginx answers and closes then, as without the
        // header; the refusal stands (and counts against the client), rather than an outage.
        return Ok(Answer::Fail {
            message: client_text(status),
            wait: wait.filter(|w| !w.is_zero()),
            error_code: get("Auth-Error-Code").as_deref().map(client_text),
        });
    }
    if statuses.iter().any(|s| s == "WAIT") {
        return Ok(Answer::Wait(wait.unwrap_or(Duration::ZERO)));
    }
    let server = get("Auth-Server").filter(|s| !s.is_empty()).ok_or("Auth-Status OK without Auth-Server")?;
    let port = match get("Auth-Port").as_deref() {
        // Port 0 is no port (nginx refuses it too): every connect would be refused until the
        // login's deadline.
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or("bad Auth-Port")?),
        None => None,
    };
    let transport = match get("Auth-Transport").as_deref() {
        None => None,
        Some("plain") => Some(Transport::Plain),
        Some("tls") => Some(Transport::Tls),
        Some("starttls") => Some(Transport::StartTls),
        Some(_) => return Err("bad Auth-Transport".into()),
    };
    let client_address = match get("Auth-Client-Address").as_deref() {
        None => None,
        Some("imap-id") => Some(ClientAddress::ImapId),
        Some("xclient") => Some(ClientAddress::Xclient),
        Some("proxy-v2") => Some(ClientAddress::ProxyV2),
        Some("none") => Some(ClientAddress::None),
        Some(_) => return Err("bad Auth-Client-Address".into()),
    };
    Ok(Answer::Ok {
        server,
        port,
        // The login the backend gets: exactly as sent, or refused (never the client's own
        // name in its place).
        user: match last("Auth-User") {
            None => None,
            Some(v) => Some(std::str::from_utf8(v.as_bytes()).map_err(|_| "bad Auth-User")?.trim().to_string()),
        },
        pass: last("Auth-Pass").map(|v| v.as_bytes().to_vec()),
        transport,
        client_address,
    })
}

/// Text from the service made safe to show a client: printable ASCII, bounded.
fn client_text(s: &str) -> String {
    let t: String = s.chars().filter(|c| (' '..='~').contains(c)).take(MAX_MESSAGE).collect();
    if t.trim().is_empty() { "Authentication failed".into() } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_auth_pass() {
        let answer = Answer::Ok {
            server: "pool".into(),
            port: None,
            user: None,
            pass: Some(b"hunter2".to_vec()),
            transport: None,
            client_address: None,
        };
        let shown = format!("{answer:?}");
        assert!(!shown.contains("hunter2") && shown.contains("<redacted>"), "{shown}");
    }

    fn query(protocol: Protocol) -> Query<'static> {
        Query {
            protocol,
            method: "plain",
            user: "alice@example.org",
            password: "p w%\u{e9}\r\n".as_bytes(),
            attempt: 2,
            client_ip: "192.0.2.42".parse().unwrap(),
            helo: Some("client.example"),
            tls: Some(TlsInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_256_GCM_SHA384".into(),
                client_cert: None,
            }),
        }
    }

    /// The request as bytes on the wire, in the shape of nginx's (HTTP/1.0 there, 1.1 here).
    fn render(req: &Request<Empty<Bytes>>) -> String {
        let mut out = format!("GET {} HTTP/1.1\r\n", req.uri().path_and_query().map_or("/", |p| p.as_str()));
        for (k, v) in req.headers() {
            out.push_str(&format!("{}: {}\r\n", k.as_str(), String::from_utf8_lossy(v.as_bytes())));
        }
        out
    }

    /// A token in a service URL's query string stays out of the outage the session logs.
    #[tokio::test]
    async fn an_outage_does_not_show_the_urls_query() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        // Refused at connect, and a URL that does not parse.
        for url in [format!("http://{closed}/auth?key=S3cr3t"), "http://[::1/auth?key=S3cr3t".into()] {
            let service = AuthHttp::new(settings(vec![url.clone()])).unwrap();
            let Err(Outage(why)) = service.query(&query(Protocol::Imap)).await else { panic!("no outage") };
            assert!(!why.contains("S3cr3t") && why.contains("/auth"), "{url}: {why}");
        }
        assert_eq!(shown("https://a.example/x?key=1#f"), "https://a.example/x");
    }

    fn settings(urls: Vec<String>) -> AuthHttpSettings {
        AuthHttpSettings {
            urls,
            timeout: Duration::from_secs(2),
            headers: Vec::new(),
            ca_file: None,
            cache_ttl: Duration::ZERO,
            negative_cache_ttl: Duration::ZERO,
            pass_client_cert: false,
        }
    }

    /// The answer is taken when its headers are in: a service that is slow to end the body
    /// (headers flushed, then its own logging; a Content-Length it does not fill) does not
    /// turn every login into an outage at the timeout.
    #[tokio::test]
    async fn the_answer_is_taken_without_waiting_for_the_body() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let head = "HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 10.0.0.5\r\nAuth-Port: 143\r\n\
                        Content-Length: 10\r\n\r\nabc";
            tcp.write_all(head.as_bytes()).await.unwrap();
            // The rest of the body never comes.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let service = AuthHttp::new(settings(vec![format!("http://{addr}/auth")])).unwrap();
        let start = tokio::time::Instant::now();
        let answer = service.query(&query(Protocol::Imap)).await;
        assert!(
            matches!(answer, Ok(Answer::Ok { ref server, port: Some(143), .. }) if server == "10.0.0.5"),
            "{answer:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    }

    /// An https service with nothing to verify it against is refused when the client is made
    /// (at `check`), not found out at every login; a plain http one needs no roots.
    #[test]
    fn an_https_service_without_roots_is_refused() {
        let empty = || rustls::RootCertStore::empty();
        let e = AuthHttp::with_roots(settings(vec!["https://auth.example/".into()]), empty()).err().unwrap();
        assert!(e.contains("ca_file"), "{e}");
        assert!(AuthHttp::with_roots(settings(vec!["http://127.0.0.1:9000/".into()]), empty()).is_ok());
    }

    /// A cached answer is only reused for the same attempt: same method, credentials, address,
    /// TLS state, client certificate, HELO and attempt number (a service may answer by any).
    #[test]
    fn cache_key_covers_method_and_certificate() {
        use crate::tls::client_cert::{CertDetails, ClientCertFacts};
        let base = query(Protocol::Imap);
        let with_cert = |verify: &str, fingerprint: &str| {
            let mut q = query(Protocol::Imap);
            let cert = CertDetails {
                subject: String::new(),
                issuer: String::new(),
                serial: String::new(),
                fingerprint: fingerprint.into(),
                der: Vec::new(),
            };
            if let Some(t) = q.tls.as_mut() {
                t.client_cert = Some(ClientCertFacts { verify: verify.into(), cert: Some(cert) });
            }
            q
        };
        assert_eq!(cache_key(&base), cache_key(&query(Protocol::Imap)));
        let keys = [
            cache_key(&base),
            cache_key(&Query { method: "external", ..query(Protocol::Imap) }),
            cache_key(&with_cert("SUCCESS", "aa")),
            cache_key(&with_cert("SUCCESS", "bb")),
            cache_key(&with_cert("FAILED:self-signed certificate", "aa")),
            // Without TLS (a plaintext listener) the service may answer otherwise.
            cache_key(&Query { tls: None, ..query(Protocol::Imap) }),
            cache_key(&Query { helo: Some("other.example"), ..query(Protocol::Imap) }),
            cache_key(&Query { attempt: 1, ..query(Protocol::Imap) }),
        ];
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
    }

    #[test]
    fn request_matches_nginx() {
        // nginx 1.22 sends, for the same attempt (captured from ngx_mail_auth_http_module):
        //   Auth-Method: plain / Auth-User: alice@example.org / Auth-Pass: p%20w%25é%0D%0A /
        //   Auth-Protocol: imap / Auth-Login-Attempt: 2 / Client-IP: 192.0.2.42 / Auth-SSL: on ...
        let req = build_request(
            "http://127.0.0.1:9000/auth?x=1",
            &query(Protocol::Imap),
            &[("X-Auth-Key".into(), "s3cret".into())],
            false,
        )
        .unwrap();
        assert_eq!(
            render(&req),
            "GET /auth?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9000\r\nauth-method: plain\r\nauth-user: alice@example.org\r\nauth-pass: p%20w%25\u{e9}%0D%0A\r\nauth-protocol: imap\r\nauth-login-attempt: 2\r\nclient-ip: 192.0.2.42\r\nauth-ssl: on\r\nauth-ssl-protocol: TLSv1.3\r\nauth-ssl-cipher: TLS13_AES_256_GCM_SHA384\r\nx-auth-key: s3cret\r\n"
        );
        let req = build_request("http://auth.example/", &query(Protocol::Smtp), &[], false).unwrap();
        let r = render(&req);
        // Reliability case 52: the proxy does no reverse DNS (nginx does with `resolver`), so
        // Client-Host, like XCLIENT's NAME, is always nginx's placeholder for "no name": no
        // resolver to fail, stall or loop.
        assert!(r.contains("auth-protocol: smtp\r\nauth-login-attempt: 2\r\nclient-ip: 192.0.2.42\r\nclient-host: [UNAVAILABLE]\r\nauth-smtp-helo: client.example\r\n"), "{r}");
        // A listener with verify_client: the certificate facts follow the cipher, in nginx's order.
        use crate::tls::client_cert::{CertDetails, ClientCertFacts};
        let mut q = query(Protocol::Imap);
        let details = CertDetails {
            subject: "CN=alice,O=Example".into(),
            issuer: "CN=ca".into(),
            serial: "1F42".into(),
            fingerprint: "0a1b".into(),
            der: vec![0x30, 0x82, 0x01], // "MIIB" in base64
        };
        if let Some(t) = q.tls.as_mut() {
            t.client_cert = Some(ClientCertFacts { verify: "SUCCESS".into(), cert: Some(details) });
        }
        let r = render(&build_request("http://auth.example/", &q, &[], false).unwrap());
        assert!(r.ends_with("auth-ssl-fingerprint: 0a1b\r\n"), "{r}");
        let r = render(&build_request("http://auth.example/", &q, &[], true).unwrap());
        assert!(r.ends_with("auth-ssl-cipher: TLS13_AES_256_GCM_SHA384\r\nauth-ssl-verify: SUCCESS\r\nauth-ssl-subject: CN=alice,O=Example\r\nauth-ssl-issuer: CN=ca\r\nauth-ssl-serial: 1F42\r\nauth-ssl-fingerprint: 0a1b\r\nauth-ssl-cert: -----BEGIN%20CERTIFICATE-----%0AMIIB%0A-----END%20CERTIFICATE-----%0A\r\n"), "{r}");
        if let Some(t) = q.tls.as_mut() {
            t.client_cert = Some(ClientCertFacts { verify: "NONE".into(), cert: None });
        }
        let r = render(&build_request("http://auth.example/", &q, &[], true).unwrap());
        assert!(r.ends_with("auth-ssl-verify: NONE\r\n"), "{r}");
    }

    #[test]
    fn escaping_is_nginx_mail_auth() {
        assert_eq!(escape(b"plain"), b"plain");
        assert_eq!(escape(b"a b%c\x7f\x00\x1f\xff\"\\+"), b"a%20b%25c%7F%00%1F\xff\"\\+");
        // Every escaped value is a valid header value.
        let all: Vec<u8> = (0..=255).collect();
        assert!(HeaderValue::from_bytes(&escape(&all)).is_ok());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(&headers(&[("Auth-Status", "OK"), ("Auth-Server", "10.0.0.5"), ("Auth-Port", "143")]))
                .unwrap(),
            Answer::Ok {
                server: "10.0.0.5".into(),
                port: Some(143),
                user: None,
                pass: None,
                transport: None,
                client_address: None
            }
        );
        assert_eq!(
            parse_response(&headers(&[
                ("Auth-Status", "OK"),
                ("Auth-Server", "pool-a"),
                ("Auth-User", "u2"),
                ("Auth-Pass", "p2"),
                ("Auth-Transport", "starttls")
            ]))
            .unwrap(),
            Answer::Ok {
                server: "pool-a".into(),
                port: None,
                user: Some("u2".into()),
                pass: Some(b"p2".to_vec()),
                transport: Some(Transport::StartTls),
                client_address: None
            }
        );
        assert_eq!(
            parse_response(&headers(&[("Auth-Status", "Invalid login or password"), ("Auth-Wait", "3")])).unwrap(),
            Answer::Fail {
                message: "Invalid login or password".into(),
                wait: Some(Duration::from_secs(3)),
                error_code: None
            }
        );
        assert_eq!(
            parse_response(&headers(&[("Auth-Status", "Temporary\tproblem"), ("Auth-Error-Code", "451 4.3.0")]))
                .unwrap(),
            Answer::Fail { message: "Temporaryproblem".into(), wait: None, error_code: Some("451 4.3.0".into()) }
        );
        // Not a number of seconds: ignored (nginx), the refusal stands rather than an outage.
        // Nor is 0 a wait: nginx answers and closes, as without the header.
        for bad in ["3s", "2.5", "-1", "0"] {
            assert_eq!(
                parse_response(&headers(&[("Auth-Status", "Invalid login"), ("Auth-Wait", bad)])).unwrap(),
                Answer::Fail { message: "Invalid login".into(), wait: None, error_code: None }
            );
        }
        assert!(parse_response(&headers(&[])).is_err());
        assert!(parse_response(&headers(&[("Auth-Status", "OK")])).is_err());
        // WAIT (nginx): ask again after Auth-Wait seconds, at once without it.
        assert_eq!(
            parse_response(&headers(&[("Auth-Status", "WAIT"), ("Auth-Wait", "2")])).unwrap(),
            Answer::Wait(Duration::from_secs(2))
        );
        assert_eq!(parse_response(&headers(&[("Auth-Status", "WAIT")])).unwrap(), Answer::Wait(Duration::ZERO));
        // Headers sent twice, as nginx reads them: any refusal refuses; otherwise the last counts.
        for statuses in [["OK", "Invalid login"], ["Invalid login", "OK"], ["WAIT", "Invalid login"]] {
            let answer = parse_response(&headers(&[
                ("Auth-Status", statuses[0]),
                ("Auth-Server", "a"),
                ("Auth-Status", statuses[1]),
            ]));
            assert!(
                matches!(answer, Ok(Answer::Fail { ref message, .. }) if message == "Invalid login"),
                "{statuses:?}"
            );
        }
        assert!(matches!(
            parse_response(&headers(&[("Auth-Status", "OK"), ("Auth-Server", "a"), ("Auth-Server", "b"), ("Auth-Port", "1"), ("Auth-Port", "2")])),
            Ok(Answer::Ok { ref server, port: Some(2), .. }) if server == "b"
        ));
        assert!(
            parse_response(&headers(&[("Auth-Status", "OK"), ("Auth-Server", "x"), ("Auth-Port", "99999")])).is_err()
                && parse_response(&headers(&[("Auth-Status", "OK"), ("Auth-Server", "x"), ("Auth-Port", "0")]))
                    .is_err()
        );
    }

    /// Header values beyond visible ASCII: a refusal in UTF-8 stays a refusal (not an outage,
    /// which the throttle would not count); a user name in UTF-8 is taken as sent, one that is
    /// not UTF-8 refuses the answer rather than log in as the client's own name.
    #[test]
    fn non_ascii_answers() {
        let raw = |pairs: &[(&str, &[u8])]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_bytes(v).unwrap());
            }
            h
        };
        assert_eq!(
            parse_response(&raw(&[("Auth-Status", "Ungültiges Passwort".as_bytes())])).unwrap(),
            Answer::Fail { message: "Ungltiges Passwort".into(), wait: None, error_code: None }
        );
        let ok = |user: &[u8]| {
            parse_response(&raw(&[("Auth-Status", b"OK"), ("Auth-Server", b"10.0.0.5"), ("Auth-User", user)]))
        };
        assert!(
            matches!(ok("jörg@example.org".as_bytes()), Ok(Answer::Ok { user: Some(u), .. }) if u == "jörg@example.org")
        );
        assert_eq!(ok(b"j\xf6rg@example.org").unwrap_err(), "bad Auth-User");
    }
}
