//! The running proxy: the swapped runtime snapshot, listener sockets and their accept loops,
//! reload, and shutdown.
//!
//! Reload is a diff, not a restart: the new config is loaded and validated, certificates are
//! prepared, new sockets are bound (a failure here rejects the whole reload), and only then is
//! anything swapped. Sockets whose address stays are reused, so an unchanged listener never stops
//! accepting. A session keeps the snapshot it was accepted under for its listener, TLS and front
//! end; its login takes the running one (`SessionCtx::running`).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::http::AuthHttp;
use crate::config::{AuthSource, Config, ConfigError, Limits, Protocol, TlsMode, Transport, VerifyClient};
use crate::health::{self, HealthTable};
use crate::protocol::smtp::ehlo::EhloCache;
use crate::session::{self, SessionCtx};
use crate::tls::TlsShared;
use crate::tls::certs::{CertError, CertStore};
use crate::tls::client_cert::ClientAuth;

/// One immutable snapshot: config plus everything derived from it that must change with it.
pub struct Runtime {
    pub config: Config,
    /// Server TLS config per protocol (all listeners of a protocol share ALPN and certificates).
    pub server_tls: HashMap<Protocol, Arc<ServerConfig>>,
    /// Listeners that ask for client certificates have their own config and policy, by name.
    pub client_auth: HashMap<String, (Arc<ServerConfig>, Arc<ClientAuth>)>,
    /// Client TLS config per backend name, for TLS and STARTTLS backends.
    pub backend_tls: HashMap<String, Arc<ClientConfig>>,
    /// For backends named by the auth service that are not in the config (system roots).
    pub default_backend_tls: Option<Arc<ClientConfig>>,
    /// The auth service client, when `auth.source = "http"`.
    pub auth_http: Option<Arc<AuthHttp>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("certificate: {0}")]
    Cert(#[from] CertError),
    #[error("ACME: {0}")]
    Acme(String),
    #[error("cannot bind {addr} for listener {listener:?}: {source}")]
    Bind { listener: String, addr: SocketAddr, source: std::io::Error },
}

impl StartError {
    /// A failure that may clear without any file changing: an address another process holds
    /// (the operating system's "address in use"; not this proxy's own socket on the port, nor a
    /// wildcard change, which take a restart).
    pub fn is_transient(&self) -> bool {
        matches!(self, StartError::Bind { source, .. }
            if source.kind() == std::io::ErrorKind::AddrInUse && source.raw_os_error().is_some())
    }
}

/// Result of a reload attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    Applied,
    Unchanged,
    /// Everything but ACME was applied: the ACME manager could not start with the new settings
    /// (the previous ones, if any, go on). Counted as a failed reload, so it is seen.
    AcmeFailed(String),
    /// Everything but some certificate files was applied: they no longer load (a renewal that
    /// wrote garbage, a key that does not match), and their previous certificates are served.
    /// Counted as a failed reload, so it is seen.
    CertificatesKept(String),
}

pub struct App {
    config_path: PathBuf,
    runtime: Arc<ArcSwap<Runtime>>,
    tls: TlsShared,
    /// Bound sockets; kept across reloads while some listener uses their address.
    sockets: Mutex<HashMap<SocketKey, Arc<TcpListener>>>,
    /// Accept loops by (listener name, configured address).
    accepting: Mutex<HashMap<(String, SocketAddr), CancellationToken>>,
    /// Serialises reloads (file watcher and SIGHUP may fire together).
    reload_lock: tokio::sync::Mutex<u64>,
    /// Every session task, so shutdown can wait for them.
    sessions: TaskTracker,
    /// Cancelled once at shutdown: stops accept loops and pre-auth sessions.
    shutdown: CancellationToken,
    next_session: AtomicU64,
    /// The longest `shutdown_grace` any session was accepted with, in milliseconds: each keeps
    /// the grace of its config, so shutdown waits for the longest (a reload may have lowered it).
    longest_grace_ms: AtomicU64,
    started: u64,
    /// SMTP extensions each backend announces (outside the snapshot: learned, not configured).
    ehlo: Arc<EhloCache>,
    /// Backend health and session counts (observed, so beside the snapshot too).
    health: Arc<HealthTable>,
    /// Stops the current generation of health checks (replaced on reload).
    checks: Mutex<CancellationToken>,
    /// Login failure counters, shared by every listener and protocol.
    throttle: Arc<crate::limits::Throttle>,
    /// Connection and per-user session counts for the caps.
    connections: Arc<crate::limits::Connections>,
    /// The ACME manager, if configured.
    acme: tokio::sync::Mutex<Option<crate::tls::acme::AcmeHandle>>,
    /// The admin server's configured address, its stop token and its bound address, if running.
    admin: Mutex<Option<(SocketAddr, CancellationToken, Option<SocketAddr>)>>,
}

/// Identifies a bound socket. A fixed address is shared by whichever listener names it (so a
/// renamed listener keeps its socket); port 0 means "any free port" and belongs to its listener.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SocketKey {
    addr: SocketAddr,
    owner: Option<String>,
}

impl SocketKey {
    fn new(listener: &str, addr: SocketAddr) -> SocketKey {
        SocketKey { addr, owner: (addr.port() == 0).then(|| listener.to_string()) }
    }
}

