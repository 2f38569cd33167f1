//! Backend health: active protocol-level checks and a passive circuit breaker, in one table
//! shared by every listener and session, plus the per-backend session counts that
//! `max_sessions` limits.
//!
//! A backend starts up (a fresh start never refuses traffic). `fall` consecutive failures, from
//! checks or from real sessions failing to connect or log in, mark it down; `rise` consecutive
//! successful checks, or one successful real login, mark it up again. State changes are logged.
//! The table lives beside the config snapshot: health is observed, not configured, and survives
//! reloads for backends whose address did not change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::backend::{self, BackendError, ClientInfo, Lines};
use crate::config::{Backend, BackendState, Protocol, Transport};
use crate::protocol::smtp::ehlo::{self, EhloCache};

/// How often an SMTP backend with health checks off is asked for its EHLO extensions.
const DISABLED_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

/// A backend without active checks that sessions marked down is tried again (in its usual place)
/// this long after its last failure: no check would ever mark it up, only a session that logs in.
pub const RETRY_UNCHECKED: Duration = Duration::from_secs(30);

/// A backend whose active checks have said down for this long is no longer tried as a pool's
/// last resort: logins fail at once instead of waiting out its connect timeout each time
/// (reliability case 65; Dovecot's `PROXY_IMMEDIATE_FAILURE_SECS` is the same 30 s).
pub const FAIL_FAST_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct BackendHealth {
    up: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    sessions: AtomicUsize,
    /// When the last failure while down happened.
    last_failure: Mutex<Option<tokio::time::Instant>>,
    /// Since when its active checks have failed, past `fall`, with none passing since (None
    /// while up, or once a check passes).
    checks_down_since: Mutex<Option<tokio::time::Instant>>,
    /// Sessions this backend ended while their clients were connected, in the current second:
    /// (second since start << 32) | count. See `SessionGuard::close_hold`.
    closes: AtomicU64,
    /// What the state was observed for; a changed address starts afresh.
    identity: Identity,
    /// The backend's `state` in the running config (`sync`), for logins that took the config
    /// before a reload (under way as it lands): 0 up, 1 draining, 2 disabled.
    configured: AtomicU8,
    /// Named by the auth service, not the config.
    dynamic: bool,
    /// When its active checks last ran, and on which definition: checks started again by a
    /// reload that left the definition as it was wait out the rest of the interval
    /// (`run_checks`).
    last_check: Mutex<Option<(tokio::time::Instant, Arc<Backend>)>>,
}

/// The parts of a backend's definition its health belongs to.
#[derive(Debug, PartialEq, Eq)]
struct Identity {
    protocol: Protocol,
    address: String,
    transport: Transport,
}

impl Identity {
    /// Compared on every session start and end, so without allocating.
    fn matches(&self, b: &Backend) -> bool {
        self.protocol == b.protocol && self.transport == b.transport && self.address == b.address
    }
}

impl BackendHealth {
    /// Up, nothing observed: as a new record, but for the sessions it counts.
    fn reset_health(&self) {
        self.up.store(true, Ordering::Relaxed);
        self.fail_streak.store(0, Ordering::Relaxed);
        self.ok_streak.store(0, Ordering::Relaxed);
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.checks_down_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn new(identity: Identity, dynamic: bool) -> BackendHealth {
        BackendHealth {
            up: AtomicBool::new(true),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            sessions: AtomicUsize::new(0),
            last_failure: Mutex::new(None),
            checks_down_since: Mutex::new(None),
            closes: AtomicU64::new(0),
            identity,
            configured: AtomicU8::new(0),
            dynamic,
            last_check: Mutex::new(None),
        }
    }
}

/// Records in the table from which a new backend named by address first forgets those named by
/// address that have no sessions (a reload forgets them too).
const PRUNE_DYNAMIC_AT: usize = 4096;

#[derive(Debug, Default)]
pub struct HealthTable {
    by_backend: Mutex<HashMap<String, Arc<BackendHealth>>>,
    /// The backends the running config names, once a reload has synced the table: a name a
    /// login under way with the config before a reload still routes to, but the running config
    /// dropped, is disabled.
    configured_names: Mutex<Option<std::collections::HashSet<String>>>,
    /// The records of backends a reload moved (address, protocol or transport changed), for what
    /// still runs on their old definition: the last reload's, and earlier ones' while sessions
    /// are open on them (counted in the backend's sessions, which a drain is watched by).
    previous: Mutex<Vec<(String, Arc<BackendHealth>)>>,
}

/// Why a check or session counted against a backend.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Check,
    Session,
}

