//! mailbench: a load generator for mail proxies. Workers loop connect → [TLS] → greeting →
//! login → logout (or a submission, or a fetch) and report sessions per second, latency
//! percentiles and throughput as one JSON object on the last line of stdout.
//!
//! Certificates are never verified: this measures proxies on loopback, not PKI. Nor, unless
//! `--verify-signature`, is the server's handshake signature: made with a key from a certificate
//! nobody checked, it proves nothing, and checking it (an ECDSA verification) was a third of
//! mailbench's CPU per login, on the cores it shares with the proxies it measures.
//!
//! `stub-backend` is the other end: a minimal IMAP and POP3 server (see `stub.rs`).

mod stub;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Mode {
    ImapLogin,
    Pop3Login,
    SmtpSubmit,
    Fetch,
    Idle,
    /// Serve `--imap-listen` and `--pop3-listen` as a minimal backend until stdin closes.
    StubBackend,
}

#[derive(Parser, Debug, Clone)]
#[command(name = "mailbench", about = "Load generator for IMAP/POP3/SMTP proxies")]
struct Args {
    #[arg(value_enum)]
    mode: Mode,
    /// host:port of the proxy (or of the backend, for the no-proxy ceiling). Required except in
    /// stub-backend mode.
    #[arg(long, default_value = "", required_unless_present = "imap_listen")]
    target: String,
    /// stub-backend mode: where to serve IMAP.
    #[arg(long, requires = "pop3_listen")]
    imap_listen: Option<String>,
    /// stub-backend mode: where to serve POP3.
    #[arg(long, requires = "imap_listen")]
    pop3_listen: Option<String>,
    /// Implicit TLS (without it: plaintext).
    #[arg(long)]
    tls: bool,
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// Concurrent sessions: login and submit workers, or idle sessions being opened at once
    /// (default 16; fetch: 1, its figure is one session's).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seconds each run lasts (login, submit and fetch modes).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 1000)]
    users: usize,
    #[arg(long, default_value = "u{}@example.test")]
    user_format: String,
    #[arg(long, default_value = "pw")]
    password: String,
    /// Idle mode: sessions to hold.
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Idle mode: seconds to hold the sessions (or until stdin closes).
    #[arg(long, default_value_t = 3600.0)]
    hold: f64,
    /// Fetch mode: the UID to fetch.
    #[arg(long, default_value_t = 1)]
    message_uid: u32,
    /// Fetch mode: the message's size in bytes; a FETCH that returns another size is an error.
    #[arg(long)]
    expect_size: Option<usize>,
    /// Fetch mode: a file holding the message; each session's first FETCH must return exactly
    /// its bytes (the later ones are checked by size, so the check does not weigh on the rate).
    #[arg(long)]
    expect_file: Option<std::path::PathBuf>,
    /// Submit mode: message size in bytes.
    #[arg(long, default_value_t = 10240)]
    message_size: usize,
    /// TLS key exchange groups to offer: rustls' defaults (X25519MLKEM768 first, which servers
    /// built on OpenSSL 3.0 cannot pick) or X25519 alone, so that every server does the same work.
    #[arg(long, value_enum, default_value_t = Kx::Default)]
    kx: Kx,
    /// Resume TLS sessions with the tickets servers send (as returning clients do). Off by
    /// default: every connection is a full handshake, the same work for every server whether or
    /// not it issues tickets.
    #[arg(long)]
    resume: bool,
    /// Check the server's TLS handshake signature, as a client that verified the certificate
    /// would have to. Off by default: the certificate itself is never verified, so the check
    /// proves nothing and only adds client CPU on cores shared with the proxy under test.
    #[arg(long)]
    verify_signature: bool,
    /// A client certificate (PEM chain) to present, for listeners that ask for one; with
    /// `--client-key`.
    #[arg(long, requires = "client_key")]
    client_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "client_cert")]
    client_key: Option<std::path::PathBuf>,
}