/// Build the runtime pieces for a config (also used by `portcullis check`).
pub fn build_runtime(config: Config, tls: &TlsShared) -> Result<Runtime, ConfigError> {
    let mut server_tls = HashMap::new();
    let mut client_auth = HashMap::new();
    let at = |field: &str, message| ConfigError {
        file: config.path.clone(),
        position: crate::config::locate(&config.path, field),
        field: field.into(),
        message,
    };
    let suites_error = |message| at("tls.cipher_suites", message);
    for l in &config.listeners {
        if l.tls == TlsMode::None {
            continue;
        }
        if l.client_cert.mode != VerifyClient::Off {
            let policy = ClientAuth::new(&l.client_cert).map_err(|message| {
                crate::config::entry_error(&config.path, "listener", &l.name, "client_ca_file", message)
            })?;
            if policy.crl_next_update().is_some_and(|t| t < unix_now()) {
                tracing::warn!(
                    listener = %l.name,
                    "client_crl_file is past its next update: certificates that need it are refused until a new CRL is installed"
                );
            }
            let cfg = tls.server_config(l.protocol, &config.tls, Some(&policy)).map_err(suites_error)?;
            client_auth.insert(l.name.clone(), (cfg, Arc::new(policy)));
        } else if let std::collections::hash_map::Entry::Vacant(slot) = server_tls.entry(l.protocol) {
            slot.insert(tls.server_config(l.protocol, &config.tls, None).map_err(suites_error)?);
        }
    }
    // The system's CA bundle is read once for all backends, and only if one needs it.
    let system = std::cell::OnceCell::new();
    let system_roots = || system.get_or_init(crate::tls::system_roots).clone();
    let mut backend_tls = HashMap::new();
    for b in config.backends.values() {
        if b.transport != Transport::Plain {
            // Its tls_ca_file was read at parse time: what fails here is the system's roots.
            let key = if b.tls_ca_file.is_some() { "tls_ca_file" } else { "transport" };
            let cfg = crate::tls::client_config(b, &system_roots)
                .map_err(|message| crate::config::entry_error(&config.path, "backend", &b.name, key, message))?;
            backend_tls.insert(b.name.clone(), cfg);
        }
    }
    let (auth_http, default_backend_tls) = match &config.auth {
        AuthSource::Http(settings) => {
            let client = AuthHttp::new(settings.clone()).map_err(|message| at("auth.http.ca_file", message))?;
            let template = crate::config::Backend::adhoc(Protocol::Imap, "localhost", 143);
            (Some(Arc::new(client)), crate::tls::client_config(&template, &system_roots).ok())
        }
        _ => (None, None),
    };
    Ok(Runtime { config, server_tls, client_auth, backend_tls, default_backend_tls, auth_http })
}

/// Warn when the configured connection cap is above what this process's open-file limit
/// allows. Only the running server calls it: `portcullis check` runs under the operator's
/// shell, whose limit says nothing about the server's.
fn warn_descriptor_cap(config: &Config) {
    if let Some(cap) = crate::limits::descriptor_cap()
        && config.limits.max_connections > cap
    {
        tracing::warn!(
            max_connections = config.limits.max_connections,
            sessions_the_descriptor_limit_allows = cap,
            "max_connections is above what the open-file limit allows (two descriptors a session): raise LimitNOFILE or lower max_connections"
        );
    }
}

/// A certificate file that cannot be used, as a config error at the line that names it.
fn cert_error(config: &Config, e: crate::tls::certs::CertError) -> StartError {
    match e {
        crate::tls::certs::CertError::File { path, message, field, position } => StartError::Config(ConfigError {
            file: config.path.clone(),
            position,
            field,
            message: format!("{}: {message}", path.display()),
        }),
        e => StartError::Cert(e),
    }
}

/// Validate a config file fully (parse, referenced files, certificates) without binding.
pub fn check(path: &Path) -> Result<Config, StartError> {
    let config = Config::load(path)?;
    if let Some(acme) = &config.acme {
        // What `run` would find only when ACME starts (a read-only file system under the
        // unit's ProtectSystem=strict, a directory the service's user may not write), at its line.
        writable_dir(&acme.state_dir).map_err(|message| ConfigError {
            file: config.path.clone(),
            position: crate::config::locate(&config.path, "acme.state_dir"),
            field: "acme.state_dir".into(),
            message,
        })?;
    }
    let store = CertStore::load(&config.tls).map_err(|e| cert_error(&config, e))?;
    let rt = build_runtime(config, &TlsShared::new(Arc::new(store)))?;
    Ok(rt.config)
}