impl HealthTable {
    fn entry(&self, backend: &Backend) -> Arc<BackendHealth> {
        let mut map = self.by_backend.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&backend.name) {
            Some(h) if h.identity.matches(backend) => h.clone(),
            // A configured backend's entry follows the running config (`sync`): a session or a
            // check still on the definition from before a reload that changed its address
            // counts on the old address's record (kept by `sync` until the next reload, so its
            // sessions and disconnects are counted together, for the disconnect spread too),
            // and neither resets the new address's state nor hides the sessions counted there.
            Some(_) if !backend.dynamic => {
                let mut previous = self.previous.lock().unwrap_or_else(|e| e.into_inner());
                match previous.iter().find(|(n, h)| *n == backend.name && h.identity.matches(backend)) {
                    Some((_, h)) => h.clone(),
                    // From before an earlier reload: kept from now on like a moved one.
                    None => {
                        let h = Arc::new(BackendHealth::new(identity(backend), false));
                        previous.push((backend.name.clone(), h.clone()));
                        h
                    }
                }
            }
            _ => {
                if backend.dynamic && map.len() >= PRUNE_DYNAMIC_AT {
                    // Addresses an auth service named, without sessions now: their state is only
                    // a last failure's time, not worth keeping for every address ever named.
                    map.retain(|_, h| !h.dynamic || h.sessions.load(Ordering::Relaxed) > 0);
                }
                let h = Arc::new(BackendHealth::new(identity(backend), backend.dynamic));
                map.insert(backend.name.clone(), h.clone());
                h
            }
        }
    }

    fn get(&self, name: &str) -> Option<Arc<BackendHealth>> {
        self.by_backend.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// Whether `backend` is the definition its name has in the running config (not one a
    /// reload has since moved to another address, protocol or transport).
    pub fn is_current(&self, backend: &Backend) -> bool {
        self.get(&backend.name).is_some_and(|h| h.identity.matches(backend))
    }

    /// Up unless observed down.
    pub fn is_up(&self, name: &str) -> bool {
        self.get(name).is_none_or(|h| h.up.load(Ordering::Relaxed))
    }

    /// Whether to route to `backend` as a healthy one: up, or without active checks and down
    /// for `RETRY_UNCHECKED` since its last failure (half-open: a session tries it, and its
    /// login marks it up or down again).
    pub fn usable(&self, backend: &Backend) -> bool {
        let Some(h) = self.get(&backend.name) else { return true };
        if h.up.load(Ordering::Relaxed) {
            return true;
        }
        let last = *h.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        !backend.health.enabled && last.is_none_or(|t| t.elapsed() >= RETRY_UNCHECKED)
    }

    /// Down, and its active checks have failed since (not only sessions' logins).
    pub fn down_by_checks(&self, name: &str) -> bool {
        self.get(name).is_some_and(|h| {
            !h.up.load(Ordering::Relaxed) && h.checks_down_since.lock().unwrap_or_else(|e| e.into_inner()).is_some()
        })
    }

    /// Down, and its active checks failing, for `FAIL_FAST_AFTER` or more: not worth a login's
    /// wait. Not a backend only sessions marked down, nor one whose last check passed (on its
    /// way back up): those stay a last resort.
    pub fn long_down(&self, backend: &Backend) -> bool {
        let Some(h) = self.get(&backend.name) else { return false };
        let since = *h.checks_down_since.lock().unwrap_or_else(|e| e.into_inner());
        backend.health.enabled && !h.up.load(Ordering::Relaxed) && since.is_some_and(|t| t.elapsed() >= FAIL_FAST_AFTER)
    }

    /// Open sessions on `name`'s current definition (its address now): what `max_sessions`
    /// limits. Those still on an address a reload moved it from are on another server.
    pub fn current_sessions(&self, name: &str) -> usize {
        self.get(name).map_or(0, |h| h.sessions.load(Ordering::Relaxed))
    }

    /// Open sessions on `name`, on its current definition and on those a reload moved it from:
    /// what a drain waits for.
    pub fn sessions(&self, name: &str) -> usize {
        let current = self.current_sessions(name);
        let previous = self.previous.lock().unwrap_or_else(|e| e.into_inner());
        current
            + previous.iter().filter(|(n, _)| n == name).map(|(_, h)| h.sessions.load(Ordering::Relaxed)).sum::<usize>()
    }

    /// Count a session on `backend` until the guard is dropped.
    pub fn session(&self, backend: &Backend) -> SessionGuard {
        let h = self.entry(backend);
        h.sessions.fetch_add(1, Ordering::Relaxed);
        SessionGuard(h)
    }

    pub fn success(&self, backend: &Backend, source: Source, rise: u32) {
        let h = self.entry(backend);
        h.fail_streak.store(0, Ordering::Relaxed);
        let streak = h.ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
        // A real login is proof enough; checks need `rise` in a row.
        let enough = matches!(source, Source::Session) || streak >= rise;
        let came_up = enough && !h.up.swap(true, Ordering::Relaxed);
        if came_up || matches!(source, Source::Check) {
            // Up, or a check passed on the way there: no longer long down.
            *h.checks_down_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        if came_up {
            tracing::info!(backend = %backend.name, source = ?source, "backend is up");
        }
    }

    pub fn failure(&self, backend: &Backend, source: Source, fall: u32, why: &str) {
        let h = self.entry(backend);
        h.ok_streak.store(0, Ordering::Relaxed);
        let streak = h.fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
        if streak >= fall {
            let now = tokio::time::Instant::now();
            *h.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
            if matches!(source, Source::Check) {
                h.checks_down_since.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(now);
            }
            if h.up.swap(false, Ordering::Relaxed) {
                tracing::warn!(backend = %backend.name, source = ?source, reason = why, failures = streak, "backend is down");
            }
        }
    }

    /// Open sessions on backends that are not in `configured`: the sum on backends the auth
    /// service named by address (the bounded `dynamic` label), and per name those a reload
    /// removed from the config (kept while their sessions last, so a backend taken out by
    /// removal can be watched draining like one set to `draining`).
    pub fn other_sessions(&self, configured: &dyn Fn(&str) -> bool) -> (usize, Vec<(String, usize)>) {
        let map = self.by_backend.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.previous.lock().unwrap_or_else(|e| e.into_inner());
        let (mut dynamic, mut removed) = (0, std::collections::BTreeMap::new());
        let records = map.iter().chain(previous.iter().map(|(n, h)| (n, h)));
        for (name, h) in records.filter(|(k, _)| !configured(k)) {
            let n = h.sessions.load(Ordering::Relaxed);
            if h.dynamic {
                dynamic += n;
            } else if n > 0 {
                *removed.entry(name.clone()).or_insert(0) += n;
            }
        }
        (dynamic, removed.into_iter().collect())
    }

    /// Make the table follow a new config, before it runs: a backend whose address, protocol or
    /// transport changed starts afresh (up, no sessions counted), the others keep their state,
    /// and backends no longer configured are forgotten once they have no sessions open (those
    /// of backends the auth service named keep being counted).
    pub fn sync<'a>(&self, backends: impl IntoIterator<Item = &'a Backend>) {
        let backends: Vec<&Backend> = backends.into_iter().collect();
        *self.configured_names.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(backends.iter().map(|b| b.name.clone()).collect());
        let mut map = self.by_backend.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, h| backends.iter().any(|b| b.name == *k) || h.sessions.load(Ordering::Relaxed) > 0);
        // Moved records stay while sessions are open on them; the last reload's stay in any case
        // (a login under way with the config before it may start a session on one).
        let mut kept = self.previous.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|(_, h)| h.sessions.load(Ordering::Relaxed) > 0);
        let mut previous = Vec::new();
        for b in backends {
            let h = match map.get(&b.name) {
                Some(h) if h.identity.matches(b) => h.clone(),
                _ => {
                    // Moved back to where it was (A, then B, then A again): the record kept for
                    // A's sessions is A's again, so they count toward its max_sessions. Its health
                    // starts afresh as for any move: what was seen of A before is stale.
                    let back = kept.iter().position(|(n, h)| *n == b.name && h.identity.matches(b));
                    let h = match back {
                        Some(i) => {
                            let h = kept.remove(i).1;
                            h.reset_health();
                            h
                        }
                        None => Arc::new(BackendHealth::new(identity(b), b.dynamic)),
                    };
                    if let Some(old) = map.insert(b.name.clone(), h.clone()) {
                        previous.push((b.name.clone(), old));
                    }
                    h
                }
            };
            let state = match b.state {
                BackendState::Up => 0,
                BackendState::Draining => 1,
                BackendState::Disabled => 2,
            };
            h.configured.store(state, Ordering::Relaxed);
        }
        // Newest first: a session that starts on a moved definition finds the latest record of it.
        previous.append(&mut kept);
        *kept = previous;
    }

    /// The state the running config gives configured backend `name` (disabled if it no longer
    /// names it), which may be stricter than the one in the config a login routes by (one
    /// under way when the reload that drained it landed): routing takes the stricter of the
    /// two, so "set it and reload" holds at once.
    pub fn configured_state(&self, name: &str) -> BackendState {
        let dropped = self
            .configured_names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|names| !names.contains(name));
        if dropped {
            return BackendState::Disabled;
        }
        match self.get(name).map_or(0, |h| h.configured.load(Ordering::Relaxed)) {
            0 => BackendState::Up,
            1 => BackendState::Draining,
            _ => BackendState::Disabled,
        }
    }
}

