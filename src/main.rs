//! The `portcullis` command: run the proxy, check a config, hash a password.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use portcullis::app::{self, App};
use portcullis::config::Config;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "TLS-terminating mail edge proxy for IMAP, POP3, SMTP submission")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and everything it names, then exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Read a password on standard input and print an {ARGON2ID} entry for a users file.
    HashPassword,
    /// Ask the running proxy (through its admin server) to renew an ACME certificate now.
    Renew {
        #[arg(long, short)]
        config: PathBuf,
        /// The certificate's first name (`NAME+rsa` for the RSA one of a pair); omit to renew all.
        name: Option<String>,
    },
}

fn main() -> ExitCode {
    portcullis::tls::init_crypto();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match check(&config) {
            Ok(c) => {
                println!("{}: OK ({} listeners, {} backends)", config.display(), c.listeners.len(), c.backends.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::HashPassword => match hash_password() {
            Ok(h) => {
                println!("{h}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Renew { config, name } => match renew(&config, name.as_deref()) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `app::check`, with warnings (a CRL past its next update, say) shown, not only errors.
fn check(config: &std::path::Path) -> Result<portcullis::config::Config, portcullis::app::StartError> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .try_init();
    app::check(config)
}

fn hash_password() -> anyhow::Result<String> {
    let mut input = String::new();
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        // Typed at a terminal: one line, asked for, not shown. A shell reads it, so that its
        // trap turns echo back on also when Ctrl-C ends this process.
        eprint!("Password: ");
        let script = "trap 'stty echo; exit 130' INT TERM; stty -echo; IFS= read -r p; s=$?; stty echo; \
                      printf '%s' \"$p\"; exit $s";
        let out = std::process::Command::new("sh")
            .args(["-c", script])
            .stdin(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            .output();
        match out {
            Ok(out) => {
                eprintln!();
                anyhow::ensure!(out.status.success(), "no password read");
                input = String::from_utf8(out.stdout).context("the password is not UTF-8")?;
            }
            // No shell (the distroless image): read it as typed, shown.
            Err(_) => {
                std::io::stdin().read_line(&mut input).context("reading the password")?;
            }
        }
    } else {
        std::io::stdin().read_to_string(&mut input).context("reading standard input")?;
    }
    let password = input.strip_suffix('\n').map(|p| p.strip_suffix('\r').unwrap_or(p)).unwrap_or(&input);
    anyhow::ensure!(!password.is_empty(), "empty password");
    portcullis::auth::passwd::hash_argon2id(password.as_bytes()).map_err(anyhow::Error::msg)
}

/// glibc's malloc keeps freed memory in its arenas; after a burst of connections closes, that
/// memory would stay resident. Handing it back every few seconds costs a few microseconds when
/// there is nothing to return.
fn spawn_memory_trim() {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> i32;
    }
    tokio::spawn(async {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            // SAFETY: malloc_trim only releases free memory inside glibc's allocator; it takes
            // no pointers and is thread-safe.
            let _ = tokio::task::spawn_blocking(|| unsafe { malloc_trim(0) }).await;
        }
    });
}

/// The renewal token the running proxy wrote: a small regular file (not followed if a link)
/// holding 64 hex digits, and nothing else is sent.
fn read_renew_token(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    anyhow::ensure!(f.metadata()?.is_file(), "not a regular file");
    let mut token = String::new();
    f.take(128).read_to_string(&mut token)?;
    let token = token.trim();
    anyhow::ensure!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "not a renewal token (64 hex digits)"
    );
    Ok(token.to_string())
}

fn renew(config: &std::path::Path, name: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    let cfg = Config::load(config).map_err(anyhow::Error::new)?;
    let addr = cfg.admin.context("the config has no [admin] table: the running proxy cannot be reached")?;
    let acme = cfg.acme.as_ref().context("the config has no [acme] table: no certificate to renew")?;
    let token_file = acme.state_dir.join(portcullis::tls::acme::RENEW_TOKEN_FILE);
    let token = read_renew_token(&token_file).with_context(|| {
        format!("reading the renewal token {} (run this as the user the proxy runs as, or root)", token_file.display())
    })?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .with_context(|| format!("connecting to the admin server at {addr}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "POST /acme/renew/{} HTTP/1.1\r\nHost: {addr}\r\nX-Renew-Token: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        name.unwrap_or(""),
        token
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let status = reply.get(9..12).unwrap_or("");
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
    anyhow::ensure!(
        status != "403" || !body.contains("token"),
        "the running proxy refused the renewal token in {} (was ACME restarted since it was read, or is this another config's state_dir?)",
        token_file.display()
    );
    anyhow::ensure!(status == "202", "{body}");
    Ok(body.to_string())
}

fn run(config_path: PathBuf) -> anyhow::Result<()> {
    // Logging is set up from the config before anything else can log.
    let initial = Config::load(&config_path).map_err(anyhow::Error::new)?;
    portcullis::logging::init(initial.log_format, initial.log_level.as_deref());
    drop(initial);
    match portcullis::limits::raise_descriptor_limit() {
        Some((before, after)) if after > before => {
            tracing::info!(from = before, to = after, "open-file limit raised to the hard limit");
        }
        Some(_) => {}
        None => tracing::warn!("the open-file limit could not be read or raised; it stays as it was"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        // Every handler is in place before the (possibly slow) start: a reload or renewal signal
        // sent meanwhile is acted on afterwards instead of killing the process.
        let hup = signal(SignalKind::hangup())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let app = App::start(&config_path).await?;
        portcullis::config::watch::spawn(app.clone(), hup);
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %config_path.display(), "portcullis started");
        portcullis::systemd::notify("READY=1");
        spawn_memory_trim();
        // SIGUSR1: renew every ACME certificate now.
        let usr1_app = app.clone();
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                let started = usr1_app.acme_renew(None, None).await == portcullis::app::Renewal::Started;
                tracing::info!(acme = started, "SIGUSR1: renewing ACME certificates");
            }
        });
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: no new connections; sessions get the grace period");
        // STOPPING=1 is sent by `App::shutdown`, after any reload under way has reported.
        // A second signal means "now".
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting at once");
            std::process::exit(1);
        });
        app.shutdown().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    /// `portcullis renew` (often run as root) sends the token file's contents in a header: only
    /// a regular file, not followed if a link, holding 64 hex digits.
    #[test]
    fn only_a_real_renewal_token_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("renew-token");
        let good = "0123456789abcdef".repeat(4);
        std::fs::write(&file, format!("{good}\n")).unwrap();
        assert_eq!(super::read_renew_token(&file).unwrap(), good);
        for bad in ["", "xyz", &good[..63], &format!("{good}\r\nX-Other: 1")] {
            std::fs::write(&file, bad).unwrap();
            assert!(super::read_renew_token(&file).is_err(), "{bad:?}");
        }
        let secret = dir.path().join("secret");
        std::fs::write(&secret, &good).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&secret, &file).unwrap();
        assert!(super::read_renew_token(&file).is_err(), "followed a link");
    }
}