/// Whether ACME could make and write `dir`: it, or the nearest directory above it that exists
/// (nothing is created here), takes a file. A read-only file system (the unit's
/// ProtectSystem=strict outside its StateDirectory) or a file in the way is an error; a
/// permission refused only warns, as `check` may run as another user than the service.
fn writable_dir(dir: &Path) -> Result<(), String> {
    let mut at = dir;
    while !at.exists() {
        at = match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
    }
    if !at.is_dir() {
        return Err(format!("{}: {} is not a directory", dir.display(), at.display()));
    }
    let probe = at.join(format!(".portcullis-check-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        // Under systemd (ExecStartPre) `check` runs as the service's user: there it is an error.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && std::env::var_os("INVOCATION_ID").is_none() => {
            tracing::warn!(dir = %dir.display(), "acme.state_dir: this user cannot write there; the service's user must be able to");
            Ok(())
        }
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

impl App {
    /// Load the config, bind every listener and start accepting.
    pub async fn start(config_path: &Path) -> Result<Arc<App>, StartError> {
        // Absolute once, against the directory the proxy started in: reloads then read the
        // config (and the files it names relative to itself) by path, and so follow a config
        // directory replaced by a deploy, instead of staying in the old one through the
        // process's working directory.
        let absolute = std::path::absolute(config_path);
        let config_path = absolute.as_deref().unwrap_or(config_path);
        let config = Config::load(config_path)?;
        let fingerprint = fingerprint(&config.watched_files());
        let certs = Arc::new(CertStore::load(&config.tls).map_err(|e| cert_error(&config, e))?);
        let tls = TlsShared::new(certs);
        let runtime = build_runtime(config, &tls)?;
        warn_descriptor_cap(&runtime.config);
        let sockets = bind_all(&runtime.config, &HashMap::new(), &[]).await?;
        let admin = match runtime.config.admin {
            Some(addr) => Some((addr, bind_admin(addr).await?)),
            None => None,
        };
        let started =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let app = Arc::new(App {
            config_path: config_path.to_path_buf(),
            runtime: Arc::new(ArcSwap::from_pointee(runtime)),
            tls,
            sockets: Mutex::new(HashMap::new()),
            accepting: Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(fingerprint),
            sessions: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            next_session: AtomicU64::new(1),
            longest_grace_ms: AtomicU64::new(0),
            started,
            ehlo: Arc::new(EhloCache::default()),
            health: Arc::new(HealthTable::default()),
            checks: Mutex::new(CancellationToken::new()),
            admin: Mutex::new(None),
            acme: tokio::sync::Mutex::new(None),
            throttle: Arc::default(),
            connections: Arc::default(),
        });
        app.spawn_throttle_pruning();
        app.apply_acme().await?;
        app.apply_sockets(sockets);
        app.apply_admin(admin);
        app.restart_checks();
        app.record_certificates();
        alerted_counters_at_zero(&app.runtime.load());
        let m = crate::metrics::metrics();
        m.config_last_reload_success.set(unix_now());
        m.config_last_reload_successful.set(1);
        Ok(app)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// The actual local addresses of a listener (useful when the config binds port 0).
    pub fn local_addrs(&self, listener: &str) -> Vec<SocketAddr> {
        let rt = self.runtime.load();
        let Some(lc) = rt.config.listener(listener) else { return Vec::new() };
        let sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        lc.bind
            .iter()
            .filter_map(|a| sockets.get(&SocketKey::new(listener, *a)))
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Re-read the config and apply it. `force` skips the unchanged-files check (SIGHUP).
    /// Counted in `portcullis_config_reloads_total` and reported to systemd.
    pub async fn reload(self: &Arc<Self>, force: bool) -> Result<Reloaded, StartError> {
        // Under the reload lock, which shutdown takes before it cancels and tells systemd
        // STOPPING=1: a reload either reports RELOADING/READY before that, or does nothing.
        let mut last = self.reload_lock.lock().await;
        if self.shutdown.is_cancelled() {
            return Ok(Reloaded::Unchanged);
        }
        // systemd hears of a reload only when one happens: SIGHUP (systemctl reload waits for
        // it), or files whose contents changed. A file event that changes nothing (a touch, an
        // editor's save of the same text) does not flip the unit to "reloading".
        let mut reloading = force;
        if reloading {
            crate::systemd::reloading();
        }
        let result = self.reload_inner(force, &mut last, &mut reloading).await;
        if reloading {
            crate::systemd::notify("READY=1");
        }
        let m = crate::metrics::metrics();
        match &result {
            Ok(Reloaded::Applied) => {
                m.config_reloads.with_label_values(&["success"]).inc();
                m.config_last_reload_success.set(unix_now());
                m.config_last_reload_successful.set(1);
            }
            // The files are what runs (a broken config put back as it was, say).
            Ok(Reloaded::Unchanged) => m.config_last_reload_successful.set(1),
            Ok(Reloaded::AcmeFailed(_) | Reloaded::CertificatesKept(_)) | Err(_) => {
                m.config_reloads.with_label_values(&["error"]).inc();
                m.config_last_reload_successful.set(0);
            }
        }
        result
    }

    /// `reloading`: whether systemd has been told RELOADING=1; set here once the files turn out
    /// to have changed, so the caller follows with READY=1.
    async fn reload_inner(
        self: &Arc<Self>,
        force: bool,
        last: &mut u64,
        reloading: &mut bool,
    ) -> Result<Reloaded, StartError> {
        // Every file the running config was read from, before this load reads them again: one
        // that changes while it is being read (a save in progress, a users file rewritten by a
        // provisioning tool) leaves the reload unsettled (below).
        let before_files = self.runtime.load().config.watched_files();
        // Reading and parsing (a users file of many thousands of lines) and hashing every file
        // block: off the runtime's worker threads, which serve the sessions meanwhile. (The
        // certificate and CA files are read later, on them: a few small files.)
        let path = self.config_path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let before = fingerprint(&before_files);
            let config = Config::load(&path);
            let files = match &config {
                Ok(config) => config.watched_files(),
                Err(_) => vec![path.clone()],
            };
            let fp = fingerprint(&files);
            (before_files, before, config, files, fp)
        });
        let Ok((before_files, before, config, files, fp)) = read.await else {
            // Only if the reader panicked (or the runtime is going away).
            return Err(StartError::Config(ConfigError {
                file: self.config_path.clone(),
                position: None,
                field: String::new(),
                message: "reading the configuration failed".into(),
            }));
        };
        if !force && fp == *last {
            return Ok(Reloaded::Unchanged);
        }
        if !std::mem::replace(reloading, true) {
            crate::systemd::reloading();
        }
        let config = config?;
        if crate::logging::differs_from_start(config.log_format, config.log_level.as_deref()) {
            tracing::warn!("[log] format and level are read at start only: restart to apply the change");
        }
        let maps = self.tls.certs.prepare(&config.tls).map_err(|e| cert_error(&config, e))?;
        let runtime = build_runtime(config, &self.tls)?;
        warn_descriptor_cap(&runtime.config);
        let current = self.sockets.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let running_admin = self.admin.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(a, _, _)| *a);
        // The running ACME responder's port, which it gives up only after the reload too (the
        // one running: a reload whose ACME could not start kept the one before).
        let running_responder = self.acme.lock().await.as_ref().and_then(|h| h.settings.challenge.responder_addr());
        let others: Vec<SocketAddr> = running_admin.into_iter().chain(running_responder).collect();
        let sockets = bind_all(&runtime.config, &current, &others).await?;
        let admin = match runtime.config.admin {
            Some(addr) if Some(addr) != running_admin => {
                let bound = bind_admin(addr).await.map_err(|e| match e {
                    StartError::Bind { listener, addr, source } => {
                        let ours = current.keys().map(|k| k.addr).chain(running_admin).chain(running_responder);
                        StartError::Bind { listener, addr, source: held_by_us(source, addr, ours) }
                    }
                    e => e,
                })?;
                Some((addr, bound))
            }
            _ => None,
        };
        // Nothing can refuse the reload from here: the sockets it keeps take its keepalive for
        // the connections they accept from now on.
        for (key, s) in sockets.iter().filter(|(key, _)| current.contains_key(*key)) {
            if let Err(e) = accepted_options(&socket2::SockRef::from(&**s), &runtime.config.limits) {
                tracing::warn!(addr = %key.addr, error = %e, "cannot set the TCP options of a listening socket");
            }
        }
        let stop_admin = runtime.config.admin.is_none();
        let kept = maps.kept().join("; ");
        self.tls.certs.install(maps);
        // Before the new config runs, so its first sessions count on the entries it will keep.
        self.health.sync(runtime.config.backends.values().map(|b| &**b));
        self.runtime.store(Arc::new(runtime));
        alerted_counters_at_zero(&self.runtime.load());
        self.apply_sockets(sockets);
        if admin.is_some() || stop_admin {
            self.apply_admin(admin);
        }
        self.restart_checks();
        let acme = self.apply_acme().await;
        // After ACME has dropped the certificates no longer configured, so their expiry series
        // go with them (else they would page about certificates nobody serves).
        self.record_certificates();
        if let Err(e) = acme {
            // The rest of the config runs; the fingerprint is not kept, so the next reload
            // (a file event, SIGHUP) tries ACME again instead of finding nothing changed.
            tracing::error!(error = %e, "ACME could not be (re)started; certificates stay as they are");
            *last = 0;
            return Ok(Reloaded::AcmeFailed(e.to_string()));
        }
        // A file that changed while it was being read (a save in progress) may now run
        // half-written or old: then the fingerprint is not kept, and the save's own events (or
        // the next reload) load it again instead of finding it "unchanged".
        let after = {
            let files = files.clone();
            // 0 (unsettled) if the hashing could not run.
            tokio::task::spawn_blocking(move || fingerprint(&files)).await.unwrap_or(0)
        };
        *last = if settled(&before_files, before, &files, fp, after) { fp } else { 0 };
        if !kept.is_empty() {
            // Not kept either: the next event or SIGHUP reads the files again, and only one
            // that loads them all counts as a success.
            *last = 0;
            return Ok(Reloaded::CertificatesKept(kept));
        }
        Ok(Reloaded::Applied)
    }

    /// Start, restart or stop the ACME manager to match the running config.
    async fn apply_acme(self: &Arc<Self>) -> Result<(), StartError> {
        let wanted = self.runtime.load().config.acme.clone();
        // Certificates no longer configured are not served any more.
        let labels: Vec<&str> = wanted.iter().flat_map(|a| a.certificates.iter()).map(|c| c.label.as_str()).collect();
        let mut slot = self.acme.lock().await;
        let running = slot.as_ref().map(|h| (&h.settings, h.ca_file_digest));
        if running == wanted.as_ref().map(|w| (w, crate::tls::acme::ca_file_digest(w))) {
            self.tls.certs.retain_acme(&labels);
            return Ok(());
        }
        let previous = slot.as_ref().map(|h| h.settings.clone());
        if let Some(old) = slot.take() {
            // Waits until the old responder has let go of its port, which the new one may bind,
            // and until the old tasks have ended, so none installs a certificate after this.
            old.stop().await;
            // The new tasks set their own (from what each stored of its failures).
            crate::metrics::metrics().acme_failures.reset();
        }
        self.tls.certs.retain_acme(&labels);
        if let Some(settings) = wanted {
            match crate::tls::acme::start(settings, self.tls.certs.clone(), self.shutdown.child_token()).await {
                Ok(handle) => *slot = Some(handle),
                Err(e) => {
                    // Renewal must not stop because the new settings cannot start (a responder
                    // port taken, say): the previous settings go on until a reload fixes it.
                    if let Some(previous) = previous
                        && let Ok(handle) =
                            crate::tls::acme::start(previous, self.tls.certs.clone(), self.shutdown.child_token()).await
                    {
                        tracing::warn!("ACME: the previous ACME settings stay in force");
                        *slot = Some(handle);
                    }
                    return Err(StartError::Acme(e));
                }
            }
        }
        Ok(())
    }

    /// What the running ACME client was started with of `acme.ca_file` (its digest), if ACME runs.
    pub async fn acme_ca_file_digest(&self) -> Option<u64> {
        self.acme.lock().await.as_ref().map(|h| h.ca_file_digest)
    }

    /// Renew an ACME certificate now (`None`: all of them). `token`: what a request to the admin
    /// server carried, which must be this run's renewal token; None for a signal (whoever can
    /// send one is the proxy's user already).
    pub async fn acme_renew(&self, label: Option<&str>, token: Option<&[u8]>) -> Renewal {
        let slot = self.acme.lock().await;
        let Some(h) = slot.as_ref() else { return Renewal::Unknown };
        if token.is_some_and(|t| !h.renew_token_is(t)) {
            return Renewal::Refused;
        }
        match label {
            Some(l) if h.renew(l) => Renewal::Started,
            Some(_) => Renewal::Unknown,
            None => {
                h.renew_all();
                Renewal::Started
            }
        }
    }

    /// Run the admin server on `bound` (stopping a previous one), or stop it when `None`.
    fn apply_admin(self: &Arc<Self>, bound: Option<(SocketAddr, TcpListener)>) {
        let mut slot = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, old, _)) = slot.take() {
            old.cancel();
        }
        if let Some((addr, listener)) = bound {
            let token = self.shutdown.child_token();
            let local = listener.local_addr().ok();
            tracing::info!(addr = %local.unwrap_or(addr), "admin server listening");
            tokio::spawn(crate::admin::serve(listener, Arc::downgrade(self), token.clone()));
            *slot = Some((addr, token, local));
        }
    }

    /// The admin server's bound address (tests bind port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|(_, _, local)| *local)
    }

    /// Whether the generated self-signed certificate is in its last 30 days (see
    /// `CertStore::self_signed_ending`).
    pub fn self_signed_ending(&self) -> bool {
        self.tls.certs.self_signed_ending()
    }

    fn record_certificates(&self) {
        // Reset and set again like the backend gauges: not while a scrape renders.
        let _one = GAUGES.lock().unwrap_or_else(|e| e.into_inner());
        let m = crate::metrics::metrics();
        self.tls.certs.record_expiries();
        m.client_crl_next_update.reset();
        for (listener, (_, policy)) in &self.runtime.load().client_auth {
            if let Some(t) = policy.crl_next_update() {
                m.client_crl_next_update.with_label_values(&[listener]).set(t as f64);
            }
        }
    }

    /// The metrics page: gauges refreshed, then everything rendered, one scrape at a time. The
    /// refresh resets the backend and pool gauges before setting them again, and a second
    /// scrape (an HA pair of Prometheus servers) rendering in between would miss those series.
    pub fn render_metrics(&self) -> (String, Vec<u8>) {
        let _one = GAUGES.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh_gauges();
        crate::metrics::metrics().render()
    }

    /// Bring the backend gauges up to date (called at every scrape).
    pub fn refresh_gauges(&self) {
        let m = crate::metrics::metrics();
        let rt = self.runtime.load();
        m.backend_up.reset();
        m.backend_draining.reset();
        m.backend_sessions.reset();
        m.pool_backends_up.reset();
        for b in rt.config.backends.values() {
            let name = b.name.as_str();
            // A disabled backend is switched off on purpose: not exported as up or down.
            if b.state != crate::config::BackendState::Disabled {
                m.backend_up.with_label_values(&[name]).set(i64::from(self.health.is_up(name)));
            }
            m.backend_draining
                .with_label_values(&[name])
                .set(i64::from(b.state == crate::config::BackendState::Draining));
            m.backend_sessions.with_label_values(&[name]).set(self.health.sessions(name) as i64);
        }
        // Sessions on backends the auth service named by address, under the bounded label; on
        // backends a reload removed, under their names until those sessions end.
        let (dynamic, removed) = self.health.other_sessions(&|n| rt.config.backends.contains_key(n));
        if dynamic > 0 {
            m.backend_sessions.with_label_values(&["dynamic"]).set(dynamic as i64);
        }
        for (name, n) in removed {
            m.backend_sessions.with_label_values(&[&name]).set(n as i64);
        }
        for (pool, protocol, up) in self.pools_up(&rt.config) {
            m.pool_backends_up.with_label_values(&[pool, protocol.as_str()]).set(up as i64);
        }
    }

    /// (pool, protocol, backends up and not draining) for every protocol a pool's backends
    /// speak: a pool serving IMAP and POP3 whose IMAP backends are all down is down for IMAP.
    fn pools_up<'a>(&self, config: &'a Config) -> Vec<(&'a str, Protocol, usize)> {
        let mut out = Vec::new();
        for p in config.pools.values() {
            for protocol in Protocol::ALL {
                let mut members = p.backends.iter().filter(|b| b.protocol == protocol).peekable();
                if members.peek().is_none() {
                    continue;
                }
                let up = members
                    .filter(|b| b.state == crate::config::BackendState::Up && self.health.is_up(&b.name))
                    .count();
                out.push((p.name.as_str(), protocol, up));
            }
        }
        out
    }

    /// What keeps this instance from serving (empty: ready), and what is degraded but shared
    /// with every instance (a pool with no backend up). The second does not make it unready: a
    /// backend outage would take every instance out of its load balancer at once, and clients
    /// would get refused connections instead of the protocol's "try again later".
    pub fn readiness(&self) -> (Vec<String>, Vec<String>) {
        let mut problems = Vec::new();
        let mut degraded = Vec::new();
        if self.shutdown.is_cancelled() {
            problems.push("shutting down".to_string());
            return (problems, degraded);
        }
        let rt = self.runtime.load();
        let sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        for l in &rt.config.listeners {
            for a in &l.bind {
                if !sockets.contains_key(&SocketKey::new(&l.name, *a)) {
                    problems.push(format!("listener {} not bound on {a}", l.name));
                }
            }
        }
        drop(sockets);
        for (pool, protocol, up) in self.pools_up(&rt.config) {
            if up == 0 {
                degraded.push(format!("pool {pool} has no {} backend up", protocol.as_str()));
            }
        }
        if rt.config.listeners.iter().any(|l| l.tls != TlsMode::None) && self.tls.certs.lookup(None).is_none() {
            problems.push("no certificate loaded".to_string());
        }
        (problems, degraded)
    }

    /// Start accept loops for new (listener, address) pairs and stop the ones no longer wanted.
    fn apply_sockets(self: &Arc<Self>, sockets: HashMap<SocketKey, Arc<TcpListener>>) {
        let rt = self.runtime.load_full();
        let wanted: HashSet<(String, SocketAddr)> =
            rt.config.listeners.iter().flat_map(|l| l.bind.iter().map(|a| (l.name.clone(), *a))).collect();
        let mut accepting = self.accepting.lock().unwrap_or_else(|e| e.into_inner());
        accepting.retain(|key, token| {
            let keep = wanted.contains(key);
            if !keep {
                tracing::info!(listener = %key.0, addr = %key.1, "listener stopped");
                token.cancel();
            }
            keep
        });
        for key in wanted {
            if accepting.contains_key(&key) {
                continue;
            }
            let Some(socket) = sockets.get(&SocketKey::new(&key.0, key.1)).cloned() else { continue };
            let token = self.shutdown.child_token();
            accepting.insert(key.clone(), token.clone());
            tracing::info!(listener = %key.0, addr = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
            let app = self.clone();
            tokio::spawn(async move { app.accept_loop(key.0, socket, token).await });
        }
        *self.sockets.lock().unwrap_or_else(|e| e.into_inner()) = sockets;
    }

    async fn accept_loop(self: Arc<Self>, name: String, socket: Arc<TcpListener>, token: CancellationToken) {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let Some((tcp, peer)) = accept(&socket, &mut backoff, &token, &name).await else { return };
            let runtime = self.runtime.load_full();
            // A reload that renamed the listener on this address swaps the config before it
            // stops this loop: a client accepted in between goes to the listener now bound here.
            let Some(listener) = runtime.config.listener_on(&name, socket.local_addr().ok()).cloned() else {
                continue;
            };
            let grace = runtime.config.limits.shutdown_grace;
            self.longest_grace_ms.fetch_max(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
            // A `[::]` listener sees IPv4 clients as `::ffff:a.b.c.d`: logs, limits and what
            // backends are told use the plain IPv4 address.
            let (peer, local) = canonical_pair(peer, tcp.local_addr().unwrap_or(peer));
            let n = self.next_session.fetch_add(1, Ordering::Relaxed);
            let ctx = SessionCtx {
                runtime,
                running: self.runtime.clone(),
                listener,
                peer,
                local,
                accepted_on: local,
                id: format!("{:x}-{n:x}", self.started),
                shutdown: self.shutdown.clone(),
                ehlo: self.ehlo.clone(),
                health: self.health.clone(),
                shutdown_grace: grace,
                throttle: self.throttle.clone(),
                connections: self.connections.clone(),
            };
            self.sessions.spawn(session::run(ctx, tcp));
        }
    }

    /// The SMTP extension cache (tests and admin use).
    pub fn ehlo_cache(&self) -> &EhloCache {
        &self.ehlo
    }

    /// Forget idle throttle counters every minute, so their memory stays bounded.
    fn spawn_throttle_pruning(self: &Arc<Self>) {
        let app = Arc::downgrade(self);
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                let Some(app) = app.upgrade() else { return };
                let settings = app.runtime.load().config.throttle.clone();
                app.throttle.prune(&settings);
            }
        });
    }

    /// Login failure counters (tests, diagnostics).
    pub fn throttle(&self) -> &crate::limits::Throttle {
        &self.throttle
    }

    /// Backend health as observed now.
    pub fn health(&self) -> &HealthTable {
        &self.health
    }

    /// Start the health checks of the current configuration's backends, stopping the previous
    /// generation. State is kept for backends whose address did not change. SMTP checks also
    /// refresh the honest-EHLO cache.
    fn restart_checks(self: &Arc<Self>) {
        let rt = self.runtime();
        let token = self.shutdown.child_token();
        let old = std::mem::replace(&mut *self.checks.lock().unwrap_or_else(|e| e.into_inner()), token.clone());
        old.cancel();
        let backends: Vec<_> = rt.config.backends.values().cloned().collect();
        health::spawn_all(&backends, &rt.backend_tls, &rt.config.hostname, &self.health, &self.ehlo, &token);
    }

    /// Stop accepting, let pre-auth sessions say goodbye, and wait up to the grace period for
    /// relayed sessions to end.
    pub async fn shutdown(&self) {
        {
            // A reload in progress finishes first, and none starts after (it would bind and put
            // listening sockets back).
            let _reload = self.reload_lock.lock().await;
            self.shutdown.cancel();
            crate::systemd::notify("STOPPING=1");
            // Close the listening sockets now (the accept loops hold the only other references
            // and end on the cancellation), so new clients are refused rather than left in the
            // backlog.
            self.sockets.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        // Relayed sessions say goodbye themselves when their grace period is over (the one of the
        // config they were accepted under); allow them a moment more to do it. Read after the
        // reload lock: a reload that ran until then may have raised it for sessions it accepted.
        let longest = std::time::Duration::from_millis(self.longest_grace_ms.load(Ordering::Relaxed));
        let grace = self.runtime.load().config.limits.shutdown_grace.max(longest) + std::time::Duration::from_secs(2);
        // An ACME order in progress removes its challenge material (DNS records, webroot files)
        // before the process ends.
        if let Some(acme) = self.acme.lock().await.take() {
            acme.stop().await;
        }
        self.sessions.close();
        if tokio::time::timeout(grace, self.sessions.wait()).await.is_err() {
            tracing::warn!(remaining = self.sessions.len(), "shutdown grace period over; closing remaining sessions");
        }
    }
}