impl Args {
    fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(if self.mode == Mode::Fetch { 1 } else { 16 })
    }

    /// What the arguments cannot mean (a division by zero users, a negative duration).
    fn invalid(&self) -> Option<&'static str> {
        let seconds = |s: f64| s.is_finite() && s >= 0.0;
        if self.users == 0 {
            Some("--users must be at least 1")
        } else if self.concurrency == Some(0) {
            Some("--concurrency must be at least 1")
        } else if !seconds(self.duration) || self.duration == 0.0 {
            Some("--duration must be a positive number of seconds")
        } else if !seconds(self.hold) {
            Some("--hold must be a number of seconds, 0 or more")
        } else {
            None
        }
    }
}

/// How long one step (connect, handshake, reading a reply, writing) may take before the session
/// counts as an error: a server that stalls must not hold a worker, and with it the run's
/// result, forever.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// `f` within `STEP_TIMEOUT`; its error, or the timeout, described with `what`.
async fn step<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(STEP_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: nothing for {} s", STEP_TIMEOUT.as_secs())),
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Kx {
    Default,
    X25519,
}

type Conn = BufReader<Box<dyn Stream>>;

/// The cipher suite of the first TLS session, reported so runs can show every server negotiated
/// the same one.
static TLS_SUITE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Default)]
struct Tally {
    sessions: u64,
    errors: u64,
    bytes: u64,
    latencies_ms: Vec<f64>,
    first_error: Option<String>,
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    if let Some(problem) = args.invalid() {
        eprintln!("mailbench: {problem}");
        std::process::exit(2);
    }
    if args.mode == Mode::StubBackend {
        let (Some(imap), Some(pop3)) = (&args.imap_listen, &args.pop3_listen) else {
            eprintln!("mailbench: stub-backend needs --imap-listen and --pop3-listen");
            std::process::exit(2);
        };
        if let Err(e) = stub::serve(imap, pop3).await {
            eprintln!("mailbench: {e}");
            std::process::exit(2);
        }
        return;
    }
    let connector = match tls_connector(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mailbench: TLS setup: {e}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let tally = match args.mode {
        Mode::Idle => idle(&args, &connector).await,
        _ => run_workers(&args, &connector, args.concurrency()).await,
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut lat = tally.latencies_ms.clone();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| (!lat.is_empty()).then(|| lat[((lat.len() as f64 - 1.0) * p).round() as usize]);
    let per_sec = matches!(args.mode, Mode::ImapLogin | Mode::Pop3Login | Mode::SmtpSubmit)
        .then(|| tally.sessions as f64 / seconds);
    // MiB/s (2^20 bytes), as every fetch figure in docs/performance.md.
    let mb = (args.mode == Mode::Fetch).then(|| tally.bytes as f64 / 1_048_576.0 / seconds);
    if let Some(e) = &tally.first_error {
        eprintln!("first error: {e}");
    }
    let out = serde_json::json!({
        "mode": args.mode.to_possible_value().map(|v| v.get_name().to_string()),
        "target": args.target,
        "tls": args.tls,
        "concurrency": args.concurrency(),
        "sessions": tally.sessions,
        "errors": tally.errors,
        "seconds": seconds,
        "sessions_per_sec": per_sec,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "mb_per_sec": mb,
        "bytes": tally.bytes,
        "tls_suite": TLS_SUITE.get(),
    });
    println!("{out}");
}

fn tls_connector(args: &Args) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (kx, resume) = (args.kx, args.resume);
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if kx == Kx::X25519 {
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    }
    let provider = Arc::new(provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify { provider, check_signature: args.verify_signature }));
    let mut cfg = match (&args.client_cert, &args.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

async fn connect(args: &Args, connector: &tokio_rustls::TlsConnector) -> Result<Conn, String> {
    let tcp = step("connect", TcpStream::connect(&args.target)).await?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Stream> = if args.tls {
        let name = rustls::pki_types::ServerName::try_from(args.sni.clone()).map_err(|e| e.to_string())?;
        let tls = step("tls", connector.connect(name, tcp)).await?;
        if let Some(suite) = tls.get_ref().1.negotiated_cipher_suite() {
            let _ = TLS_SUITE.set(format!("{:?}", suite.suite()));
        }
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    Ok(BufReader::with_capacity(16 * 1024, stream))
}

async fn run_workers(args: &Args, connector: &tokio_rustls::TlsConnector, workers: usize) -> Tally {
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut handles = Vec::new();
    for w in 0..workers {
        let (args, connector) = (args.clone(), connector.clone());
        handles.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut n = w;
            while Instant::now() < deadline {
                let user = args.user_format.replace("{}", &(n % args.users).to_string());
                n += workers;
                let started = Instant::now();
                let r = match args.mode {
                    Mode::ImapLogin => imap_login(&args, &connector, &user).await.map(|_| 0),
                    Mode::Pop3Login => pop3_login(&args, &connector, &user).await.map(|_| 0),
                    Mode::SmtpSubmit => smtp_submit(&args, &connector, &user).await.map(|_| args.message_size as u64),
                    Mode::Fetch => fetch(&args, &connector, deadline, &mut t).await.map(|_| 0),
                    Mode::Idle | Mode::StubBackend => Ok(0),
                };
                match r {
                    Ok(bytes) => {
                        t.sessions += 1;
                        t.bytes += bytes;
                        // Fetch records one latency per FETCH itself.
                        if args.mode != Mode::Fetch {
                            t.latencies_ms.push(started.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                    Err(e) => {
                        t.errors += 1;
                        t.first_error.get_or_insert(e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            t
        }));
    }
    let mut total = Tally::default();
    for h in handles {
        match h.await {
            Ok(t) => {
                total.sessions += t.sessions;
                total.errors += t.errors;
                total.bytes += t.bytes;
                total.latencies_ms.extend(t.latencies_ms);
                if total.first_error.is_none() {
                    total.first_error = t.first_error;
                }
            }
            // A worker that panicked: what it counted is lost, so the run must not look clean.
            Err(e) => {
                total.errors += 1;
                total.first_error.get_or_insert(format!("worker: {e}"));
            }
        }
    }
    total
}

async fn line(c: &mut Conn) -> Result<String, String> {
    let mut buf = Vec::new();
    let n = step("read", c.read_until(b'\n', &mut buf)).await?;
    if n == 0 {
        return Err("connection closed".into());
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn send(c: &mut Conn, bytes: &[u8]) -> Result<(), String> {
    let s = c.get_mut();
    step("write", async {
        s.write_all(bytes).await?;
        s.flush().await
    })
    .await
}

/// Read lines until one starts with `tag `; error unless it is OK.
async fn tagged(c: &mut Conn, tag: &str) -> Result<String, String> {
    loop {
        let l = line(c).await?;
        if l.starts_with(&format!("{tag} ")) {
            return if l[tag.len() + 1..].starts_with("OK") { Ok(l) } else { Err(format!("{tag}: {}", l.trim())) };
        }
    }
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

async fn imap_open(args: &Args, connector: &tokio_rustls::TlsConnector, user: &str) -> Result<Conn, String> {
    let mut c = connect(args, connector).await?;
    let g = line(&mut c).await?;
    if !g.starts_with("* OK") {
        return Err(format!("greeting: {}", g.trim()));
    }
    send(&mut c, format!("a LOGIN {} {}\r\n", quoted(user), quoted(&args.password)).as_bytes()).await?;
    tagged(&mut c, "a").await?;
    Ok(c)
}

async fn imap_login(args: &Args, connector: &tokio_rustls::TlsConnector, user: &str) -> Result<(), String> {
    let mut c = imap_open(args, connector, user).await?;
    send(&mut c, b"b LOGOUT\r\n").await?;
    tagged(&mut c, "b").await.map(|_| ())
}

async fn pop3_login(args: &Args, connector: &tokio_rustls::TlsConnector, user: &str) -> Result<(), String> {
    let mut c = connect(args, connector).await?;
    let expect_ok = |l: String| if l.starts_with("+OK") { Ok(()) } else { Err(format!("pop3: {}", l.trim())) };
    expect_ok(line(&mut c).await?)?;
    send(&mut c, format!("USER {user}\r\n").as_bytes()).await?;
    expect_ok(line(&mut c).await?)?;
    send(&mut c, format!("PASS {}\r\n", args.password).as_bytes()).await?;
    expect_ok(line(&mut c).await?)?;
    send(&mut c, b"QUIT\r\n").await?;
    expect_ok(line(&mut c).await?)
}

/// One SMTP reply; its code.
async fn smtp_reply(c: &mut Conn) -> Result<u16, String> {
    loop {
        let l = line(c).await?;
        if l.len() < 4 {
            return Err(format!("smtp: short reply {l:?}"));
        }
        let b = l.as_bytes();
        if b[3] != b'-' {
            // From the bytes: a garbled reply may have no character boundary at 3.
            return std::str::from_utf8(&b[..3])
                .ok()
                .and_then(|code| code.parse().ok())
                .ok_or_else(|| format!("smtp: {}", l.trim()));
        }
    }
}

async fn smtp_submit(args: &Args, connector: &tokio_rustls::TlsConnector, user: &str) -> Result<(), String> {
    let mut c = connect(args, connector).await?;
    let want = |got: u16, want: u16, what: &str| if got == want { Ok(()) } else { Err(format!("{what}: {got}")) };
    want(smtp_reply(&mut c).await?, 220, "greeting")?;
    send(&mut c, b"EHLO bench.example\r\n").await?;
    want(smtp_reply(&mut c).await?, 250, "EHLO")?;
    let ir = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{}", args.password));
    send(&mut c, format!("AUTH PLAIN {ir}\r\n").as_bytes()).await?;
    want(smtp_reply(&mut c).await?, 235, "AUTH")?;
    send(&mut c, format!("MAIL FROM:<{user}>\r\nRCPT TO:<{user}>\r\nDATA\r\n").as_bytes()).await?;
    want(smtp_reply(&mut c).await?, 250, "MAIL")?;
    want(smtp_reply(&mut c).await?, 250, "RCPT")?;
    want(smtp_reply(&mut c).await?, 354, "DATA")?;
    let mut msg = format!("From: <{user}>\r\nTo: <{user}>\r\nSubject: mailbench\r\n\r\n").into_bytes();
    while msg.len() < args.message_size {
        msg.extend_from_slice(b"mailbench filler line 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ\r\n");
    }
    msg.extend_from_slice(b".\r\n");
    send(&mut c, &msg).await?;
    want(smtp_reply(&mut c).await?, 250, "end of data")?;
    send(&mut c, b"QUIT\r\n").await?;
    want(smtp_reply(&mut c).await?, 221, "QUIT")
}

/// One session fetching the message repeatedly until the deadline; bytes go into the tally.
async fn fetch(
    args: &Args,
    connector: &tokio_rustls::TlsConnector,
    deadline: Instant,
    t: &mut Tally,
) -> Result<(), String> {
    let user = args.user_format.replace("{}", "0");
    let expected = match &args.expect_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| format!("fetch: reading {}: {e}", path.display()))?),
        None => None,
    };
    let mut c = imap_open(args, connector, &user).await?;
    send(&mut c, b"s SELECT INBOX\r\n").await?;
    tagged(&mut c, "s").await?;
    let mut i = 0u64;
    while Instant::now() < deadline {
        i += 1;
        let tag = format!("f{i}");
        let started = Instant::now();
        send(&mut c, format!("{tag} UID FETCH {} BODY.PEEK[]\r\n", args.message_uid).as_bytes()).await?;
        let mut got = None;
        // The first FETCH's bytes, compared with the message as they arrive.
        let mut compare = expected.as_deref().filter(|_| i == 1).map(|m| (m, 0usize));
        loop {
            let l = line(&mut c).await?;
            if l.starts_with(&format!("{tag} ")) {
                if !l[tag.len() + 1..].starts_with("OK") {
                    return Err(format!("fetch: {}", l.trim()));
                }
                // An OK without the message (a wrong UID) moved nothing: not a fetch.
                match (got, args.expect_size) {
                    (None, _) => return Err("fetch: OK without the message's data".into()),
                    (Some(n), Some(want)) if n != want => {
                        return Err(format!("fetch: {n} bytes, the message has {want}"));
                    }
                    _ => {}
                }
                if let Some((m, at)) = compare
                    && at != m.len()
                {
                    return Err(format!("fetch: {at} bytes, the message file has {}", m.len()));
                }
                // Counted once the FETCH is known good.
                t.bytes += got.unwrap_or(0) as u64;
                break;
            }
            if let Some(n) = literal_len(&l) {
                let mut left = n;
                let mut buf = vec![0u8; 64 * 1024];
                while left > 0 {
                    let k = left.min(buf.len());
                    step("literal", c.read_exact(&mut buf[..k])).await?;
                    if let Some((m, at)) = compare.as_mut() {
                        if m.get(*at..*at + k) != Some(&buf[..k]) {
                            return Err(format!("fetch: the message's bytes differ within {}..{}", *at, *at + k));
                        }
                        *at += k;
                    }
                    left -= k;
                }
                got = Some(got.unwrap_or(0) + n);
            }
        }
        t.latencies_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    if i == 0 {
        return Err("fetch: the run ended before the first FETCH (login and SELECT took it all)".into());
    }
    send(&mut c, b"z LOGOUT\r\n").await?;
    tagged(&mut c, "z").await.map(|_| ())
}

fn literal_len(line: &str) -> Option<usize> {
    let t = line.trim_end();
    let open = t.rfind('{')?;
    t[open + 1..].strip_suffix('}')?.parse().ok()
}

/// Hold `--sessions` logged-in IMAP sessions in IDLE; print READY, wait, log out.
async fn idle(args: &Args, connector: &tokio_rustls::TlsConnector) -> Tally {
    let mut t = Tally::default();
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency()));
    let mut handles = Vec::new();
    for i in 0..args.sessions {
        let (args, connector, sem) = (args.clone(), connector.clone(), sem.clone());
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            let user = args.user_format.replace("{}", &(i % args.users).to_string());
            let mut c = imap_open(&args, &connector, &user).await?;
            send(&mut c, b"s SELECT INBOX\r\n").await?;
            tagged(&mut c, "s").await?;
            send(&mut c, b"i IDLE\r\n").await?;
            let l = line(&mut c).await?;
            if !l.starts_with('+') {
                return Err(format!("IDLE: {}", l.trim()));
            }
            Ok::<Conn, String>(c)
        }));
    }
    let mut conns = Vec::new();
    for h in handles {
        match h.await {
            Ok(Ok(c)) => {
                t.sessions += 1;
                conns.push(c);
            }
            Ok(Err(e)) => {
                t.errors += 1;
                t.first_error.get_or_insert(e);
            }
            Err(e) => {
                t.errors += 1;
                t.first_error.get_or_insert(e.to_string());
            }
        }
    }
    println!("READY {}", serde_json::json!({"up": t.sessions, "errors": t.errors}));
    let stdin_closed = async {
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    };
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(args.hold)) => {}
        _ = stdin_closed => {}
    }
    // Log every session out properly and count those that fail.
    let mut closing = Vec::new();
    for mut c in conns {
        closing.push(tokio::spawn(async move {
            send(&mut c, b"DONE\r\n").await?;
            tagged(&mut c, "i").await?;
            send(&mut c, b"z LOGOUT\r\n").await?;
            tagged(&mut c, "z").await.map(|_| ())
        }));
    }
    for h in closing {
        if !matches!(h.await, Ok(Ok(()))) {
            t.errors += 1;
        }
    }
    t
}

/// Accepts any certificate; checks the handshake signature only when `check_signature`.
#[derive(Debug)]
struct NoVerify {
    provider: Arc<rustls::crypto::CryptoProvider>,
    check_signature: bool,
}

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        if !self.check_signature {
            return Ok(rustls::client::danger::HandshakeSignatureValid::assertion());
        }
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        if !self.check_signature {
            return Ok(rustls::client::danger::HandshakeSignatureValid::assertion());
        }
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::net::TcpListener;