/// Decrements the backend's session count when dropped.
pub struct SessionGuard(Arc<BackendHealth>);

impl SessionGuard {
    /// Whether the session's backend is still where its name leads (no reload has moved it
    /// since the login began): what it announced is then the name's.
    pub fn is_current(&self, table: &HealthTable, name: &str) -> bool {
        table.get(name).is_some_and(|h| Arc::ptr_eq(&h, &self.0))
    }

    /// Whether the session's backend is one an auth service named by address.
    pub fn dynamic(&self) -> bool {
        self.0.dynamic
    }

    /// For the relay: asked when this backend ends the session while its client is connected.
    /// Like Dovecot's `login_proxy_max_disconnect_delay`: as long as the backend ends no more
    /// sessions a second than a `spread`'s share of them (sessions / spread in seconds), clients
    /// are closed at once (ordinary logouts); beyond that rate (the backend failed or restarted)
    /// each further client is held for a random delay up to `spread`, so they do not all
    /// reconnect together. The hold takes the session's count here and `release` (its other
    /// slots) and gives them back as the backend goes: a held client has no backend session, and
    /// must not keep a restarted backend "full" or its user at the per-user cap.
    pub fn close_hold(self, spread: Duration, release: impl Send + 'static) -> crate::relay::CloseHold {
        let h = self.0.clone();
        Box::new(move || {
            let _released = (self, release);
            let second = u64::from(since_start().as_secs() as u32);
            let mut count = 1u64;
            let _ = h.closes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                count = if w >> 32 == second { (w & 0xffff_ffff) + 1 } else { 1 };
                Some(second << 32 | count)
            });
            let sessions = h.sessions.load(Ordering::Relaxed) as f64 + count as f64;
            let per_second = (sessions / spread.as_secs_f64().max(1.0)).ceil();
            if (count as f64) <= per_second { Duration::ZERO } else { spread.mul_f64(crate::limits::random_unit()) }
        })
    }
}