/// Seconds since the Unix epoch (what certificate expiries and the metrics use).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

async fn bind_admin(addr: SocketAddr) -> Result<TcpListener, StartError> {
    crate::admin::bind(addr).await.map_err(|source| StartError::Bind { listener: "admin".into(), addr, source })
}

/// `source`, or, when it is "address in use" and one of this proxy's own sockets (`ours`, which a
/// reload would give up only after binding) holds the port, an error that says so: a port moved
/// between a wildcard and a specific address (`127.0.0.1:993` to `0.0.0.0:993`), or between a
/// listener, the admin server and the ACME responder, cannot be bound while the old socket
/// listens, and takes a restart (not a retry: nothing else will let it go).
fn held_by_us(source: std::io::Error, addr: SocketAddr, mut ours: impl Iterator<Item = SocketAddr>) -> std::io::Error {
    if source.kind() != std::io::ErrorKind::AddrInUse {
        return source;
    }
    // A wildcard takes the port on every address of its family ([::], dual-stack, on IPv4 too).
    let covers = |w: &SocketAddr, other: &SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || other.is_ipv4());
    match ours.find(|o| o.port() == addr.port() && (*o == addr || covers(o, &addr) || covers(&addr, o))) {
        Some(o) => std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "port {} is held by this proxy's own socket on {o}: moving a port between a wildcard and a \
                 specific address, or between a listener, the admin server and the ACME responder, takes a restart",
                addr.port()
            ),
        ),
        None => source,
    }
}