    /// A server whose handshake signature cannot be right: it presents one key's certificate and
    /// signs with another key.
    #[derive(Debug)]
    struct WrongKey(Arc<rustls::sign::CertifiedKey>);

    impl rustls::server::ResolvesServerCert for WrongKey {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    async fn wrong_key_server() -> std::net::SocketAddr {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let shown = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let signing = rcgen::KeyPair::generate().unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing.serialize_der()));
        let key = provider.key_provider.load_private_key(key).unwrap();
        let certified = rustls::sign::CertifiedKey::new(vec![CertificateDer::from(shown.cert.der().to_vec())], key);
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(WrongKey(Arc::new(certified))));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"* OK hi\r\n").await;
                    let _ = tls.flush().await;
                }
            }
        });
        addr
    }

    /// A plaintext IMAP server answering every FETCH with `message`.
    async fn fetch_server(message: &'static [u8]) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut c = BufReader::new(tcp);
                    let _ = c.write_all(b"* OK hi\r\n").await;
                    let mut l = String::new();
                    while c.read_line(&mut l).await.unwrap_or(0) > 0 {
                        let tag = l.split(' ').next().unwrap_or("").to_string();
                        if l.contains("FETCH") {
                            let head = format!("* 1 FETCH (UID 1 BODY[] {{{}}}\r\n", message.len());
                            let _ = c.write_all(head.as_bytes()).await;
                            let _ = c.write_all(message).await;
                            let _ = c.write_all(b")\r\n").await;
                        }
                        let _ = c.write_all(format!("{tag} OK done\r\n").as_bytes()).await;
                        l.clear();
                    }
                });
            }
        });
        addr
    }

    /// With `--expect-file`, a first FETCH whose bytes differ from the file's is an error, one
    /// that matches counts its bytes.
    #[tokio::test]
    async fn the_first_fetch_is_compared_with_the_message_file() {
        let dir = std::env::temp_dir().join(format!("mailbench-fetch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("message");
        std::fs::write(&file, b"From: a\r\n\r\nbody\r\n").unwrap();
        for (served, ok) in [(&b"From: a\r\n\r\nbody\r\n"[..], true), (b"From: a\r\n\r\nbodY\r\n", false)] {
            let target = fetch_server(served).await.to_string();
            let path = file.to_string_lossy().into_owned();
            let args = Args::parse_from([
                "mailbench",
                "fetch",
                "--target",
                &target,
                "--expect-size",
                "17",
                "--expect-file",
                &path,
                "--duration",
                "1",
            ]);
            let connector = tls_connector(&args).unwrap();
            let mut t = Tally::default();
            let deadline = Instant::now() + Duration::from_millis(200);
            let r = fetch(&args, &connector, deadline, &mut t).await;
            if ok {
                assert!(r.is_ok(), "{r:?}");
                assert!(t.bytes >= 17 && t.bytes % 17 == 0, "{}", t.bytes);
            } else {
                assert!(r.as_ref().is_err_and(|e| e.contains("differ")), "{r:?}");
                assert_eq!(t.bytes, 0, "bytes of a bad FETCH counted");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// By default the handshake signature is not checked (the certificate never is); with
    /// `--verify-signature` a bad one fails the handshake.
    #[tokio::test]
    async fn the_handshake_signature_is_checked_only_when_asked() {
        let addr = wrong_key_server().await;
        for (extra, should_connect) in [(None, true), (Some("--verify-signature"), false)] {
            let target = addr.to_string();
            let mut argv = vec!["mailbench", "imap-login", "--target", &target, "--tls"];
            argv.extend(extra);
            let args = Args::parse_from(argv);
            let connector = tls_connector(&args).unwrap();
            match connect(&args, &connector).await {
                Ok(mut c) => {
                    assert!(should_connect, "{extra:?}: connected despite a bad signature");
                    let mut line = String::new();
                    c.read_line(&mut line).await.unwrap();
                    assert_eq!(line, "* OK hi\r\n");
                }
                Err(e) => {
                    assert!(!should_connect, "{extra:?}: {e}");
                    assert!(e.contains("tls:"), "{e}");
                }
            }
        }
    }
}
