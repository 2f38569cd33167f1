//! Test support: the real proxy in-process on loopback, scripted fake IMAP backends for faults a
//! real server cannot produce, and a small line-oriented client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::app::App;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Proxy {
    pub app: Arc<App>,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    /// Start the proxy with `config` (TOML); `{dir}` in it is replaced by the temp dir.
    pub async fn start(config: &str, users: &str) -> Proxy {
        Self::start_with_files(config, users, &[]).await
    }

    /// Like `start`, with extra files (name, content) written beside the config first.
    pub async fn start_with_files(config: &str, users: &str, files: &[(&str, &str)]) -> Proxy {
        portcullis::tls::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("users"), users).unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, config.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
        let app = App::start(&path).await.unwrap_or_else(|e| panic!("start: {e}"));
        Proxy { app, dir }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.app.local_addrs(listener)[0]
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.toml")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A config with one plaintext listener (plaintext auth allowed: test network) and one backend.
pub fn plain_config(backend: SocketAddr, extra: &str) -> String {
    protocol_config("imap", backend, extra)
}

/// Like `plain_config` for any protocol.
pub fn protocol_config(protocol: &str, backend: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[limits]
auth_failure_delay = "10ms"
backend_login_timeout = "500ms"
backend_connect_timeout = "500ms"
preauth_idle_timeout = "2s"
{extra}

[[listener]]
name = "plain"
bind = "127.0.0.1:0"
protocol = "{protocol}"
tls = "none"
allow_plaintext_auth = true

[auth]
passwd_file = "users"

[[backend]]
name = "fake"
protocol = "{protocol}"
address = "{backend}"
health = {{ enabled = false }}

[routing.{protocol}]
default = "fake"
"#
    )
}

pub const USERS: &str = "alice@example.test:{PLAIN}secret\nweird@example.test:{PLAIN}a \"q\" \\b\\ c\n";

/// The proxy's EHLO reply after its own name, once it has learned a `Behaviour::Smtp` fake's
/// extensions: its own AUTH, then the fake's that pass through (never its VRFY, AUTH or XCLIENT).
pub const EHLO_WITH_FAKE_SMTP: [&str; 5] = [
    "250-AUTH PLAIN LOGIN\r\n",
    "250-PIPELINING\r\n",
    "250-SIZE 10240000\r\n",
    "250-ENHANCEDSTATUSCODES\r\n",
    "250 8BITMIME\r\n",
];