/// Bind every configured address, reusing sockets that are already bound.
/// `others`: the running admin server's and ACME responder's addresses, held until the reload
/// is applied like the current listeners' sockets.
async fn bind_all(
    config: &Config,
    current: &HashMap<SocketKey, Arc<TcpListener>>,
    others: &[SocketAddr],
) -> Result<HashMap<SocketKey, Arc<TcpListener>>, StartError> {
    // `[::]:993` beside `0.0.0.0:993` (the usual pair): the IPv6 socket takes IPv6 only, or
    // with Linux's default (dual-stack) it would claim the IPv4 port as well and one of the two
    // binds would fail. `[::]:993` alone stays dual-stack.
    let v6only = |addr: &SocketAddr| {
        addr.ip().is_unspecified()
            && addr.is_ipv6()
            && config
                .listeners
                .iter()
                .flat_map(|l| &l.bind)
                .any(|b| b.is_ipv4() && b.port() == addr.port() && b.ip().is_unspecified())
    };
    // A socket cannot change IPV6_V6ONLY once bound, nor be bound again while it listens: a
    // reload that adds or removes the IPv4 half of such a pair needs a restart, and says so
    // (before binding anything) rather than fail on the IPv4 half or leave IPv4 clients refused.
    for l in &config.listeners {
        for addr in l.bind.iter().filter(|a| a.is_ipv6() && a.ip().is_unspecified()) {
            let Some(s) = current.get(&SocketKey::new(&l.name, *addr)) else { continue };
            let bind_error = |source| StartError::Bind { listener: l.name.clone(), addr: *addr, source };
            if socket2::SockRef::from(&**s).only_v6().map_err(bind_error)? != v6only(addr) {
                return Err(bind_error(std::io::Error::other(
                    "the IPv4 half of this port was added or removed, and a listening socket cannot \
                     change between IPv6-only and dual-stack: restart to apply",
                )));
            }
        }
    }
    let mut out = HashMap::new();
    for l in &config.listeners {
        for addr in &l.bind {
            let key = SocketKey::new(&l.name, *addr);
            let bind_error = |source| StartError::Bind { listener: l.name.clone(), addr: *addr, source };
            if let Some(s) = current.get(&key) {
                // Its options change only once the reload can no longer be refused (`reload`).
                out.insert(key, s.clone());
                continue;
            }
            let s = listen(*addr, v6only(addr), &config.limits).map_err(|source| {
                let ours = current.keys().map(|k| k.addr).chain(others.iter().copied());
                bind_error(held_by_us(source, *addr, ours))
            })?;
            out.insert(key, Arc::new(s));
        }
    }
    Ok(out)
}

