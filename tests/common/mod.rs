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
protocol = "imap"
tls = "none"
allow_plaintext_auth = true

[auth]
passwd_file = "users"

[[backend]]
name = "fake"
address = "{backend}"

[routing]
default = "fake"
"#
    )
}

pub const USERS: &str = "alice@example.test:{PLAIN}secret\nweird@example.test:{PLAIN}a \"q\" \\b\\ c\n";

/// What a fake backend does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Behaviour {
    /// Greets, accepts any login, answers tagged commands with OK and records everything.
    Normal,
    /// Greets, then never answers anything.
    HangAfterGreeting,
    /// Logs in, then closes the connection after the first post-login command.
    DieAfterLogin,
    /// Rejects every login with NO.
    RejectLogin,
    /// Greets with PREAUTH (reliability case 13).
    Preauth,
}

pub struct FakeBackend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    /// Every line received, per connection.
    pub received: Arc<Mutex<Vec<Vec<String>>>>,
}

impl FakeBackend {
    pub async fn start(behaviour: Behaviour) -> FakeBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (acc, rec) = (accepted.clone(), received.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { return };
                acc.fetch_add(1, Ordering::SeqCst);
                let idx = {
                    let mut r = rec.lock().unwrap();
                    r.push(Vec::new());
                    r.len() - 1
                };
                let rec = rec.clone();
                tokio::spawn(async move { serve(s, behaviour, rec, idx).await });
            }
        });
        FakeBackend { addr, accepted, received }
    }

    pub fn lines(&self, conn: usize) -> Vec<String> {
        self.received.lock().unwrap().get(conn).cloned().unwrap_or_default()
    }

    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(s: TcpStream, behaviour: Behaviour, rec: Arc<Mutex<Vec<Vec<String>>>>, idx: usize) {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let greeting: &[u8] = match behaviour {
        Behaviour::Preauth => b"* PREAUTH [CAPABILITY IMAP4rev1] ready\r\n",
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
        // Read a LITERAL+ argument inline so the recorded line is whole.
        while let Some(n) = literal_plus_len(&line) {
            let mut lit = vec![0u8; n];
            if r.read_exact(&mut lit).await.is_err() {
                return;
            }
            line.extend_from_slice(&lit);
            if r.read_until(b'\n', &mut line).await.is_err() {
                return;
            }
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
                _ => {
                    logged_in = true;
                    format!("* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")
                }
            }
        } else if logged_in && behaviour == Behaviour::DieAfterLogin {
            let _ = w.write_all(b"* BYE going away\r\n").await;
            return;
        } else if upper.contains(" LOGOUT") {
            let _ = w.write_all(format!("* BYE bye\r\n{tag} OK Logout completed.\r\n").as_bytes()).await;
            return;
        } else {
            format!("{tag} OK done\r\n")
        };
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn literal_plus_len(line: &[u8]) -> Option<usize> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.trim_end_matches(['\r', '\n']);
    let open = s.rfind('{')?;
    let inner = s[open + 1..].strip_suffix("+}")?;
    inner.parse().ok()
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