/// What a fake backend does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Behaviour {
    /// Greets, accepts any login, answers tagged commands with OK and records everything.
    Normal,
    /// Greets, then never answers anything.
    HangAfterGreeting,
    /// Logs in, then closes the connection after the first post-login command.
    DieAfterLogin,
    /// Logs in, then answers the first post-login command with `* BYE` and resets the
    /// connection (RST, no FIN): a read error for the proxy, as a crashed or TLS backend gives.
    ResetAfterLogin,
    /// Logs in, then, unprompted, says `* BYE` and closes 300 ms later (a backend shutting down
    /// under an idle client).
    ByeAfterLogin,
    /// Rejects every login with NO.
    RejectLogin,
    /// Rejects every login with NO, 2.5 s after it (Dovecot's auth_failure_delay, 2 s by
    /// default: a wrong password is answered later than a right one).
    SlowRejectLogin,
    /// Greets with PREAUTH (reliability case 13).
    Preauth,
    /// POP3: Dovecot-like, announces XCLIENT, accepts any USER/PASS or AUTH.
    Pop3,
    /// POP3: does not announce XCLIENT (proxy not trusted).
    Pop3NoXclient,
    /// POP3: announces XCLIENT, then answers it with -ERR.
    Pop3RejectXclient,
    /// POP3: announces XCLIENT, answers USER with a temporary -ERR.
    Pop3BusyUser,
    /// POP3: answers PASS with `-ERR [IN-USE]` (another session holds the mailbox).
    Pop3InUse,
    /// SMTP: Postfix-like, announces XCLIENT, accepts AUTH, takes messages.
    Smtp,
    /// SMTP: rejects XCLIENT with 550.
    SmtpRejectXclient,
    /// SMTP: Exchange-like, offers AUTH NTLM LOGIN (and the old `AUTH=LOGIN`), no PLAIN.
    SmtpAuthLoginOnly,
    /// SMTP: announces XCLIENT without its ADDR attribute.
    SmtpXclientWithoutAddr,
    /// SMTP: refuses EHLO names with an underscore (501), as Exim does by default.
    SmtpStrictHelo,
    /// SMTP: refuses an XCLIENT whose HELO= has an underscore (501), and takes any EHLO.
    SmtpStrictXclientHelo,
    /// SMTP: closes the connection after answering EHLO.
    SmtpDropAfterEhlo,
    /// SMTP: offers STARTTLS but answers it with 454.
    SmtpRefuseStartTls,
    /// SMTP: answers STARTTLS with 220 plus extra bytes in the same segment (case 10).
    SmtpStartTlsExtraBytes,
    /// SMTP: answers STARTTLS with 220, then plaintext instead of a TLS handshake (case 72).
    SmtpStartTlsNotTls,
    /// IMAP: sends an untagged line right after its login reply, in the same write (case 70).
    UnsolicitedAfterLogin,
    /// IMAP: no LITERAL+ and no SASL-IR, so a literal waits for the backend's "+".
    SyncLiterals,
    /// IMAP: answers every login `NO [UNAVAILABLE]`, as a rate limit or a per-user connection
    /// limit does.
    LoginUnavailable,
    /// SMTP: offers AUTH to the proxy but not after XCLIENT names the client's address
    /// (Postfix's smtpd_sasl_exceptions_networks).
    SmtpNoAuthForClient,
    /// SMTP: answers XCLIENT as Postfix does when its client restrictions, run again for the
    /// address XCLIENT gives, refuse it for now (reject_unknown_client_hostname, DNS failing).
    SmtpXclientClientRefused,
    /// SMTP behind a PROXY v2 header: refuses at the greeting, as Postfix's per-client
    /// connection limit does, a client address the header gives (`421 ... too many connections
    /// from ADDR`); a LOCAL header (the proxy's own probe) is served as `Smtp`.
    SmtpProxyV2ClientLimit,
}

impl Behaviour {
    fn is_pop3(self) -> bool {
        matches!(
            self,
            Behaviour::Pop3
                | Behaviour::Pop3NoXclient
                | Behaviour::Pop3RejectXclient
                | Behaviour::Pop3BusyUser
                | Behaviour::Pop3InUse
        )
    }

    fn is_smtp(self) -> bool {
        matches!(
            self,
            Behaviour::Smtp
                | Behaviour::SmtpRejectXclient
                | Behaviour::SmtpAuthLoginOnly
                | Behaviour::SmtpXclientWithoutAddr
                | Behaviour::SmtpStrictHelo
                | Behaviour::SmtpStrictXclientHelo
                | Behaviour::SmtpDropAfterEhlo
                | Behaviour::SmtpRefuseStartTls
                | Behaviour::SmtpStartTlsExtraBytes
                | Behaviour::SmtpStartTlsNotTls
                | Behaviour::SmtpNoAuthForClient
                | Behaviour::SmtpXclientClientRefused
                | Behaviour::SmtpProxyV2ClientLimit
        )
    }
}

pub struct FakeBackend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    /// Every line received, per connection.
    pub received: Arc<Mutex<Vec<Vec<String>>>>,
    /// Commands read while the next one had already arrived (the sender pipelined them).
    pub pipelined: Arc<AtomicUsize>,
    /// Connections whose session has ended here (the peer closed, or a write failed).
    pub ended: Arc<AtomicUsize>,
    /// Its accept loop (and listener): `stop` ends it, as a backend going away.
    acceptor: tokio::task::AbortHandle,
}