/// A listening socket: SO_REUSEADDR (a restart rebinds at once), IPV6_V6ONLY as asked, the
/// options its connections inherit (`accepted_options`), and a backlog of 1024 (the kernel caps
/// it at `net.core.somaxconn`) rather than the standard library's 128, which a burst of
/// reconnecting clients overflows (each overflow costs that client a SYN retransmission, a
/// second or more).
fn listen(addr: SocketAddr, v6only: bool, limits: &Limits) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    accepted_options(&socket2::SockRef::from(&s), limits)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Set both ways, not left to `net.ipv6.bindv6only`: `[::]:P` alone is dual-stack as
        // documented, and a reload can tell what a listening socket was bound as.
        s.set_only_v6(v6only)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Set on a listening socket for the connections it accepts, which Linux gives the listener's
/// TCP_NODELAY and keepalive settings: no system call per connection for them. TCP_NODELAY,
/// because mail servers speak first and a greeting or reply held back by Nagle's algorithm
/// waits for the client's delayed ACK (see docs/performance.md); keepalive as `limits` says.
fn accepted_options(s: &socket2::SockRef<'_>, limits: &Limits) -> std::io::Result<()> {
    s.set_tcp_nodelay(true)?;
    match limits.tcp_keepalive() {
        Some(k) => k.apply(s),
        None => {
            s.set_keepalive(false)?;
            s.set_tcp_user_timeout(None)
        }
    }
}