/// Time since the process started (a monotonic clock for per-second windows).
fn since_start() -> Duration {
    static START: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(tokio::time::Instant::now).elapsed()
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

fn identity(b: &Backend) -> Identity {
    Identity { protocol: b.protocol, address: b.address.clone(), transport: b.transport }
}

/// Run the active checks of one backend until `stop` is cancelled.
pub async fn run_checks(
    backend: Arc<Backend>,
    tls: Option<Arc<rustls::ClientConfig>>,
    hostname: String,
    table: Arc<HealthTable>,
    ehlo_cache: Arc<EhloCache>,
    stop: CancellationToken,
) {
    let hs = backend.health.clone();
    // With checks off, SMTP backends are still asked for their extensions, rarely.
    let interval = if hs.enabled { hs.interval } else { hs.interval.max(DISABLED_PROBE_INTERVAL) };
    // Every reload starts the checks again: a backend checked lately and defined as it was (its
    // record kept by `sync`; its check login, TLS and intervals unchanged) waits out the rest of
    // the interval, so frequent reloads (a users file a provisioning tool rewrites) do not
    // multiply the test logins. A changed definition (a check password fixed) is checked at once.
    let record = table.entry(&backend);
    let last = record.last_check.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some((last, checked)) = last
        && *checked == *backend
    {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(last + interval) => {}
        }
    }
    loop {
        if hs.enabled || backend.protocol == Protocol::Smtp {
            *record.last_check.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((tokio::time::Instant::now(), backend.clone()));
            // Not raced against `stop`: a check under way when a reload comes finishes (its
            // timeout bounds it) and counts, while the next generation, finding its stamp,
            // waits out the interval. Cancelled, reloads more frequent than a check takes (a
            // blackholed backend's takes its whole timeout) would leave no check finished.
            let result =
                tokio::time::timeout(hs.timeout, check(&backend, tls.as_ref(), &hostname, &ehlo_cache, &table)).await;
            let result = result.unwrap_or(Err(BackendError::Protocol("health check timed out")));
            if hs.enabled {
                let outcome = if result.is_ok() { "success" } else { "failure" };
                crate::metrics::metrics().health_checks.with_label_values(&[backend.label(), outcome]).inc();
                match result {
                    Ok(()) => table.success(&backend, Source::Check, hs.rise),
                    // The proxy's own shortage (descriptors, ports) says nothing of the backend.
                    Err(e @ BackendError::Local(_)) => {
                        tracing::warn!(backend = %backend.name, error = %e, "health check could not connect: out of local resources");
                    }
                    Err(e) => {
                        tracing::debug!(backend = %backend.name, error = %e, "health check failed");
                        table.failure(&backend, Source::Check, hs.fall, e.reason());
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One protocol-level check: greeting, capabilities, optional STARTTLS and test login.
async fn check(
    backend: &Backend,
    tls: Option<&Arc<rustls::ClientConfig>>,
    hostname: &str,
    ehlo_cache: &EhloCache,
    table: &HealthTable,
) -> Result<(), BackendError> {
    let hs = &backend.health;
    let mut b = backend.clone();
    if !hs.starttls && b.transport == Transport::StartTls {
        b.transport = Transport::Plain;
    }
    match backend.protocol {
        Protocol::Smtp => {
            let exts = ehlo::probe(&b, tls, hostname, hs.timeout).await?;
            // A check that outlived a reload moving the backend elsewhere probed the old
            // server: its extensions are not the name's any more (the new one's are probed at
            // once). Its health result still goes to the old address's record.
            if table.is_current(backend) {
                ehlo_cache.update(&backend.name, &exts, false);
            }
            Ok(())
        }
        Protocol::Imap | Protocol::Pop3 => {
            let client = ClientInfo::local();
            if let Some((user, password)) = &hs.login {
                let creds = crate::auth::Credentials {
                    user: user.clone(),
                    password: crate::auth::Password::new(password.as_bytes().to_vec()),
                };
                let mut logged = match backend.protocol {
                    Protocol::Imap => {
                        crate::protocol::imap::back::connect_and_login(
                            &b,
                            tls.cloned(),
                            &client,
                            user,
                            &creds,
                            hs.timeout,
                        )
                        .await?
                    }
                    _ => {
                        crate::protocol::pop3::back::connect_and_login(
                            &b,
                            tls.cloned(),
                            &client,
                            user,
                            &creds,
                            hs.timeout,
                        )
                        .await?
                    }
                };
                let bye: &[u8] = if backend.protocol == Protocol::Imap { b"H9 LOGOUT\r\n" } else { b"QUIT\r\n" };
                let _ = logged.stream.write_all(bye).await;
                return Ok(());
            }
            let mut stream = backend::connect(&b, tls, &client, hs.timeout).await?;
            let mut lines = Lines::default();
            let greeting = lines.line(&mut stream).await?;
            let (ok, bye): (&[u8], &[u8]) =
                if backend.protocol == Protocol::Imap { (b"* OK", b"H9 LOGOUT\r\n") } else { (b"+OK", b"QUIT\r\n") };
            if !greeting.starts_with(ok) {
                return Err(BackendError::Protocol("unexpected greeting"));
            }
            if backend.protocol == Protocol::Imap {
                stream.write_all(b"H1 CAPABILITY\r\n").await?;
                loop {
                    let l = lines.line(&mut stream).await?;
                    if l.starts_with(b"H1 ") {
                        if !backend::starts_with_ci(&l[3..], b"OK") {
                            return Err(BackendError::Protocol("CAPABILITY failed"));
                        }
                        break;
                    }
                }
            }
            if b.transport == Transport::StartTls {
                let (cmd, ok): (&[u8], &[u8]) = if backend.protocol == Protocol::Imap {
                    (b"H2 STARTTLS\r\n", b"H2 OK")
                } else {
                    (b"STLS\r\n", b"+OK")
                };
                stream.write_all(cmd).await?;
                if !lines.line(&mut stream).await?.starts_with(ok) {
                    return Err(BackendError::Protocol("STARTTLS refused"));
                }
                stream = backend::starttls(&b, tls, stream, &lines).await?;
            }
            let _ = stream.write_all(bye).await;
            Ok(())
        }
    }
}

/// Spawn the checks of every backend of `backends`; they stop when `stop` is cancelled.
pub fn spawn_all(
    backends: &[Arc<Backend>],
    tls: &HashMap<String, Arc<rustls::ClientConfig>>,
    hostname: &str,
    table: &Arc<HealthTable>,
    ehlo_cache: &Arc<EhloCache>,
    stop: &CancellationToken,
) {
    for b in backends {
        let task = run_checks(
            b.clone(),
            tls.get(&b.name).cloned(),
            hostname.to_string(),
            table.clone(),
            ehlo_cache.clone(),
            stop.clone(),
        );
        tokio::spawn(task);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn backend() -> Arc<Backend> {
        let text = "[auth]\nsource = \"backend\"\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n[routing.imap]\ndefault = \"b\"\n";
        crate::config::Config::parse(std::path::Path::new("/t.toml"), text).unwrap().backends["b"].clone()
    }

    /// Reliability case 74: a backend ending sessions one at a time (logouts) has its clients
    /// closed at once; one that ends many in the same second (it failed) has most of them held,
    /// each for a random delay within the spread.
    #[test]
    fn disconnects_are_held_only_beyond_a_spreads_share_per_second() {
        let t = HealthTable::default();
        let b = backend();
        let spread = Duration::from_secs(10);
        let guards: Vec<SessionGuard> = (0..100).map(|_| t.session(&b)).collect();
        // 100 sessions over 10 s: up to about 11 a second close at once.
        // Each hold gives its session back as it is asked: the estimate stays at 100 sessions.
        let holds: Vec<Duration> = guards.into_iter().map(|g| g.close_hold(spread, ())()).collect();
        assert_eq!(t.sessions("b"), 0);
        let at_once = holds.iter().take_while(|h| h.is_zero()).count();
        assert!((10..=12).contains(&at_once), "{at_once} closed at once");
        let held = &holds[at_once..];
        assert!(held.iter().all(|h| *h <= spread));
        assert!(held.iter().filter(|h| !h.is_zero()).count() >= held.len() - 2, "{holds:?}");
        let distinct: std::collections::HashSet<_> = held.iter().collect();
        assert!(distinct.len() > held.len() / 2, "random delays, not one: {holds:?}");
    }

    #[test]
    fn a_changed_address_starts_afresh_and_the_same_one_does_not() {
        let t = HealthTable::default();
        let b = backend();
        t.failure(&b, Source::Check, 1, "x");
        assert!(!t.is_up("b"));
        let same = Arc::new((*b).clone());
        t.failure(&same, Source::Check, 1, "x");
        assert!(!t.is_up("b"), "same definition, same state");
        let mut moved = (*b).clone();
        moved.address = "127.0.0.1:2".into();
        let moved = Arc::new(moved);
        assert!(t.is_current(&b) && !t.is_current(&moved), "before the reload");
        t.sync([&*moved]);
        assert!(t.is_up("b"), "a new address is not judged by the old one's failures");
        assert!(!t.is_current(&b) && t.is_current(&moved), "after it");
        t.sync([&*moved]);
        t.failure(&moved, Source::Check, 1, "x");
        assert!(!t.is_up("b"), "a reload that keeps the address keeps the state");
    }

    /// The running config's state per name: up before any reload, as synced after one, and
    /// disabled for a name a reload dropped (a login under way with the config before may still route to it).
    #[test]
    fn configured_state_follows_the_running_config() {
        let t = HealthTable::default();
        assert_eq!(t.configured_state("b"), BackendState::Up);
        let mut drained = (*backend()).clone();
        drained.state = BackendState::Draining;
        t.sync([&drained]);
        assert_eq!(t.configured_state("b"), BackendState::Draining);
        t.sync(std::iter::empty());
        assert_eq!(t.configured_state("b"), BackendState::Disabled);
    }

    /// After a reload that moved a backend, sessions and checks still on the old definition
    /// (a session relayed since before the reload, a check already under way) neither reset the new
    /// address's state nor hide the sessions counted on it.
    #[test]
    fn the_old_definition_does_not_touch_the_new_entry() {
        let t = HealthTable::default();
        let old = backend();
        let mut moved = (*old).clone();
        moved.address = "127.0.0.1:2".into();
        let moved = Arc::new(moved);
        let _on_old = t.session(&old);
        t.sync([&*moved]);
        let _on_new = t.session(&moved);
        t.failure(&moved, Source::Check, 1, "x");
        let late = t.session(&old);
        t.success(&old, Source::Session, 2);
        assert!(!t.is_up("b"), "the old address's login does not mark the new one up");
        assert_eq!(_on_new.0.sessions.load(Ordering::Relaxed), 1);
        // The old address's sessions are counted together (its disconnect spread sees them all).
        assert!(Arc::ptr_eq(&_on_old.0, &late.0));
        assert_eq!(late.0.sessions.load(Ordering::Relaxed), 2);
        // The backend's sessions, which a drain is watched by, are those on both addresses,
        // also after the next reload, until those on the old one end.
        assert_eq!(t.sessions("b"), 3);
        assert_eq!(t.current_sessions("b"), 1, "max_sessions counts the new address's own");
        t.sync([&*moved]);
        assert_eq!(t.sessions("b"), 3);
        drop((_on_old, late));
        assert_eq!(t.sessions("b"), 1);
        t.sync([&*moved]);
        assert!(t.previous.lock().unwrap().is_empty(), "forgotten once its sessions ended");
        // Moved back while sessions are open on the first address: they are its sessions again,
        // but what was seen of its health before is not kept.
        let on_first = t.session(&old);
        t.failure(&old, Source::Check, 1, "x");
        t.sync([&*moved]);
        t.sync([&*old]);
        assert_eq!(t.current_sessions("b"), 1, "max_sessions counts the sessions there");
        assert!(t.is_up("b") && !t.down_by_checks("b"), "health starts afresh");
        assert!(Arc::ptr_eq(&t.session(&old).0, &on_first.0));
        drop(on_first);
        // Removed by a later reload: counted under its name while sessions last.
        let again = t.session(&old);
        drop(_on_new);
        t.sync(std::iter::empty());
        assert_eq!(t.other_sessions(&|_| false), (0, vec![("b".to_string(), 1)]));
        drop(again);
        assert_eq!(t.other_sessions(&|_| false), (0, vec![]));
    }

    /// Backends an auth service names by address are forgotten once there are many, except
    /// those with sessions: the table does not grow with every address ever named.
    #[test]
    fn backends_named_by_address_do_not_accumulate() {
        let t = HealthTable::default();
        let configured = backend();
        t.failure(&configured, Source::Check, 1, "x");
        let named =
            |i: usize| Backend::adhoc(crate::config::Protocol::Imap, &format!("10.0.{}.{}", i / 250, i % 250), 143);
        let held = t.session(&named(0));
        for i in 1..2 * PRUNE_DYNAMIC_AT {
            t.failure(&named(i), Source::Session, 1, "x");
        }
        let len = t.by_backend.lock().unwrap().len();
        assert!(len <= PRUNE_DYNAMIC_AT, "{len}");
        assert!(!t.is_up("b"), "a configured backend's state is kept");
        assert_eq!(t.sessions(&named(0).name), 1, "one with a session is kept");
        drop(held);
    }

    /// A backend without checks that sessions marked down is tried again after a while (only
    /// a session can mark it up); one with checks waits for them.
    #[tokio::test(start_paused = true)]
    async fn unchecked_backends_are_retried_after_a_while() {
        let t = HealthTable::default();
        let mut unchecked = (*backend()).clone();
        unchecked.health.enabled = false;
        let (unchecked, checked) = (Arc::new(unchecked), backend());
        for b in [&unchecked, &checked] {
            t.failure(b, Source::Session, 1, "x");
            assert!(!t.usable(b));
        }
        tokio::time::advance(RETRY_UNCHECKED).await;
        assert!(t.usable(&unchecked) && !t.is_up("b"), "half-open, still reported down");
        assert!(!t.usable(&checked));
        // The retry fails: another wait.
        t.failure(&unchecked, Source::Session, 1, "x");
        assert!(!t.usable(&unchecked));
        tokio::time::advance(RETRY_UNCHECKED).await;
        t.success(&unchecked, Source::Session, 2);
        assert!(t.is_up("b"));
    }

    #[test]
    fn rise_and_fall() {
        let t = HealthTable::default();
        let b = backend();
        assert!(t.is_up("b"));
        t.failure(&b, Source::Check, 3, "x");
        t.failure(&b, Source::Check, 3, "x");
        assert!(t.is_up("b"));
        t.failure(&b, Source::Session, 3, "x");
        assert!(!t.is_up("b"), "passive failures count too");
        t.success(&b, Source::Check, 2);
        assert!(!t.is_up("b"));
        t.failure(&b, Source::Check, 3, "x");
        t.success(&b, Source::Check, 2);
        assert!(!t.is_up("b"), "a failure resets the streak");
        t.success(&b, Source::Check, 2);
        assert!(t.is_up("b"));
        t.failure(&b, Source::Check, 1, "x");
        t.success(&b, Source::Session, 5);
        assert!(t.is_up("b"), "one real login is enough");
    }

    #[test]
    fn session_counts() {
        let t = HealthTable::default();
        let b = backend();
        let g1 = t.session(&b);
        let g2 = t.session(&b);
        assert_eq!(t.sessions("b"), 2);
        drop(g1);
        drop(g2);
        assert_eq!(t.sessions("b"), 0);
    }

    /// Answer every connection to `server` as an IMAP server passing a check does; the count
    /// of connections so far.
    fn answer_checks(server: tokio::net::TcpListener) -> Arc<std::sync::atomic::AtomicUsize> {
        let checks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = checks.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = server.accept().await else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let _ = s.write_all(b"* OK ready\r\n").await;
                    let mut buf = [0u8; 256];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(b"* CAPABILITY IMAP4rev1\r\nH1 OK done\r\n").await;
                    let _ = s.read(&mut buf).await;
                });
            }
        });
        checks
    }

    /// Backend "b" at `addr` with active checks every `interval`, each given `timeout`.
    fn checked_backend(addr: std::net::SocketAddr, interval: &str, timeout: &str) -> Arc<Backend> {
        let text = format!(
            "[auth]\nsource = \"backend\"\n[[backend]]\nname = \"b\"\naddress = \"{addr}\"\n[backend.health]\ninterval = \"{interval}\"\ntimeout = \"{timeout}\"\n[routing.imap]\ndefault = \"b\"\n"
        );
        crate::config::Config::parse(std::path::Path::new("/t.toml"), &text).unwrap().backends["b"].clone()
    }

    /// Run `b`'s checks into `table` until `stop` is cancelled.
    fn spawn_checks(b: Arc<Backend>, table: &Arc<HealthTable>, stop: &CancellationToken) {
        tokio::spawn(run_checks(b, None, "h".into(), table.clone(), Arc::new(EhloCache::default()), stop.clone()));
    }

    /// Wait (in steps of 100 ms, up to `limit_ms`) for a check beyond the `seen` so far.
    async fn next_check(checks: &AtomicUsize, seen: usize, limit_ms: u64) -> Option<()> {
        for _ in 0..limit_ms / 100 {
            if checks.load(Ordering::SeqCst) != seen {
                return Some(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Checks started again (as every reload does) do not check a backend checked lately at
    /// the same address at once: they wait out the rest of its interval.
    #[tokio::test(start_paused = true)]
    async fn checks_started_again_wait_out_the_interval() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let checks = answer_checks(server);
        let b = checked_backend(addr, "10s", "1s");
        let table = Arc::new(HealthTable::default());
        let start = |stop: &CancellationToken, b: Arc<Backend>| spawn_checks(b, &table, stop);
        let first = CancellationToken::new();
        start(&first, b.clone());
        let mut waited = 0;
        while checks.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            waited += 100;
            assert!(waited < 5_000, "never checked");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        first.cancel();
        let again = CancellationToken::new();
        start(&again, b.clone());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(checks.load(Ordering::SeqCst), 1, "checked again at once");
        // Once the interval since the first check is over, the next one comes.
        next_check(&checks, 1, 10_000).await.expect("never checked again");
        again.cancel();
        // A definition changed at the same address (here the check timeout; a check password
        // fixed, say) is checked at once.
        let changed = {
            let mut c = (*b).clone();
            c.health.timeout = Duration::from_secs(2);
            Arc::new(c)
        };
        let third = CancellationToken::new();
        start(&third, changed);
        next_check(&checks, 2, 3_000).await.expect("a changed definition waited");
        third.cancel();
    }

    /// Reloads more frequent than a check takes (here a blackholed backend: each check waits
    /// out its timeout) still let checks finish and count: the backend is marked down.
    #[tokio::test(start_paused = true)]
    async fn checks_finish_and_count_under_reloads_more_frequent_than_a_check() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = server.accept().await {
                held.push(s);
            }
        });
        let b = {
            let mut c = (*checked_backend(addr, "10s", "2s")).clone();
            c.health.fall = 1;
            Arc::new(c)
        };
        let table = Arc::new(HealthTable::default());
        assert!(table.is_up("b"));
        for _ in 0..20 {
            let stop = CancellationToken::new();
            spawn_checks(b.clone(), &table, &stop);
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.cancel();
        }
        assert!(!table.is_up("b"), "no check finished");
    }

    /// An SMTP server for probes: greets, answers EHLO after `delay` with `SIZE size`.
    fn answer_probes(server: tokio::net::TcpListener, size: u32, delay: Duration) {
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = [0u8; 512];
                    let _ = s.write_all(b"220 mx ESMTP\r\n").await;
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(format!("250-mx\r\n250 SIZE {size}\r\n").as_bytes()).await;
                    let _ = s.read(&mut buf).await;
                });
            }
        });
    }

    /// A check that outlives a reload moving an SMTP backend to another server leaves the new
    /// server's extensions as the name's, though it finishes after the new server's probe.
    #[tokio::test(start_paused = true)]
    async fn a_check_of_the_old_address_does_not_overwrite_the_new_ones_extensions() {
        let (old_server, new_server) = (
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let smtp = |addr: std::net::SocketAddr| {
            let text = format!(
                "[auth]\nsource = \"backend\"\n[[backend]]\nname = \"b\"\nprotocol = \"smtp\"\ntransport = \"plain\"\nlogin = \"replay\"\naddress = \"{addr}\"\n[backend.health]\ninterval = \"60s\"\ntimeout = \"5s\"\n[routing.smtp]\ndefault = \"b\"\n"
            );
            crate::config::Config::parse(std::path::Path::new("/t.toml"), &text).unwrap().backends["b"].clone()
        };
        let (old, moved) = (smtp(old_server.local_addr().unwrap()), smtp(new_server.local_addr().unwrap()));
        answer_probes(old_server, 1000, Duration::from_secs(2));
        answer_probes(new_server, 2000, Duration::ZERO);
        let (table, cache) = (Arc::new(HealthTable::default()), Arc::new(EhloCache::default()));
        table.sync([&*old]);
        let run = |b: &Arc<Backend>, stop: &CancellationToken| {
            tokio::spawn(run_checks(b.clone(), None, "h".into(), table.clone(), cache.clone(), stop.clone()))
        };
        let first = CancellationToken::new();
        run(&old, &first);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The reload: the old server's check is under way and goes on.
        table.sync([&*moved]);
        first.cancel();
        run(&moved, &CancellationToken::new());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let size = || cache.get("b").map(|e| e.to_vec());
        assert_eq!(size(), Some(vec!["SIZE 2000".to_string()]));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(size(), Some(vec!["SIZE 2000".to_string()]), "the old server's check finished last");
    }

    #[tokio::test(start_paused = true)]
    async fn active_checks_mark_a_dead_backend_down_then_up() {
        // A backend address with nothing listening: checks fail; `fall` (3) of them mark it down.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let b = checked_backend(addr, "1s", "500ms");
        let table = Arc::new(HealthTable::default());
        let stop = CancellationToken::new();
        spawn_checks(b.clone(), &table, &stop);
        let mut waited = 0;
        while table.is_up("b") {
            tokio::time::sleep(Duration::from_millis(100)).await;
            waited += 100;
            assert!(waited < 10_000, "never marked down");
        }
        // Something starts answering like an IMAP server: two good checks bring it back.
        answer_checks(tokio::net::TcpListener::bind(addr).await.unwrap());
        let mut waited = 0;
        while !table.is_up("b") {
            tokio::time::sleep(Duration::from_millis(100)).await;
            waited += 100;
            assert!(waited < 10_000, "never marked up");
        }
        stop.cancel();
    }
}