impl FakeBackend {
    pub async fn start(behaviour: Behaviour) -> FakeBackend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), behaviour).await
    }

    /// On a given address (a backend that comes back where it was).
    pub async fn start_on(addr: SocketAddr, behaviour: Behaviour) -> FakeBackend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let pipelined = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (acc, rec, ahead, done) = (accepted.clone(), received.clone(), pipelined.clone(), ended.clone());
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { return };
                acc.fetch_add(1, Ordering::SeqCst);
                let idx = {
                    let mut r = rec.lock().unwrap();
                    r.push(Vec::new());
                    r.len() - 1
                };
                let rec = rec.clone();
                let ahead = ahead.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    if behaviour.is_pop3() {
                        serve_pop3(s, behaviour, rec, idx, ahead).await
                    } else if behaviour.is_smtp() {
                        serve_smtp(s, behaviour, rec, idx).await
                    } else {
                        serve(s, behaviour, rec, idx, ahead).await
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        })
        .abort_handle();
        FakeBackend { addr, accepted, received, pipelined, ended, acceptor }
    }

    /// Stops listening (connections refused from now on, as in a restart); sessions already
    /// accepted go on.
    pub async fn stop(&self) {
        self.acceptor.abort();
        while !self.acceptor.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn lines(&self, conn: usize) -> Vec<String> {
        self.received.lock().unwrap().get(conn).cloned().unwrap_or_default()
    }

    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(
    s: TcpStream,
    behaviour: Behaviour,
    rec: Arc<Mutex<Vec<Vec<String>>>>,
    idx: usize,
    pipelined: Arc<AtomicUsize>,
) {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let greeting: &[u8] = match behaviour {
        Behaviour::Preauth => b"* PREAUTH [CAPABILITY IMAP4rev1] ready\r\n",
        Behaviour::SyncLiterals => b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] fake ready\r\n",
        _ => b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN] fake ready\r\n",
    };
    if w.write_all(greeting).await.is_err() {
        return;
    }
    let mut logged_in = false;
    loop {
        let mut line = Vec::new();
        match r.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // Read literal arguments inline so the recorded line is whole: a LITERAL+ one at once, a
        // synchronising one (only where this backend does without LITERAL+) after its "+".
        while let Some((n, sync)) = literal_len(&line) {
            if sync {
                if behaviour != Behaviour::SyncLiterals {
                    break;
                }
                if w.write_all(b"+ go ahead\r\n").await.is_err() {
                    return;
                }
            }
            let mut lit = vec![0u8; n];
            if r.read_exact(&mut lit).await.is_err() {
                return;
            }
            line.extend_from_slice(&lit);
            if r.read_until(b'\n', &mut line).await.is_err() {
                return;
            }
        }
        if !r.buffer().is_empty() {
            pipelined.fetch_add(1, Ordering::SeqCst);
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        rec.lock().unwrap()[idx].push(text.clone());
        if behaviour == Behaviour::HangAfterGreeting {
            continue;
        }
        let tag = text.split(' ').next().unwrap_or("*").trim().to_string();
        let upper = text.to_ascii_uppercase();
        let reply = if upper.contains(" LOGIN ") || upper.contains(" AUTHENTICATE ") {
            match behaviour {
                Behaviour::RejectLogin => format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
                Behaviour::SlowRejectLogin => {
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
                }
                Behaviour::LoginUnavailable => format!("{tag} NO [UNAVAILABLE] Try again later.\r\n"),
                Behaviour::UnsolicitedAfterLogin => {
                    logged_in = true;
                    format!("{tag} OK Logged in\r\n* 3 EXISTS\r\n")
                }
                _ => {
                    logged_in = true;
                    format!("* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")
                }
            }
        } else if logged_in && behaviour == Behaviour::DieAfterLogin {
            let _ = w.write_all(b"* BYE going away\r\n").await;
            return;
        } else if logged_in && behaviour == Behaviour::ResetAfterLogin {
            let _ = w.write_all(b"* BYE going away\r\n").await;
            // Relayed before the reset, which would otherwise discard it.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let _ = socket2::SockRef::from(w.as_ref()).set_linger(Some(std::time::Duration::ZERO));
            // No FIN (which dropping the write half would send): the close with linger 0 resets.
            w.forget();
            return;
        } else if upper.contains(" ID (") {
            format!("* ID (\"name\" \"fake\")\r\n{tag} OK ID completed.\r\n")
        } else if upper.contains(" FETCH ") {
            // A 32 MiB message: more than the sockets between here and a client hold.
            let body = vec![b'x'; 32 << 20];
            let head = format!("* 1 FETCH (BODY[] {{{}}}\r\n", body.len());
            if w.write_all(head.as_bytes()).await.is_err() || w.write_all(&body).await.is_err() {
                return;
            }
            format!(")\r\n{tag} OK done\r\n")
        } else if upper.contains(" LOGOUT") {
            let _ = w.write_all(format!("* BYE bye\r\n{tag} OK Logout completed.\r\n").as_bytes()).await;
            return;
        } else {
            format!("{tag} OK done\r\n")
        };
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
        if logged_in && behaviour == Behaviour::ByeAfterLogin {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let _ = w.write_all(b"* BYE going away\r\n").await;
            return;
        }
    }
}