/// Whether a reload read its files as they now are: the same files as the config it replaced
/// (`fp_before`, taken before the load), unchanged from before the load (`fp`, taken after it)
/// to after it was applied (`fp_after`). A file that changed during the load may have been read
/// half-written, or before its change while `fp` already has it: kept, that fingerprint would
/// make the change's own event find nothing to do. Files the new config adds were not
/// fingerprinted before the load, so a reload that adds one is not settled either (one more
/// reload at the next event reads them again).
fn settled(before_files: &[PathBuf], fp_before: u64, files: &[PathBuf], fp: u64, fp_after: u64) -> bool {
    before_files == files && fp_before == fp && fp_after == fp
}

/// Held while gauges that are reset and set again change, and while a scrape renders them.
pub(crate) static GAUGES: Mutex<()> = Mutex::new(());

/// A hash of every input file's bytes, to skip reloads that change nothing.
pub(crate) fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// Make the counter series the shipped alerts watch exist, at 0, before their first count:
/// `increase()` cannot see a series' first value, so a burst that created one (running out of
/// descriptors once, a first few logins the backend refuses) would never fire its alert. At
/// start and after each reload (for what it added).
fn alerted_counters_at_zero(rt: &Runtime) {
    let m = crate::metrics::metrics();
    for l in &rt.config.listeners {
        let protocol = l.protocol.as_str();
        m.connections_rejected.with_label_values(&[protocol, &l.name, "limit_global"]);
        m.accept_errors.with_label_values(&[&l.name]);
        use crate::protocol::Mechanism;
        let mechanisms: &[Mechanism] = match l.protocol {
            Protocol::Smtp => &[Mechanism::Plain, Mechanism::SaslLogin],
            Protocol::Imap | Protocol::Pop3 => &[Mechanism::Login, Mechanism::Plain, Mechanism::SaslLogin],
        };
        let external = rt.auth_http.is_some().then_some(Mechanism::External);
        for mechanism in mechanisms.iter().copied().chain(external) {
            m.logins.with_label_values(&[protocol, mechanism.as_str(), "backend_rejected"]);
        }
    }
    if let Some(responder) = rt.config.acme.as_ref().and_then(|a| a.challenge.responder()) {
        m.accept_errors.with_label_values(&[responder]);
    }
    let dynamic = rt.auth_http.is_some().then_some("dynamic");
    for backend in rt.config.backends.values().map(|b| b.label()).chain(dynamic) {
        m.backend_errors.with_label_values(&[backend, "local_resources"]);
    }
}