/// Read one line, record it, return it (None at EOF).
async fn record_line<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    rec: &Arc<Mutex<Vec<Vec<String>>>>,
    idx: usize,
) -> Option<String> {
    let mut line = Vec::new();
    match r.read_until(b'\n', &mut line).await {
        Ok(0) | Err(_) => None,
        Ok(_) => {
            let text = String::from_utf8_lossy(&line).into_owned();
            rec.lock().unwrap()[idx].push(text.clone());
            Some(text)
        }
    }
}

async fn serve_pop3(
    s: TcpStream,
    behaviour: Behaviour,
    rec: Arc<Mutex<Vec<Vec<String>>>>,
    idx: usize,
    pipelined: Arc<AtomicUsize>,
) {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let greeting: &[u8] =
        if behaviour == Behaviour::Pop3NoXclient { b"+OK fake ready.\r\n" } else { b"+OK [XCLIENT] fake ready.\r\n" };
    if w.write_all(greeting).await.is_err() {
        return;
    }
    while let Some(line) = record_line(&mut r, &rec, idx).await {
        if !r.buffer().is_empty() {
            pipelined.fetch_add(1, Ordering::SeqCst);
        }
        let verb = line.split([' ', '\r']).next().unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "XCLIENT" if behaviour == Behaviour::Pop3RejectXclient => b"-ERR Not trusted\r\n",
            "XCLIENT" => b"+OK Updated\r\n",
            "USER" if behaviour == Behaviour::Pop3BusyUser => b"-ERR [SYS/TEMP] Busy\r\n",
            "USER" => b"+OK\r\n",
            "PASS" if behaviour == Behaviour::Pop3InUse => b"-ERR [IN-USE] Mailbox is locked by another session.\r\n",
            "PASS" | "AUTH" => b"+OK Logged in.\r\n",
            "STAT" => b"+OK 1 42\r\n",
            "QUIT" => {
                let _ = w.write_all(b"+OK Logging out.\r\n").await;
                return;
            }
            _ => b"+OK\r\n",
        };
        if w.write_all(reply).await.is_err() {
            return;
        }
    }
}

async fn serve_smtp(mut s: TcpStream, behaviour: Behaviour, rec: Arc<Mutex<Vec<Vec<String>>>>, idx: usize) {
    if behaviour == Behaviour::SmtpProxyV2ClientLimit {
        let mut header = [0u8; 16];
        if s.read_exact(&mut header).await.is_err() {
            return;
        }
        let mut addresses = vec![0u8; u16::from_be_bytes([header[14], header[15]]) as usize];
        if s.read_exact(&mut addresses).await.is_err() {
            return;
        }
        // PROXY (not LOCAL) over TCP4: the client's address first.
        if header[12] & 0x0f == 1 && header[13] == 0x11 {
            let ip = std::net::Ipv4Addr::new(addresses[0], addresses[1], addresses[2], addresses[3]);
            let refusal = format!("421 4.7.0 fake.example Error: too many connections from {ip}\r\n");
            let _ = s.write_all(refusal.as_bytes()).await;
            return;
        }
    }
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    if w.write_all(b"220 fake.example ESMTP\r\n").await.is_err() {
        return;
    }
    let mut xclient_done = false;
    while let Some(line) = record_line(&mut r, &rec, idx).await {
        let verb = line.split([' ', '\r', ':']).next().unwrap_or("").to_ascii_uppercase();
        xclient_done |= verb == "XCLIENT";
        let reply: Vec<u8> = match verb.as_str() {
            "EHLO" if behaviour == Behaviour::SmtpStrictHelo && line.contains('_') => {
                b"501 5.5.2 Syntactically invalid EHLO argument(s)\r\n".to_vec()
            }
            "EHLO" => {
                let tls = if matches!(
                    behaviour,
                    Behaviour::SmtpRefuseStartTls | Behaviour::SmtpStartTlsExtraBytes | Behaviour::SmtpStartTlsNotTls
                ) {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                };
                let xclient = if behaviour == Behaviour::SmtpXclientWithoutAddr {
                    "NAME PROTO HELO LOGIN"
                } else {
                    "NAME ADDR PORT PROTO HELO LOGIN"
                };
                let auth = if behaviour == Behaviour::SmtpAuthLoginOnly {
                    "250-AUTH NTLM LOGIN\r\n250-AUTH=LOGIN\r\n".to_string()
                } else if behaviour == Behaviour::SmtpNoAuthForClient && xclient_done {
                    format!("250-XCLIENT {xclient}\r\n")
                } else {
                    format!("250-AUTH PLAIN\r\n250-XCLIENT {xclient}\r\n")
                };
                let reply = format!(
                    "250-fake.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n{tls}{auth}250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
                );
                if behaviour == Behaviour::SmtpDropAfterEhlo {
                    let _ = w.write_all(reply.as_bytes()).await;
                    return;
                }
                reply.into_bytes()
            }
            "STARTTLS" => match behaviour {
                Behaviour::SmtpRefuseStartTls => b"454 4.7.0 TLS not available\r\n".to_vec(),
                Behaviour::SmtpStartTlsNotTls => {
                    let _ = w.write_all(b"220 2.0.0 Ready\r\n").await;
                    // Wait for the ClientHello, then answer it with plaintext.
                    let mut hello = [0u8; 1];
                    let _ = r.read(&mut hello).await;
                    let _ = w.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
                    return;
                }
                Behaviour::SmtpStartTlsExtraBytes => {
                    let _ = w.write_all(b"220 2.0.0 Ready\r\n250 injected\r\n").await;
                    // Whatever comes next (a ClientHello, a command) is recorded as it is, until
                    // the proxy closes: it should send nothing more.
                    let mut rest = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut rest)).await;
                    if !rest.is_empty() {
                        rec.lock().unwrap()[idx].push(String::from_utf8_lossy(&rest).into_owned());
                    }
                    return;
                }
                _ => b"220 2.0.0 Ready\r\n".to_vec(),
            },
            // Postfix refuses any attribute value over 255 bytes, before decoding its xtext.
            "XCLIENT"
                if line
                    .trim_end()
                    .split(' ')
                    .skip(1)
                    .any(|a| a.split_once('=').is_some_and(|(_, v)| v.len() > 255)) =>
            {
                b"501 5.5.4 Error: attribute value too long\r\n".to_vec()
            }
            "XCLIENT" => match behaviour {
                Behaviour::SmtpRejectXclient => b"550 5.7.0 Error: insufficient authorization\r\n".to_vec(),
                Behaviour::SmtpXclientClientRefused => {
                    b"450 4.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]\r\n".to_vec()
                }
                Behaviour::SmtpStrictXclientHelo if line.contains("HELO=odd_") => {
                    b"501 5.5.4 Bad HELO syntax\r\n".to_vec()
                }
                _ => b"220 fake.example ESMTP\r\n".to_vec(),
            },
            "AUTH" if behaviour == Behaviour::SmtpAuthLoginOnly => {
                if !line.eq_ignore_ascii_case("AUTH LOGIN\r\n") {
                    b"504 5.7.4 Unrecognized authentication type\r\n".to_vec()
                } else {
                    // Username:, then Password:, each answered by a base64 line.
                    for prompt in [&b"334 VXNlcm5hbWU6\r\n"[..], b"334 UGFzc3dvcmQ6\r\n"] {
                        if w.write_all(prompt).await.is_err() || record_line(&mut r, &rec, idx).await.is_none() {
                            return;
                        }
                    }
                    b"235 2.7.0 Authentication successful\r\n".to_vec()
                }
            }
            "AUTH" => b"235 2.7.0 Authentication successful\r\n".to_vec(),
            "DATA" => {
                let _ = w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await;
                loop {
                    match record_line(&mut r, &rec, idx).await {
                        Some(l) if l == ".\r\n" => break,
                        Some(_) => continue,
                        None => return,
                    }
                }
                b"250 2.0.0 Ok: queued\r\n".to_vec()
            }
            "QUIT" => {
                let _ = w.write_all(b"221 2.0.0 Bye\r\n").await;
                return;
            }
            _ => b"250 2.0.0 Ok\r\n".to_vec(),
        };
        if w.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// The literal announced at the end of a line: its length, and whether it is synchronising