/// The first wait after an accept error.
pub(crate) const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// The next connection on `socket`, or None once `stop` is cancelled. An accept error (out of
/// file descriptors and the like) is logged and waited out, `backoff` doubling from 5 ms to 1 s,
/// instead of retried at once in a loop that would take a core.
pub(crate) async fn accept(
    socket: &TcpListener,
    backoff: &mut Duration,
    stop: &CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            r = socket.accept() => r,
        };
        match accepted {
            Ok(x) => {
                *backoff = ACCEPT_BACKOFF_MIN;
                return Some(x);
            }
            Err(e) => {
                tracing::warn!(listener = %what, error = %e, "accept failed");
                crate::metrics::metrics().accept_errors.with_label_values(&[what]).inc();
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(*backoff) => {}
                }
                *backoff = (*backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// `addr` with an IPv4-mapped IPv6 address as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A connection's two ends made plain IPv4 where both are IPv4 (mapped or not), else left as
/// they are: one family for both, as a PROXY v2 header to a backend must have.
pub fn canonical_pair(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (ca, cb) = (canonical(a), canonical(b));
    if ca.is_ipv4() == cb.is_ipv4() { (ca, cb) } else { (a, b) }
}

/// What became of a renewal asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Started,
    /// No such ACME certificate (or no ACME at all).
    Unknown,
    /// The request did not carry the renewal token.
    Refused,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A users file rewritten while a reload reads it: the reload's fingerprint is not kept, so
    /// the rewrite's own event reloads it instead of finding nothing changed.
    #[test]
    fn a_file_changed_during_a_reload_leaves_it_unsettled() {
        let dir = std::env::temp_dir().join(format!("portcullis-settled-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (main, users) = (dir.join("portcullis.toml"), dir.join("users"));
        std::fs::write(&main, "x").unwrap();
        std::fs::write(&users, "alice:{PLAIN}old\n").unwrap();
        let files = vec![main.clone(), users.clone()];
        let before = fingerprint(&files);
        // Nothing changes: settled.
        assert!(settled(&files, before, &files, fingerprint(&files), fingerprint(&files)));
        // Rewritten between the start of the load and the fingerprint after it: whatever the
        // load read, the fingerprint has the new file.
        std::fs::write(&users, "alice:{PLAIN}new\n").unwrap();
        let fp = fingerprint(&files);
        assert!(!settled(&files, before, &files, fp, fingerprint(&files)));
        // Rewritten while the reload is applied.
        std::fs::write(&users, "alice:{PLAIN}newer\n").unwrap();
        assert!(!settled(&files, fp, &files, fp, fingerprint(&files)));
        // A users file the new config names for the first time was not seen before the load.
        let more = vec![main, users, dir.join("other")];
        let fp = fingerprint(&more);
        assert!(!settled(&files, fingerprint(&files), &more, fp, fp));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Only an address another process holds is worth trying again without a file changing:
    /// not this proxy's own socket on the port, nor a permission refusal.
    #[test]
    fn only_an_address_held_elsewhere_is_transient() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let in_use = std::net::TcpListener::bind(addr).unwrap_err();
        let bind = |source| StartError::Bind { listener: "l".into(), addr, source };
        let ours: SocketAddr = format!("0.0.0.0:{}", addr.port()).parse().unwrap();
        assert!(
            bind(held_by_us(std::net::TcpListener::bind(addr).unwrap_err(), addr, std::iter::empty())).is_transient()
        );
        assert!(!bind(held_by_us(in_use, addr, std::iter::once(ours))).is_transient());
        assert!(!bind(std::io::Error::from_raw_os_error(13)).is_transient(), "EACCES");
        assert!(!bind(std::io::Error::other("restart to apply")).is_transient());
    }

    /// Connections come with TCP_NODELAY and the configured keepalive from their listening
    /// socket (no system call per connection), and a reload's change reaches the connections
    /// accepted after it on the socket it keeps.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_keepalive() {
        let limits = Limits { tcp_keepalive: Some(Duration::from_secs(7)), ..Limits::default() };
        let listener = listen("127.0.0.1:0".parse().unwrap(), false, &limits).unwrap();
        async fn accepted(listener: &TcpListener) -> (tokio::net::TcpStream, std::net::TcpStream) {
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (listener.accept().await.unwrap().0, client)
        }
        let (tcp, _client) = accepted(&listener).await;
        let s = socket2::SockRef::from(&tcp);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(7), "interval: min(time, 30 s)");
        assert_eq!(s.tcp_keepalive_retries().unwrap(), crate::config::TCP_KEEPALIVE_PROBES);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(7 + 3 * 7)), "as long as the probes take");

        let longer = Limits { tcp_keepalive: Some(Duration::from_secs(600)), ..Limits::default() };
        accepted_options(&socket2::SockRef::from(&listener), &longer).unwrap();
        let (tcp, _client) = accepted(&listener).await;
        let s = socket2::SockRef::from(&tcp);
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(600));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(30));
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(600 + 90)));

        let off = Limits { tcp_keepalive: None, ..Limits::default() };
        accepted_options(&socket2::SockRef::from(&listener), &off).unwrap();
        let (tcp, _client) = accepted(&listener).await;
        let s = socket2::SockRef::from(&tcp);
        assert!(!s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
        assert!(s.tcp_nodelay().unwrap());
    }

    #[test]
    fn canonical_pairs_keep_one_family() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            canonical_pair(a("[::ffff:192.0.2.1]:1"), a("[::ffff:127.0.0.1]:2")),
            (a("192.0.2.1:1"), a("127.0.0.1:2"))
        );
        assert_eq!(canonical_pair(a("192.0.2.1:1"), a("127.0.0.1:2")), (a("192.0.2.1:1"), a("127.0.0.1:2")));
        // A mapped source with a real IPv6 destination stays IPv6 on both ends.
        assert_eq!(
            canonical_pair(a("[::ffff:192.0.2.1]:1"), a("[2001:db8::5]:2")),
            (a("[::ffff:192.0.2.1]:1"), a("[2001:db8::5]:2"))
        );
    }
}