/// (`{n}`, the sender waits for "+") rather than LITERAL+ (`{n+}`).
fn literal_len(line: &[u8]) -> Option<(usize, bool)> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.trim_end_matches(['\r', '\n']);
    let open = s.rfind('{')?;
    let inner = s[open + 1..].strip_suffix('}')?;
    match inner.strip_suffix('+') {
        Some(n) => Some((n.parse().ok()?, false)),
        None => Some((inner.parse().ok()?, true)),
    }
}

/// A line-oriented test client over any stream.
pub struct Client<S> {
    pub stream: BufReader<S>,
}

impl Client<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Client<TcpStream> {
        Client { stream: BufReader::new(TcpStream::connect(addr).await.unwrap()) }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(s: S) -> Client<S> {
        Client { stream: BufReader::new(s) }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.unwrap();
        self.stream.get_mut().flush().await.unwrap();
    }

    /// Sends `pieces` as separate segments, 100 ms apart (a command cut up in transit).
    pub async fn send_in_pieces(&mut self, pieces: &[&[u8]]) {
        for piece in pieces {
            self.send(piece).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One line, or "" at EOF.
    pub async fn line(&mut self) -> String {
        let mut buf = Vec::new();
        tokio::time::timeout(TIMEOUT, self.stream.read_until(b'\n', &mut buf))
            .await
            .expect("timed out reading a line")
            .unwrap_or(0);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Lines until one starts with `tag ` (inclusive).
    pub async fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.line().await;
            assert!(!l.is_empty(), "EOF while waiting for {tag}; got {out:?}");
            let done = l.starts_with(&format!("{tag} "));
            out.push(l);
            if done {
                return out;
            }
        }
    }

    /// The lines of one SMTP reply, multi-line or not.
    pub async fn smtp_reply(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.line().await;
            assert!(l.len() >= 4, "short reply {l:?} after {out:?}");
            let last = l.as_bytes()[3] == b' ';
            out.push(l);
            if last {
                return out;
            }
        }
    }

    /// True when the peer closed (EOF) within the timeout, draining any final lines.
    pub async fn closed(&mut self) -> bool {
        loop {
            let l = self.line().await;
            if l.is_empty() {
                return true;
            }
        }
    }
}

pub fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A SIGHUP stream for `config::watch::spawn`.
pub fn hangup() -> tokio::signal::unix::Signal {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap()
}

/// A free port outside the kernel's ephemeral range (32768-60999 on Linux), so an outgoing
/// connection of a parallel test cannot take it between now and the bind; free on every
/// address (what a wildcard listener needs).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 500) as u16 * 20;
    loop {
        let port = start + NEXT.fetch_add(1, Ordering::Relaxed) % 10_000;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

/// A one-connection backend (any protocol) that greets with `greeting`, answers the first command it
/// reads (the proxy's login) with `reply`, then waits; returns its address and what it read.
pub async fn scripted_backend(
    greeting: &'static [u8],
    reply: &'static [u8],
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else { return };
        // The proxy may give up on a greeting before it is all written (one over-long line).
        if s.write_all(greeting).await.is_err() {
            return;
        }
        let mut buf = [0u8; 512];
        let mut replied = false;
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
            s2.lock().unwrap().extend_from_slice(&buf[..n]);
            if !replied {
                let _ = s.write_all(reply).await;
                replied = true;
            }
        }
    });
    (addr, seen)
}
