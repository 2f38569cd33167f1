//! Certificates that manage themselves: ACME (RFC 8555) orders with HTTP-01, TLS-ALPN-01 or
//! DNS-01, renewal by ARI (RFC 9773) when the CA offers it or at two thirds of the lifetime,
//! jittered exponential backoff on failure, and hot installation into the SNI store.
//!
//! Lifecycle of one certificate: load it from the state directory (a restart never orders a
//! certificate that is still good) or serve a self-signed placeholder; plan the renewal; wait
//! for that moment or a trigger (`portcullis renew NAME`, SIGUSR1); order; persist (0600, temp
//! file then rename); install. A failed order keeps the current certificate and retries later.
//! Every step is logged with the certificate, the challenge and what the CA answered.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{AcmeCertSpec, AcmeChallenge, AcmeSettings};
use crate::metrics::metrics;
use crate::tls::certs::{CertStore, dns_names};

/// Longest wait between retries after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// How long the CA gets to validate challenges.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(90);
/// The longest one exchange with the CA, or one run of the DNS-01 hook, may take: a CA that
/// stops answering fails the step instead of stalling the certificate's task for ever.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// The bounds put on an ARI Retry-After (RFC 9773 §4.3.3 suggests one minute and one day): a
/// CA answering `0`, or a date in the past, must not make the task ask again in a loop.
const ARI_RECHECK_MIN: Duration = Duration::from_secs(60);
const ARI_RECHECK_MAX: Duration = Duration::from_secs(24 * 3600);
/// When to ask for renewal information again after the CA did not answer.
const ARI_RECHECK_AFTER_FAILURE: Duration = Duration::from_secs(3600);
/// How long stopping the manager waits for its tasks to clean up challenge material.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The longest wait a CA's Retry-After (a rate limit) is followed for: Let's Encrypt's longest
/// window (duplicate certificates) is a week; a longer answer is taken as a week.
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);
/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

type AcmeResult<T> = Result<T, String>;

tokio::task_local! {
    /// The latest time a CA's 429 or 503 answer asked (Retry-After) the order running in this
    /// task to wait until: each order notes its own, not another certificate's (whose limit,
    /// per name as most of Let's Encrypt's are, says nothing about this one).
    static RETRY_AFTER: std::cell::Cell<Option<SystemTime>>;
}

/// The ACME client's HTTP (hyper over rustls, as instant-acme's own: the platform's roots, or
/// `ca_file`), which notes the `Retry-After` of a 429 or 503 answer. RFC 8555 §6.6 asks a client
/// to wait that long, and Let's Encrypt sends one with every rate limit, up to a week, where
/// the backoff alone would ask again every six hours.
struct Http {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        instant_acme::BodyWrapper<bytes::Bytes>,
    >,
}

impl Http {
    fn new(ca_file: Option<&Path>) -> AcmeResult<Http> {
        let https = match ca_file {
            Some(path) => {
                let what = |e: &dyn std::fmt::Display| format!("ACME client with CA {}: {e}", path.display());
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path).map_err(|e| what(&e))? {
                    roots.add(cert.map_err(|e| what(&e))?).map_err(|e| what(&e))?;
                }
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                    rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth(),
                )
            }
            None => hyper_rustls::HttpsConnectorBuilder::new()
                .try_with_platform_verifier()
                .map_err(|e| format!("ACME client: {e}"))?,
        };
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https.https_only().enable_http1().build());
        Ok(Http { client })
    }
}

impl instant_acme::HttpClient for Http {
    fn request(
        &self,
        req: hyper::Request<instant_acme::BodyWrapper<bytes::Bytes>>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<instant_acme::BytesResponse, instant_acme::Error>> + Send>,
    > {
        let sent = instant_acme::HttpClient::request(&self.client, req);
        // Polled by the order's own task (instant-acme awaits each request), so the note goes
        // to that order; outside one (none is) it is dropped.
        Box::pin(async move {
            let mut rsp = sent.await?;
            tame_retry_after(&mut rsp.parts.headers);
            if matches!(rsp.parts.status.as_u16(), 429 | 503)
                && let Some(until) = retry_after(&rsp.parts.headers, SystemTime::now())
            {
                let _ = RETRY_AFTER.try_with(|noted| noted.set(noted.get().max(Some(until))));
            }
            Ok(rsp)
        })
    }
}

/// The longest `Retry-After` in seconds passed on to the ACME library, which adds it to the
/// clock unchecked: a CA (or whatever answers for it) sending 2^63 would panic every renewal
/// attempt. Longer than anything here follows (a week for rate limits, a day for ARI).
const MAX_RETRY_AFTER_SECS: u64 = 365 * 24 * 3600;

/// Cap a `Retry-After` in seconds at `MAX_RETRY_AFTER_SECS` (a date cannot overflow).
fn tame_retry_after(headers: &mut hyper::HeaderMap) {
    let Some(v) = headers.get(hyper::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::trim) else {
        return;
    };
    if v.parse::<u64>().is_ok_and(|secs| secs > MAX_RETRY_AFTER_SECS) {
        headers.insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from(MAX_RETRY_AFTER_SECS));
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3: seconds, or an HTTP date) as a point in time.
fn retry_after(headers: &hyper::HeaderMap, now: SystemTime) -> Option<SystemTime> {
    let value = headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?.trim();
    match value.parse::<u64>() {
        Ok(secs) => now.checked_add(Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

/// Challenge material being served while an order is validated.
#[derive(Default)]
pub struct Challenges {
    /// HTTP-01: token → key authorization.
    http: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: DNS name → challenge certificate.
    alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    pub fn http_token(&self, token: &str) -> Option<String> {
        self.http.lock().unwrap_or_else(|e| e.into_inner()).get(token).cloned()
    }
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Challenges")
    }
}

/// Serves TLS-ALPN-01 certificates, and only to a ClientHello whose ALPN list is exactly
/// `["acme-tls/1"]` (RFC 8737 §3).
#[derive(Debug)]
pub struct AlpnChallengeResolver(Arc<Challenges>);

impl ResolvesServerCert for AlpnChallengeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !is_alpn_challenge(hello.alpn()) {
            return None;
        }
        let name = hello.server_name()?.to_ascii_lowercase();
        self.0.alpn.lock().unwrap_or_else(|e| e.into_inner()).get(&name).cloned()
    }
}

/// Whether the offered ALPN list is exactly `["acme-tls/1"]`.
pub fn is_alpn_challenge<'a>(alpn: Option<impl Iterator<Item = &'a [u8]>>) -> bool {
    let Some(mut protocols) = alpn else { return false };
    protocols.next() == Some(ACME_TLS_ALPN) && protocols.next().is_none()
}

/// A running ACME manager: one renewal task per certificate.
pub struct AcmeHandle {
    pub settings: AcmeSettings,
    /// The bytes of `settings.ca_file` the client was started with (`app::fingerprint`): a
    /// replaced CA file restarts ACME like changed settings do.
    pub ca_file_digest: u64,
    triggers: HashMap<String, Arc<Notify>>,
    stop: CancellationToken,
    /// The challenge responder's task, which owns its listening socket.
    responder: Option<tokio::task::JoinHandle<()>>,
    /// One task per certificate.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// What a renewal asked through the admin server must carry (`RENEW_TOKEN_FILE`); None if
    /// it could not be written, when such renewals are refused (ACME runs on regardless).
    renew_token: Option<String>,
}

/// The file in the state directory holding the token a renewal asked through the admin server
/// must carry, which `portcullis renew` reads. Only the proxy's user (and root) can read it, so
/// only they can make the proxy spend the CA's limits: not every local user who can reach the
/// admin port. A new one is written at each start of ACME.
pub const RENEW_TOKEN_FILE: &str = "renew-token";

/// Write a new random renewal token (64 hex digits) into `dir`, readable by the owner only:
/// a new file renamed over the old one (never written through a link); returns it.
fn write_renew_token(dir: &std::path::Path) -> AcmeResult<String> {
    let mut bytes = [0u8; 32];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| "no random bytes for the renewal token".to_string())?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&dir.join(RENEW_TOKEN_FILE), token.as_bytes())?;
    Ok(token)
}

/// What `AcmeHandle::ca_file_digest` holds for `settings`.
pub fn ca_file_digest(settings: &AcmeSettings) -> u64 {
    crate::app::fingerprint(&settings.ca_file.iter().cloned().collect::<Vec<_>>())
}

impl AcmeHandle {
    /// Whether `presented` is this run's renewal token (compared in constant time).
    pub fn renew_token_is(&self, presented: &[u8]) -> bool {
        let Some(want) = self.renew_token.as_deref().map(str::as_bytes) else { return false };
        presented.len() == want.len() && presented.iter().zip(want).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    }

    /// Renew the certificate labelled `label` (its first name, or `NAME+rsa`) now. False if
    /// unknown.
    pub fn renew(&self, label: &str) -> bool {
        match self.triggers.get(label) {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
        }
    }

    pub fn renew_all(&self) {
        for n in self.triggers.values() {
            n.notify_one();
        }
    }

    /// Stop the renewal tasks and the responder, and return once the responder's port is free
    /// (a manager started next, say after a reload, binds it again) and the tasks have ended:
    /// an order in progress removes its challenge material first (up to `STOP_GRACE`), and no
    /// old task installs a certificate after this returns.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Some(responder) = self.responder {
            let _ = responder.await;
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!("ACME: a certificate task did not stop in time; challenge material may be left behind");
                abort.abort();
            }
        }
    }
}

/// Start the responders and the renewal tasks. Binding a responder is the only thing that can
/// fail here; everything else is retried in the background.
pub async fn start(settings: AcmeSettings, certs: Arc<CertStore>, stop: CancellationToken) -> AcmeResult<AcmeHandle> {
    std::fs::create_dir_all(settings.state_dir.join("certs"))
        .map_err(|e| format!("cannot create {}: {e}", settings.state_dir.display()))?;
    // A renewal token that cannot be written only refuses renewals through the admin server:
    // never a reason to stop renewing certificates.
    let renew_token = write_renew_token(&settings.state_dir)
        .inspect_err(
            |e| tracing::warn!(error = %e, "ACME: no renewal token; renewals through the admin server are refused"),
        )
        .ok();
    let challenges = Arc::new(Challenges::default());
    let responder = match &settings.challenge {
        AcmeChallenge::Http01Responder(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot bind the HTTP-01 responder on {addr}: {e}"))?;
            tracing::info!(addr = %addr, "ACME HTTP-01 responder listening");
            Some(tokio::spawn(http01_responder(listener, challenges.clone(), stop.clone())))
        }
        AcmeChallenge::TlsAlpn01(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot bind the TLS-ALPN-01 responder on {addr}: {e}"))?;
            tracing::info!(addr = %addr, "ACME TLS-ALPN-01 responder listening");
            Some(tokio::spawn(tls_alpn01_responder(listener, challenges.clone(), stop.clone())))
        }
        AcmeChallenge::Http01Webroot(_) | AcmeChallenge::Dns01 { .. } => None,
    };
    let account = Arc::new(tokio::sync::Mutex::new(None));
    let turns = turn_groups(&settings.certificates);
    let mut triggers = HashMap::new();
    let mut tasks = Vec::new();
    for (spec, turns) in settings.certificates.iter().zip(turns) {
        let label = spec.label.clone();
        let trigger = Arc::new(Notify::new());
        triggers.insert(label.clone(), trigger.clone());
        let task = CertTask {
            settings: settings.clone(),
            spec: spec.clone(),
            label,
            certs: certs.clone(),
            challenges: challenges.clone(),
            account: account.clone(),
            turns,
        };
        tasks.push(tokio::spawn(task.supervise(trigger, stop.clone())));
    }
    let ca_file_digest = ca_file_digest(&settings);
    Ok(AcmeHandle { settings, ca_file_digest, triggers, stop, responder, tasks, renew_token })
}

/// A certificate's failed orders, kept in `certs/LABEL.retry` until one succeeds.
#[derive(serde::Serialize, serde::Deserialize)]
struct RetryState {
    failures: u32,
    /// When to try again, in seconds since the Unix epoch.
    next: u64,
    directory: String,
    names: Vec<String>,
    /// Written before each order and cleared or replaced when it ends: a record still pending
    /// when the process starts is an order the process died during (a crash loop), counted as
    /// failed so that the next start waits out its backoff instead of ordering again at once.
    #[serde(default)]
    pending: bool,
}

#[derive(Clone)]
struct CertTask {
    settings: AcmeSettings,
    spec: AcmeCertSpec,
    label: String,
    certs: Arc<CertStore>,
    challenges: Arc<Challenges>,
    account: Arc<tokio::sync::Mutex<Option<Account>>>,
    /// Taken for the whole of an order: two orders for one name (an ECDSA and an RSA
    /// certificate) take turns. tls-alpn-01's challenge certificate is served by name, and a
    /// dns-01 hook may replace the name's `_acme-challenge` record or remove all its values, so
    /// at once they would spoil each other's validation (a failed validation counts against the
    /// CA's limits). Shared only by certificates with a name in common (`turn_groups`).
    turns: Arc<tokio::sync::Mutex<()>>,
}

/// One turn lock per certificate in `specs`, the same lock for any two that have a name in
/// common, directly or through others; certificates with no name in common order at once. A
/// wildcard and its parent (`*.example.org`, `example.org`) count as one name: dns-01 validates
/// both at `_acme-challenge.example.org`.
fn turn_groups(specs: &[AcmeCertSpec]) -> Vec<Arc<tokio::sync::Mutex<()>>> {
    // Each certificate's group is the lowest index reachable through shared names.
    let mut group: Vec<usize> = (0..specs.len()).collect();
    let mut merged = true;
    while merged {
        merged = false;
        for i in 0..specs.len() {
            for j in i + 1..specs.len() {
                let shared = specs[i].names.iter().any(|n| specs[j].names.iter().any(|m| same_record(n, m)));
                if shared && group[i] != group[j] {
                    let low = group[i].min(group[j]);
                    (group[i], group[j]) = (low, low);
                    merged = true;
                }
            }
        }
    }
    let locks: Vec<Arc<tokio::sync::Mutex<()>>> = specs.iter().map(|_| Arc::default()).collect();
    group.into_iter().map(|g| locks[g].clone()).collect()
}

/// Whether two names are validated at the same place (the same name, or a wildcard and its
/// parent, which share the dns-01 record).
fn same_record(a: &str, b: &str) -> bool {
    a.strip_prefix("*.").unwrap_or(a) == b.strip_prefix("*.").unwrap_or(b)
}

/// What the renewal planner decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// When to order.
    pub renew_at: SystemTime,
    /// When to ask the CA again (ARI Retry-After), if earlier than `renew_at`.
    pub recheck_at: Option<SystemTime>,
}

/// Decide when to renew a certificate valid from `not_before` to `not_after`. With ARI, a random
/// point (`random` in [0, 1)) inside the CA's suggested window, re-checked at its Retry-After;
/// without, two thirds into the lifetime. A window whose end is not after its start is
/// malformed (RFC 9773 §4.2: the client's own timing then), and a point past nine tenths of the
/// lifetime is brought back to it: a CA's mistake must not let the certificate expire.
pub fn plan_renewal(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
    ari: Option<(SystemTime, SystemTime, Duration)>,
    random: f64,
) -> Plan {
    let life = not_after.duration_since(not_before).unwrap_or(Duration::ZERO);
    match ari {
        Some((start, end, retry_after)) if end >= start => {
            let width = end.duration_since(start).unwrap_or(Duration::ZERO);
            let latest = not_before + life.mul_f64(0.9);
            let renew_at = (start + width.mul_f64(random.clamp(0.0, 1.0))).min(latest);
            let recheck = now + retry_after;
            Plan { renew_at, recheck_at: (recheck < renew_at).then_some(recheck) }
        }
        _ => {
            let renew_at = not_before + life.mul_f64(2.0 / 3.0);
            // A malformed window is still asked about again at its Retry-After: the CA may
            // have mended it (or announce a revocation) long before two thirds of the lifetime.
            let recheck = ari.map(|(_, _, retry_after)| now + retry_after).filter(|r| *r < renew_at);
            Plan { renew_at, recheck_at: recheck }
        }
    }
}

/// The delay before retry number `attempt` (0-based): `min * 2^attempt`, capped, with ±25 %
/// jitter so a fleet does not retry in step.
pub fn backoff(min: Duration, attempt: u32, random: f64) -> Duration {
    let base = min.saturating_mul(1u32 << attempt.min(20)).min(MAX_BACKOFF);
    base.mul_f64(0.75 + 0.5 * random.clamp(0.0, 1.0))
}

fn to_instant(t: SystemTime) -> tokio::time::Instant {
    let now = SystemTime::now();
    tokio::time::Instant::now() + t.duration_since(now).unwrap_or(Duration::ZERO)
}

/// When a certificate's task acts next: a retry's backoff, by the monotonic clock; a planned
/// renewal or ARI re-check, by the wall clock (`sleep_until_wall`).
enum Due {
    Instant(tokio::time::Instant),
    Wall(SystemTime),
}

/// How long a sleep towards a time on the wall clock goes before it looks at the clock again.
const WALL_CLOCK_LOOK: Duration = Duration::from_secs(3600);

/// Sleep until the wall clock reads `t`, looking at it again at least hourly. One monotonic
/// sleep worked out when the renewal was planned (weeks ahead) would come late by as long as
/// the host was suspended (the monotonic clock stops), or by the clock's error at planning time
/// (a host that booted before NTP set it): with nothing to plan again, a CA without ARI could
/// let the certificate expire.
async fn sleep_until_wall(t: SystemTime) {
    while let Ok(left) = t.duration_since(SystemTime::now())
        && !left.is_zero()
    {
        tokio::time::sleep(left.min(WALL_CLOCK_LOOK)).await;
    }
}

/// A task that ends when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One step of an order: given up when the manager stops or after `limit`.
async fn step<T>(
    stop: &CancellationToken,
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = AcmeResult<T>>,
) -> AcmeResult<T> {
    tokio::select! {
        _ = stop.cancelled() => Err(format!("{what}: stopped")),
        r = tokio::time::timeout(limit, fut) => r.unwrap_or_else(|_| Err(format!("{what}: no answer within {limit:?}"))),
    }
}

impl CertTask {
    /// Run the task, and run it again if it panics (a CA's answer tripping an assertion in the
    /// ACME client, say): renewal must not end silently while the proxy keeps serving.
    async fn supervise(self, trigger: Arc<Notify>, stop: CancellationToken) {
        let mut attempt = 0u32;
        loop {
            // Aborted with this task (when stopping gives up waiting), not left running.
            let mut run = AbortOnDrop(tokio::spawn(self.clone().run(trigger.clone(), stop.clone())));
            match (&mut run.0).await {
                Err(e) if e.is_panic() && !stop.is_cancelled() => {
                    let wait = backoff(self.settings.retry_min, attempt, crate::limits::random_unit());
                    attempt = attempt.saturating_add(1);
                    tracing::error!(certificate = %self.label, retry_in = ?wait, "ACME: the certificate's task failed unexpectedly; starting it again");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                _ => return,
            }
        }
    }

    async fn run(self, trigger: Arc<Notify>, stop: CancellationToken) {
        self.adopt_previous_label_files();
        let mut current = self.load_stored();
        match &current {
            Some(ck) => {
                tracing::info!(certificate = %self.label, "ACME: using the stored certificate");
                self.install(ck.clone());
            }
            // A stored certificate that is in date but lacks a name added since (or whose order
            // failed): served for the names it has while the new one is ordered, rather than a
            // stand-in that no client trusts for any of them.
            None if let Some((ck, covered)) = self.load_partial() => {
                tracing::warn!(certificate = %self.label, covered = ?covered, configured = ?self.spec.names, directory = %self.settings.directory,
                    "ACME: the stored certificate lacks some configured names or came from another directory; serving it for the names it has until this directory issues one");
                if self.issued_here() {
                    self.install_for(ck, &covered);
                } else {
                    // Perhaps a staging certificate: a stand-in, which a configured certificate
                    // for the same names outranks.
                    self.certs.install_acme(&self.label, &covered, ck, true);
                }
            }
            None => match crate::tls::certs::self_signed(&self.spec.names) {
                Ok(ck) => {
                    tracing::warn!(certificate = %self.label, "ACME: no certificate yet; serving a self-signed one until the CA issues it");
                    self.certs.install_acme(&self.label, &self.spec.names, ck, true);
                }
                Err(e) => {
                    tracing::error!(certificate = %self.label, error = %e, "cannot make a placeholder certificate")
                }
            },
        }
        // Failures so far and when to try again, as a restart or reload left them: a process
        // started anew (a crash loop, a reload that adds a certificate) waits out the backoff
        // rather than ordering again at once against the CA's failed-validation limit.
        let (mut failures, mut retry_at) = match self.load_retry() {
            Some(r) => (r.failures, Some(to_instant(SystemTime::UNIX_EPOCH + Duration::from_secs(r.next)))),
            None => (0, None),
        };
        metrics().acme_failures.with_label_values(&[&self.label]).set(i64::from(failures));
        // No planned order before this: a fresh certificate that already looks due (a clock far
        // ahead, a CA issuing very short lifetimes, an ARI window open on arrival) must not be
        // re-ordered in a loop. Each such certificate in a row doubles the wait for the next, as
        // failures do: every one counts against the CA's duplicate-certificate limit (Let's
        // Encrypt: 5 a week for the same names).
        // Across restarts too (a crash loop, a reload that restarts the tasks): a certificate
        // this directory issued and this task stored less than MAX_BACKOFF ago (by its file's
        // time) is not ordered again before that, nor past a third of its lifetime (a CA issuing
        // certificates of hours); a renewal asked for with `renew` still is. A file more than a
        // day younger than its certificate's notBefore (which CAs backdate by an hour, some to
        // the day's start) was not stored as issued but copied in (a new host, a restore): that
        // must not hold back a certificate issued weeks ago and close to its end (perhaps why
        // it was moved), so it counts from its notBefore then.
        let valid = current.as_deref().and_then(validity);
        let stored_at = std::fs::metadata(self.paths().0).and_then(|m| m.modified()).ok().map(|at| match valid {
            Some((from, _)) if at > from + Duration::from_secs(25 * 3600) => from,
            _ => at,
        });
        let life = valid.and_then(|(from, to)| to.duration_since(from).ok());
        let mut earliest = match (stored_at, life) {
            // Capped: a time in the future (a clock set back since) must not hold it longer.
            (Some(at), Some(life)) if self.issued_here() => {
                to_instant(at + MAX_BACKOFF.min(life / 3)).min(tokio::time::Instant::now() + MAX_BACKOFF)
            }
            _ => tokio::time::Instant::now(),
        };
        let mut due_on_arrival = 0u32;
        loop {
            // When to wake, and whether that is only an ARI re-check (which plans again) rather
            // than the renewal itself.
            let (due, recheck) = match (&current, failures) {
                (_, f) if f > 0 => {
                    let at = retry_at.unwrap_or_else(tokio::time::Instant::now);
                    tracing::info!(certificate = %self.label, retry_in = ?at.saturating_duration_since(tokio::time::Instant::now()), "ACME: will retry");
                    (Some(Due::Instant(at)), false)
                }
                (None, _) => (None, false),
                (Some(ck), _) => match self.plan(ck, &stop).await {
                    // Planned by the wall clock, and slept towards by it (`sleep_until_wall`).
                    Some((at, recheck)) if to_instant(at) >= earliest => {
                        due_on_arrival = 0;
                        (Some(Due::Wall(at)), recheck)
                    }
                    Some((_, recheck)) => {
                        if !recheck {
                            due_on_arrival = due_on_arrival.saturating_add(1);
                            tracing::warn!(certificate = %self.label, renew_in = ?earliest.saturating_duration_since(tokio::time::Instant::now()),
                                "ACME: the certificate just issued is already due for renewal: the CA's renewal window (ARI) says so, or this host's clock is wrong");
                        }
                        (Some(Due::Instant(earliest)), recheck)
                    }
                    None => (None, false),
                },
            };
            let woke_by_trigger = tokio::select! {
                _ = stop.cancelled() => return,
                _ = trigger.notified() => true,
                _ = async {
                    match due {
                        Some(Due::Instant(instant)) => tokio::time::sleep_until(instant).await,
                        Some(Due::Wall(wall)) => sleep_until_wall(wall).await,
                        None => {}
                    }
                } => false,
            };
            // The planned time is the renewal (the ARI window's random point, or two thirds of
            // the lifetime), so it is acted on as it comes. Judging it again by the two-thirds
            // rule here would turn an ARI window that opens earlier into a loop of re-plans.
            if !woke_by_trigger && recheck {
                continue;
            }
            let renewal = current.is_some();
            let _turn = tokio::select! {
                _ = stop.cancelled() => return,
                turn = self.turns.lock() => turn,
            };
            // Counted as failed until it ends (see `RetryState::pending`); a stop puts back what
            // was there before.
            let before = std::fs::read(self.retry_path()).ok();
            let pending = backoff(self.settings.retry_min, failures, crate::limits::random_unit());
            self.save_retry(failures.saturating_add(1), SystemTime::now() + pending, true);
            // Not dropped mid-way when the manager stops: the order notices and cleans up.
            let (result, told) = RETRY_AFTER
                .scope(std::cell::Cell::new(None), async {
                    let result = self.order(&stop, current.as_deref()).await;
                    (result, RETRY_AFTER.with(|noted| noted.get()))
                })
                .await;
            if stop.is_cancelled() {
                match (&result, before) {
                    (Ok(_), _) | (Err(_), None) => self.clear_retry(),
                    (Err(_), Some(bytes)) => {
                        if let Err(e) = write_private(&self.retry_path(), &bytes) {
                            tracing::warn!(certificate = %self.label, error = %e, "ACME: cannot put back the retry file");
                        }
                    }
                }
                return;
            }
            match result {
                Ok(ck) => {
                    failures = 0;
                    retry_at = None;
                    self.clear_retry();
                    metrics().acme_failures.with_label_values(&[&self.label]).set(0);
                    earliest = tokio::time::Instant::now()
                        + backoff(self.settings.retry_min, due_on_arrival, crate::limits::random_unit());
                    metrics().acme_orders.with_label_values(&["success"]).inc();
                    if renewal {
                        metrics().acme_renewals.with_label_values(&["success"]).inc();
                    }
                    self.install(ck.clone());
                    current = Some(ck);
                    // A renewal asked for while this order ran is answered by it: its stored
                    // permit would start a second order at once (another certificate counted
                    // against the CA's duplicate limit).
                    let _ = tokio::time::timeout(Duration::ZERO, trigger.notified()).await;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let mut wait = backoff(self.settings.retry_min, failures - 1, crate::limits::random_unit());
                    // A rate limit (or an overloaded CA) that said how long to wait, during this
                    // order: asking again sooner would only be refused again.
                    if let Some(until) = told {
                        let asked =
                            until.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO).min(MAX_RATE_LIMIT_WAIT);
                        if asked > wait {
                            tracing::warn!(certificate = %self.label, retry_in = ?asked, "ACME: the CA asked to wait (Retry-After) longer than the backoff; waiting that long");
                            wait = asked;
                        }
                    }
                    retry_at = Some(tokio::time::Instant::now() + wait);
                    self.save_retry(failures, SystemTime::now() + wait, false);
                    metrics().acme_failures.with_label_values(&[&self.label]).set(i64::from(failures));
                    metrics().acme_orders.with_label_values(&["error"]).inc();
                    if renewal {
                        metrics().acme_renewals.with_label_values(&["error"]).inc();
                    }
                    tracing::error!(certificate = %self.label, error = %e, "ACME: order failed; the current certificate stays in service");
                }
            }
        }
    }

    /// When to act next for `ck`: the renewal time, or an earlier ARI re-check (true).
    async fn plan(&self, ck: &CertifiedKey, stop: &CancellationToken) -> Option<(SystemTime, bool)> {
        let (plan, ari) = self.planned(ck, stop).await?;
        tracing::info!(certificate = %self.label, renew_at = ?plan.renew_at, ari, "ACME: renewal planned");
        Some(match plan.recheck_at {
            Some(recheck) => (recheck, true),
            None => (plan.renew_at, false),
        })
    }

    /// The renewal plan for `ck`, and whether the CA's ARI window shaped it.
    async fn planned(&self, ck: &CertifiedKey, stop: &CancellationToken) -> Option<(Plan, bool)> {
        let (not_before, not_after) = validity(ck)?;
        let ari = step(stop, STEP_TIMEOUT, "renewal information", self.ari_window(ck)).await.map_err(|e| {
            tracing::warn!(certificate = %self.label, error = %e, "ACME: renewal information unavailable; using two thirds of the lifetime for now");
        });
        let now = SystemTime::now();
        let window = ari.unwrap_or(None);
        let mut plan = plan_renewal(now, not_before, not_after, window, crate::limits::random_unit());
        // The CA has ARI but did not answer: asked again later, not left until two thirds of the
        // lifetime, or a revocation it announces through ARI meanwhile goes unseen.
        let recheck = now + ARI_RECHECK_AFTER_FAILURE;
        if ari.is_err() && recheck < plan.renew_at {
            plan.recheck_at = Some(plan.recheck_at.map_or(recheck, |r| r.min(recheck)));
        }
        Some((plan, window.is_some()))
    }

    /// The CA's suggested renewal window and when to ask again; None when the CA has no ARI
    /// (or the certificate no identifier for it), an error when it could not be asked.
    async fn ari_window(&self, ck: &CertifiedKey) -> AcmeResult<Option<(SystemTime, SystemTime, Duration)>> {
        let account = self.account().await?;
        let Some(id) = ck.cert.first().and_then(|leaf| instant_acme::CertificateIdentifier::try_from(leaf).ok()) else {
            return Ok(None);
        };
        match account.renewal_info(&id).await {
            Ok((info, retry_after)) => {
                let w = info.suggested_window;
                let retry_after = retry_after.clamp(ARI_RECHECK_MIN, ARI_RECHECK_MAX);
                Ok(Some((SystemTime::from(w.start), SystemTime::from(w.end), retry_after)))
            }
            Err(instant_acme::Error::Unsupported(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn install(&self, ck: Arc<CertifiedKey>) {
        self.install_for(ck, &self.spec.names);
    }

    /// Serve `ck` for `names` (the configured ones, or those of them a stored certificate has).
    fn install_for(&self, ck: Arc<CertifiedKey>, names: &[String]) {
        // Under the lock a reload's reset-and-set of these gauges takes, so it cannot write the
        // old expiry back over this one.
        let _gauges = crate::app::GAUGES.lock().unwrap_or_else(|e| e.into_inner());
        self.certs.install_acme(&self.label, names, ck, false);
        // All of them again, not this label's alone: a file certificate with the same label
        // (an RSA one beside this ECDSA one) keeps its expiry, as `NAME (file)`.
        self.certs.record_expiries();
        tracing::info!(certificate = %self.label, names = ?names, "ACME: certificate installed");
    }

    /// The account file for the configured directory: `account.json` when it is that
    /// directory's (or there is none yet), else one named after the directory. An account
    /// belongs to one CA: after a switch (staging to production, or to another CA) the stored
    /// one would take every order back to the CA it came from, and overwriting it would lose it.
    fn account_path(&self) -> PathBuf {
        let name: String = self
            .settings
            .directory
            .trim_start_matches("https://")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
            .collect();
        let own = self.settings.state_dir.join(format!("account-{name}.json"));
        if own.exists() {
            return own;
        }
        let main = self.settings.state_dir.join("account.json");
        if stored_directory(&main).is_none_or(|d| d == self.settings.directory) { main } else { own }
    }

    /// Where the stored certificate records the directory that issued it.
    fn issuer_path(&self) -> PathBuf {
        self.paths().0.with_extension("directory")
    }

    /// Whether the stored certificate came from the configured directory.
    fn issued_here(&self) -> bool {
        self.issued_by(&self.paths().0)
    }

    /// Whether the certificate stored at `cert` came from the configured directory.
    fn issued_by(&self, cert: &Path) -> bool {
        match std::fs::read_to_string(cert.with_extension("directory")) {
            Ok(d) => d.trim() == self.settings.directory,
            // Stored before the issuer was recorded, when one account (account.json) made every
            // order: its directory issued the certificate.
            Err(_) => stored_directory(&self.settings.state_dir.join("account.json"))
                .is_none_or(|d| d == self.settings.directory),
        }
    }

    fn paths(&self) -> (PathBuf, PathBuf) {
        label_paths(&self.settings.state_dir, &self.label)
    }

    /// A certificate's label, and so where its files are, changes when its first name does (a
    /// name put first, the first one removed), and for an RSA certificate as the ECDSA half of
    /// its pair is added (`NAME` becomes `NAME+rsa`) or removed (back to `NAME`, where the
    /// ECDSA half's files would otherwise overwrite its own). The stored files stay under the
    /// old label. With no pair of its own, the certificate takes the old label's (copied, the
    /// issuer record too), so what the CA issued goes on being served for the names it has, and
    /// is not replaced by a stand-in nor ordered again needlessly (against the CA's limits).
    fn adopt_previous_label_files(&self) {
        let (cert, key) = self.paths();
        // Its own pair, or a write of it that was interrupted (`load_stored` finishes that).
        if read_pair(&cert, &key, &self.spec).is_some() || staged_path(&cert).exists() {
            return;
        }
        let Some((other, other_cert, other_key)) = self.previous_label() else { return };
        let issuer = self.issuer_path();
        let copied = [(&other_key, &key), (&other_cert, &cert), (&other_cert.with_extension("directory"), &issuer)]
            .into_iter()
            .filter(|(from, _)| from.exists())
            .try_for_each(|(from, to)| {
                let bytes = std::fs::read(from).map_err(|e| format!("{}: {e}", from.display()))?;
                write_private(to, &bytes)
            });
        // Checked again as copied: the other label's files could have changed in between (an
        // interrupted write being completed). A pair that does not load is not left behind.
        match copied.and_then(|()| match read_pair(&cert, &key, &self.spec) {
            Some(_) => Ok(()),
            None => Err("the copied pair does not load".to_string()),
        }) {
            Ok(()) => {
                tracing::info!(certificate = %self.label, from = %other, "ACME: took over the stored certificate of this certificate's previous label")
            }
            Err(e) => {
                for f in [&cert, &key] {
                    let _ = std::fs::remove_file(f);
                }
                tracing::warn!(certificate = %self.label, from = %other, error = %e, "ACME: cannot take over the stored certificate of this certificate's previous label")
            }
        }
    }

    /// Where this certificate's files may have been before its label changed: for an RSA one,
    /// the label its ECDSA half's coming or going toggles; then the stored pair of its key type,
    /// in date, that this directory issued, with the most of the configured names (the latest
    /// to expire of those). Two configured certificates of one key type cannot share a name
    /// (`check`), so such a pair is this certificate's own from under an earlier label (of
    /// several earlier labels, the latest). (file stem, certificate, key)
    fn previous_label(&self) -> Option<(String, PathBuf, PathBuf)> {
        let dir = self.settings.state_dir.join("certs");
        let own = self.paths().0;
        let sibling = self.spec.rsa.then(|| match self.label.strip_suffix("+rsa") {
            Some(base) => base.to_string(),
            None => format!("{}+rsa", self.label),
        });
        if let Some(other) = sibling {
            let (cert, key) = label_paths(&self.settings.state_dir, &other);
            if read_pair(&cert, &key, &self.spec).is_some() {
                return Some((other, cert, key));
            }
        }
        let mut stems: Vec<String> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| Some(e.ok()?.file_name().to_str()?.strip_suffix(".pem")?.to_string()))
            .collect();
        stems.sort();
        stems
            .into_iter()
            .filter_map(|stem| {
                let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
                let (ck, covered) = read_pair(&cert, &key, &self.spec)?;
                let ends = validity(&ck)?.1;
                (cert != own && !covered.is_empty() && self.issued_by(&cert))
                    .then_some(((covered.len(), ends), (stem, cert, key)))
            })
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, found)| found)
    }

    /// Where a failed order's backoff is kept between runs.
    fn retry_path(&self) -> PathBuf {
        let (cert, _) = self.paths();
        cert.with_extension("retry")
    }

    /// The stored backoff, if it was for this directory and these names (after a change of
    /// either, ordering at once is what the operator asked for), its time capped at the longest
    /// wait from now (a clock set back meanwhile): a CA's Retry-After, up to a week, is waited
    /// out across restarts and reloads too.
    fn load_retry(&self) -> Option<RetryState> {
        let bytes = std::fs::read(self.retry_path()).ok()?;
        let mut r: RetryState = serde_json::from_slice(&bytes).ok()?;
        if r.directory != self.settings.directory || r.names != self.spec.names || r.failures == 0 {
            return None;
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let longest = MAX_BACKOFF.mul_f64(1.25).max(MAX_RATE_LIMIT_WAIT).as_secs();
        // Long past: left by a run that stopped ordering (the certificate taken out of the
        // config, and now back), not a backoff still running.
        if r.next.saturating_add(longest) < now {
            return None;
        }
        r.next = r.next.min(now + longest);
        if r.pending {
            tracing::warn!(certificate = %self.label, failures = r.failures,
                "ACME: the last order did not finish (the process ended during it); counted as failed, retrying after its backoff");
        }
        Some(r)
    }

    fn save_retry(&self, failures: u32, next: SystemTime, pending: bool) {
        let r = RetryState {
            failures,
            next: next.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs(),
            directory: self.settings.directory.clone(),
            names: self.spec.names.clone(),
            pending,
        };
        let written =
            serde_json::to_vec(&r).map_err(|e| e.to_string()).and_then(|b| write_private(&self.retry_path(), &b));
        if let Err(e) = written {
            tracing::warn!(certificate = %self.label, error = %e, "ACME: cannot keep the retry time; a restart would order again at once");
        }
    }

    fn clear_retry(&self) {
        let path = self.retry_path();
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(certificate = %self.label, path = %path.display(), error = %e, "ACME: cannot remove the retry file");
        }
    }

    /// The stored certificate, if it exists, matches its key, covers the configured names and
    /// has not expired.
    fn load_stored(&self) -> Option<Arc<CertifiedKey>> {
        let (cert, key) = self.paths();
        let issuer = self.issuer_path();
        let (staged_cert, staged_issuer) = (staged_path(&cert), staged_path(&issuer));
        // An order stages the key, the certificate and its issuer, then renames them in that
        // order. A crash after the certificate's rename leaves only the issuer staged: finish.
        if !staged_cert.exists() && staged_issuer.exists() {
            let _ = commit(&staged_issuer, &issuer);
        }
        if let Some(ck) = self.load_pair(&cert, &key) {
            return self.issued_here().then_some(ck);
        }
        // A crash between the key's and the certificate's renames leaves the new key beside the
        // old certificate, and the new certificate staged: finish the job.
        let ck = self.load_pair(&staged_cert, &key)?;
        match commit(&staged_cert, &cert) {
            Ok(()) => {
                tracing::warn!(certificate = %self.label, "ACME: completed a certificate write that was interrupted")
            }
            Err(e) => {
                tracing::warn!(certificate = %self.label, error = %e, "ACME: cannot complete an interrupted certificate write")
            }
        }
        if staged_issuer.exists() {
            let _ = commit(&staged_issuer, &issuer);
        }
        self.issued_here().then_some(ck)
    }

    fn load_pair(&self, cert: &Path, key: &Path) -> Option<Arc<CertifiedKey>> {
        let (ck, covered) = read_pair(cert, key, &self.spec)?;
        (covered.len() == self.spec.names.len()).then_some(ck)
    }

    /// The stored certificate when it is in date and has some of the configured names but not
    /// all, or came from another directory, with the names it has.
    fn load_partial(&self) -> Option<(Arc<CertifiedKey>, Vec<String>)> {
        let (cert, key) = self.paths();
        read_pair(&cert, &key, &self.spec).filter(|(_, covered)| !covered.is_empty())
    }

    async fn account(&self) -> AcmeResult<Account> {
        let mut slot = self.account.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let path = self.account_path();
        let builder = || -> AcmeResult<instant_acme::AccountBuilder> {
            let http = Http::new(self.settings.ca_file.as_deref())?;
            Ok(Account::builder_with_http(Box::new(http)))
        };
        let stored = match std::fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            // Unreadable (permissions, I/O): retried, never replaced by a new account.
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if let Some(bytes) = stored {
            let restored = match serde_json::from_slice::<AccountCredentials>(&bytes) {
                Ok(creds) => {
                    builder()?.from_credentials(creds).await.map_err(|e| (stored_key_unusable(&e), e.to_string()))
                }
                Err(e) => Err((true, format!("{}: {e}", path.display()))),
            };
            match restored {
                Ok(a) => {
                    tracing::info!(directory = %self.settings.directory, "ACME: using the stored account");
                    *slot = Some(a.clone());
                    return Ok(a);
                }
                // Restoring also fetches the CA's directory: a CA down for a moment (or answering
                // with an error page) is a failed attempt, retried with backoff, never a reason
                // to replace the account (its key lost for good, the CA's new-account limit spent).
                Err((false, e)) => return Err(format!("restoring the stored ACME account: {e}")),
                Err((true, e)) => {
                    let aside = path.with_extension("json.unusable");
                    tracing::warn!(error = %e, kept_as = %aside.display(), "ACME: stored account unusable; creating a new one");
                    std::fs::rename(&path, &aside).map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
        }
        let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
        let eab = self.settings.eab.as_ref().map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key.expose()));
        let (account, creds) = builder()?
            .create(
                &NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false },
                self.settings.directory.clone(),
                eab.as_ref(),
            )
            .await
            .map_err(|e| format!("creating the ACME account at {}: {e}", self.settings.directory))?;
        // Kept for this process whether or not it can be stored: created again for every order
        // and ARI lookup, it would spend the CA's new-account limit (Let's Encrypt: 10 per
        // address in 3 hours) while the disk stays full.
        *slot = Some(account.clone());
        let stored = serde_json::to_vec(&creds).map_err(|e| e.to_string()).and_then(|json| write_private(&path, &json));
        match stored {
            Ok(()) => tracing::info!(directory = %self.settings.directory, "ACME: account created"),
            Err(e) => tracing::error!(
                directory = %self.settings.directory,
                error = %e,
                "ACME: account created but not stored: used until the proxy stops, a new one made at the next start"
            ),
        }
        Ok(account)
    }

    /// The CA no longer knows the account: a new one is made next time. The old file is kept
    /// aside, not deleted: one wrong answer from the CA must not lose its key for good.
    async fn forget_account(&self) {
        *self.account.lock().await = None;
        let path = self.account_path();
        // Named by when, so a second such answer does not overwrite the first key kept.
        let aside = path.with_extension(format!("json.unknown-to-ca.{}", crate::app::unix_now()));
        tracing::warn!(kept_as = %aside.display(), "ACME: the CA does not know the stored account");
        if let Err(e) = std::fs::rename(&path, &aside) {
            tracing::warn!(file = %path.display(), error = %e, "ACME: cannot move the unknown account aside");
            let _ = std::fs::remove_file(&path);
        }
    }

    /// One order, start to finish; each step given up when `stop` fires or the CA stalls.
    /// Challenge material is always cleaned up, also when the order is given up.
    /// Order the certificate; a renewal names `replacing`, the one it replaces.
    async fn order(&self, stop: &CancellationToken, replacing: Option<&CertifiedKey>) -> AcmeResult<Arc<CertifiedKey>> {
        tracing::info!(certificate = %self.label, names = ?self.spec.names, challenge = self.settings.challenge.name(), "ACME: ordering");
        let account = step(stop, STEP_TIMEOUT, "ACME account", self.account()).await?;
        let ids: Vec<Identifier> = self.spec.names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        // RFC 9773 §5: a renewal says which certificate it replaces, and Let's Encrypt leaves
        // such orders out of its new-order limits. Only to a CA with ARI (instant-acme refuses
        // it otherwise), and for a certificate this directory issued.
        let replaces = replacing
            .filter(|_| self.issued_here())
            .and_then(|ck| ck.cert.first())
            .and_then(|leaf| instant_acme::CertificateIdentifier::try_from(leaf).ok())
            .map(|id| id.into_owned());
        let place = |replaces: Option<instant_acme::CertificateIdentifier<'static>>| {
            let ids = &ids;
            let account = &account;
            step(stop, STEP_TIMEOUT, "new order", async move {
                let new = match replaces {
                    Some(r) => NewOrder::new(ids).replaces(r),
                    None => NewOrder::new(ids),
                };
                Ok(account.new_order(&new).await)
            })
        };
        let mut placed = place(replaces.clone()).await?;
        // Refused as a replacement (no ARI, already replaced, not this account's certificate):
        // the renewal matters more than the exemption. Only then: an order the CA may have
        // made (an answer lost, a 5xx) or will not take now (rate limits) is not placed twice.
        match &placed {
            Err(instant_acme::Error::Unsupported(_)) if replaces.is_some() => placed = place(None).await?,
            Err(e) if replaces.is_some() && refused_as_replacement(e) => {
                tracing::warn!(certificate = %self.label, error = %e, "ACME: the CA refused the order as a replacement; ordering it as a new one");
                placed = place(None).await?;
            }
            _ => {}
        }
        let mut order = match placed {
            Ok(o) => o,
            Err(e) if account_unknown(&e) => {
                // The CA forgot the account (Pebble does on restart): make a new one next time.
                self.forget_account().await;
                return Err("the CA does not know the stored account; a new one will be created".into());
            }
            Err(e) => return Err(format!("new order: {e}")),
        };
        let mut cleanup = Cleanup {
            challenges: self.challenges.clone(),
            tokens: Vec::new(),
            names: Vec::new(),
            files: Vec::new(),
            dns: Vec::new(),
        };
        // Validation waits for the CA (and, for DNS-01, for the records to propagate).
        let propagation = match &self.settings.challenge {
            AcmeChallenge::Dns01 { propagation, .. } => *propagation,
            _ => Duration::ZERO,
        };
        let names = self.spec.names.len() as u32;
        let limit = VALIDATION_TIMEOUT + (STEP_TIMEOUT + propagation).saturating_mul(names.max(1));
        let result = step(stop, limit, "validation", self.validate(&mut order, &mut cleanup)).await;
        cleanup.run(&self.settings.challenge).await;
        result?;
        let key_pem = if self.spec.rsa {
            let (csr, key_pem) = rsa_csr(&self.spec.names)?;
            step(stop, STEP_TIMEOUT, "finalize", async {
                order.finalize_csr(&csr).await.map_err(|e| format!("finalize: {e}"))
            })
            .await?;
            key_pem
        } else {
            step(stop, STEP_TIMEOUT, "finalize", async { order.finalize().await.map_err(|e| format!("finalize: {e}")) })
                .await?
        };
        let chain_pem = step(stop, VALIDATION_TIMEOUT + STEP_TIMEOUT, "certificate download", async {
            order
                .poll_certificate(&RetryPolicy::new().timeout(VALIDATION_TIMEOUT))
                .await
                .map_err(|e| format!("certificate download: {e}"))
        })
        .await?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("CA sent a bad certificate chain: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("bad key: {e}"))?;
        let ck =
            CertifiedKey::from_der(chain, key, &provider()).map_err(|e| format!("issued certificate unusable: {e}"))?;
        if let Some(problem) = issued_problem(&ck, &self.spec.names, SystemTime::now()) {
            return Err(problem);
        }
        // Served whether or not it can be stored: the CA has issued it, and failing the order
        // would order it again and again while the disk stays full (Let's Encrypt allows five
        // certificates for the same names a week). The next start orders anew.
        match self.store(&key_pem, &chain_pem) {
            Ok(()) => tracing::info!(certificate = %self.label, "ACME: certificate issued and stored"),
            Err(e) => tracing::error!(
                certificate = %self.label,
                error = %e,
                "ACME: certificate issued but not stored: served until the proxy stops, ordered again at the next start"
            ),
        }
        Ok(Arc::new(ck))
    }

    /// Write an issued key and chain, and which directory issued them.
    fn store(&self, key_pem: &str, chain_pem: &str) -> Result<(), String> {
        let (cert_path, key_path) = self.paths();
        // Both written out before either replaces the old one: a full disk or a crash while
        // writing leaves the previous pair whole, never a new key beside an old certificate.
        let key_tmp = stage_private(&key_path, key_pem.as_bytes())?;
        let cert_tmp = stage_private(&cert_path, chain_pem.as_bytes())?;
        let issuer_path = self.issuer_path();
        let issuer_tmp = stage_private(&issuer_path, self.settings.directory.as_bytes())?;
        commit(&key_tmp, &key_path)?;
        commit(&cert_tmp, &cert_path)?;
        if let Err(e) = commit(&issuer_tmp, &issuer_path) {
            // Only a later switch of directory needs it; the certificate itself is stored.
            tracing::warn!(certificate = %self.label, error = %e, "ACME: cannot record which directory issued the certificate");
        }
        Ok(())
    }

    async fn validate(&self, order: &mut instant_acme::Order, cleanup: &mut Cleanup) -> AcmeResult<()> {
        let kind = match &self.settings.challenge {
            AcmeChallenge::Http01Responder(_) | AcmeChallenge::Http01Webroot(_) => ChallengeType::Http01,
            AcmeChallenge::TlsAlpn01(_) => ChallengeType::TlsAlpn01,
            AcmeChallenge::Dns01 { .. } => ChallengeType::Dns01,
        };
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz.map_err(|e| format!("authorization: {e}"))?;
            let name = match authz.identifier().identifier {
                Identifier::Dns(d) => d.clone(),
                other => return Err(format!("unsupported identifier {other:?}")),
            };
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => return Err(format!("{name}: authorization is {other:?}")),
            }
            let mut ch = authz
                .challenge(kind.clone())
                .ok_or_else(|| format!("{name}: the CA offers no {} challenge", self.settings.challenge.name()))?;
            let key_auth = ch.key_authorization();
            match &self.settings.challenge {
                AcmeChallenge::Http01Responder(_) => {
                    self.challenges
                        .http
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(ch.token.clone(), key_auth.as_str().to_string());
                    cleanup.tokens.push(ch.token.clone());
                }
                AcmeChallenge::Http01Webroot(root) => {
                    // A file name: base64url only (RFC 8555 8.3), never a path out of the webroot.
                    if ch.token.is_empty()
                        || !ch.token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    {
                        return Err(format!("{name}: the CA sent a challenge token that is not base64url"));
                    }
                    let file = write_webroot_token(root, &ch.token, key_auth.as_str())?;
                    cleanup.files.push(file);
                }
                AcmeChallenge::TlsAlpn01(_) => {
                    let cert = alpn_certificate(&name, key_auth.digest().as_ref())?;
                    self.challenges.alpn.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), cert);
                    cleanup.names.push(name.clone());
                }
                AcmeChallenge::Dns01 { hook, propagation } => {
                    let record = format!("_acme-challenge.{name}");
                    // Noted first: an add given up half-way is removed too.
                    cleanup.dns.push((record.clone(), key_auth.dns_value()));
                    run_hook(hook, "add", &record, &key_auth.dns_value()).await?;
                    // Give the record time to reach every authoritative server the CA may ask.
                    tokio::time::sleep(*propagation).await;
                }
            }
            tracing::info!(certificate = %self.label, name = %name, challenge = self.settings.challenge.name(), "ACME: challenge ready");
            ch.set_ready().await.map_err(|e| format!("{name}: challenge ready: {e}"))?;
        }
        let status = order
            .poll_ready(&RetryPolicy::new().timeout(VALIDATION_TIMEOUT))
            .await
            .map_err(|e| format!("waiting for validation: {e}"))?;
        if status != OrderStatus::Ready {
            let detail = order.state().error.as_ref().map(|p| p.to_string()).unwrap_or_default();
            return Err(format!("order is {status:?} after validation {detail}"));
        }
        Ok(())
    }
}

/// Challenge material to remove after an order, whatever its outcome.
struct Cleanup {
    challenges: Arc<Challenges>,
    tokens: Vec<String>,
    names: Vec<String>,
    files: Vec<PathBuf>,
    dns: Vec<(String, String)>,
}

impl Cleanup {
    async fn run(self, challenge: &AcmeChallenge) {
        {
            let mut http = self.challenges.http.lock().unwrap_or_else(|e| e.into_inner());
            for t in &self.tokens {
                http.remove(t);
            }
        }
        {
            let mut alpn = self.challenges.alpn.lock().unwrap_or_else(|e| e.into_inner());
            for n in &self.names {
                alpn.remove(n);
            }
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let AcmeChallenge::Dns01 { hook, .. } = challenge {
            for (record, value) in &self.dns {
                if let Err(e) = run_hook(hook, "remove", record, value).await {
                    tracing::warn!(record = %record, error = %e, "ACME: DNS-01 cleanup failed");
                }
            }
        }
    }
}

async fn run_hook(hook: &Path, action: &str, record: &str, value: &str) -> AcmeResult<()> {
    let run = tokio::process::Command::new(hook).args([action, record, value]).kill_on_drop(true).output();
    let out = tokio::time::timeout(STEP_TIMEOUT, run)
        .await
        .map_err(|_| {
            format!("DNS-01 hook {} {action} {record}: still running after {STEP_TIMEOUT:?}; killed", hook.display())
        })?
        .map_err(|e| format!("DNS-01 hook {}: {e}", hook.display()))?;
    if !out.status.success() {
        return Err(format!(
            "DNS-01 hook {} {action} {record} failed ({}): {}",
            hook.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The TLS-ALPN-01 certificate for `name` (RFC 8737 §3): self-signed, SAN = name, with the
/// critical acmeIdentifier extension holding SHA-256 of the key authorization.
fn alpn_certificate(name: &str, digest: &[u8]) -> AcmeResult<Arc<CertifiedKey>> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
    // CertifiedKey::from_der rejects the critical acmeIdentifier extension (crates.md §6 #11).
    let signer = provider().key_provider.load_private_key(der).map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer)))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// notBefore and notAfter of the leaf.
fn validity(ck: &CertifiedKey) -> Option<(SystemTime, SystemTime)> {
    let leaf = ck.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let v = cert.validity();
    let t = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    Some((t(v.not_before.timestamp()), t(v.not_after.timestamp())))
}

/// What is wrong with a certificate the CA issued for `names`, if anything: a name it lacks
/// (it would be served for that name all the same, to every client's error), or an end that
/// has passed (this host's clock, or the CA's). Not its start: CAs backdate it, and a host
/// clock a little behind would refuse a good certificate.
fn issued_problem(ck: &CertifiedKey, names: &[String], now: SystemTime) -> Option<String> {
    let has = dns_names(ck).unwrap_or_default();
    let missing: Vec<&str> = names.iter().filter(|n| !has.contains(n)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Some(format!("the CA issued a certificate without {}", missing.join(", ")));
    }
    match validity(ck) {
        Some((_, not_after)) if not_after > now => None,
        Some(_) => Some("the CA issued a certificate that has already expired (is this host's clock right?)".into()),
        None => Some("the CA issued a certificate whose validity cannot be read".into()),
    }
}

/// The directory URL an account file records, if it can be read (files written by older
/// versions of the ACME library may have none).
fn stored_directory(path: &Path) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v.get("directory")?.as_str().map(str::to_string)
}

/// A stored pair that loads, matches its key and has not expired, with those of `names` its
/// certificate has.
/// A stored pair for `spec`: in date, of its key type (a label that passed to the other half of
/// an ECDSA and RSA pair, as one is added or removed, must not take over the other's files), and
/// the configured names it covers.
fn read_pair(cert: &Path, key: &Path, spec: &AcmeCertSpec) -> Option<(Arc<CertifiedKey>, Vec<String>)> {
    let names = &spec.names;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).ok()?.collect::<Result<_, _>>().ok()?;
    let key = PrivateKeyDer::from_pem_file(key).ok()?;
    let ck = CertifiedKey::from_der(chain, key, &provider()).ok()?;
    if (ck.key.algorithm() == rustls::SignatureAlgorithm::RSA) != spec.rsa {
        return None;
    }
    let (_, not_after) = validity(&ck)?;
    if not_after <= SystemTime::now() {
        return None;
    }
    let has = dns_names(&ck)?;
    let covered = names.iter().filter(|n| has.contains(n)).cloned().collect();
    Some((Arc::new(ck), covered))
}

/// A label's certificate and key files in the state directory.
fn label_paths(state_dir: &Path, label: &str) -> (PathBuf, PathBuf) {
    let dir = state_dir.join("certs");
    let file = label.replace('*', "_wildcard");
    (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")))
}

/// Write a secret file atomically: 0600, temp file, fsync, rename.
fn write_private(path: &Path, bytes: &[u8]) -> AcmeResult<()> {
    let tmp = stage_private(path, bytes)?;
    commit(&tmp, path)
}

/// The first half of `write_private`: the bytes in a 0600 temp file beside `path`, on disk.
fn stage_private(path: &Path, bytes: &[u8]) -> AcmeResult<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = staged_path(path);
    // A temp file left by a crash, or put there by someone else, may have other permissions
    // (the mode applies only to a file created here): start from none.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("{}: {e}", tmp.display())),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| format!("{}: {e}", tmp.display()))?;
    Ok(tmp)
}

/// Where `stage_private` puts the bytes meant for `path`.
fn staged_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// The second half: the staged file takes `path`'s place, and the directory is synced so the
/// rename survives a power cut.
fn commit(tmp: &Path, path: &Path) -> AcmeResult<()> {
    std::fs::rename(tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Connections a challenge responder serves at once; more are closed at accept. A CA validates
/// from a handful of places; the cap keeps a flood on a public port 80 or 443 from taking the
/// file descriptors the mail listeners share.
const RESPONDER_MAX_CONNECTIONS: usize = 256;
/// Connections from one address (an IPv6 /64) at once. A CA validates from a few places, with a
/// connection or two from each; without this, one host holding idle connections could take
/// every slot and fail every validation, spending the CA's failed-validation limit and putting
/// the renewal off until the certificate expires.
const RESPONDER_MAX_PER_ADDRESS: usize = 8;
/// How long one responder connection may stay open: a CA's request is answered at once.
const RESPONDER_CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// A slot for a responder connection from `peer`, or None (logged) where a cap is full.
fn responder_slot(
    open: &Arc<crate::limits::Connections>,
    responder: &str,
    peer: std::net::SocketAddr,
) -> Option<crate::limits::OwnedSlot> {
    let client = crate::limits::ip_key(peer.ip(), 64);
    match open.acquire(responder, client, RESPONDER_MAX_CONNECTIONS, 0, RESPONDER_MAX_PER_ADDRESS) {
        Ok(slot) => Some(slot),
        Err(cap) => {
            tracing::debug!(peer = %peer, cap = cap.as_str(), "ACME: {responder} connection refused: too many open");
            None
        }
    }
}

/// Serve `/.well-known/acme-challenge/TOKEN` and nothing else.
async fn http01_responder(listener: tokio::net::TcpListener, challenges: Arc<Challenges>, stop: CancellationToken) {
    use bytes::Bytes;
    use http_body_util::Full;
    let mut backoff = crate::app::ACCEPT_BACKOFF_MIN;
    let open = Arc::new(crate::limits::Connections::default());
    loop {
        let Some((tcp, peer)) =
            crate::app::accept(&listener, &mut backoff, &stop, AcmeChallenge::HTTP01_RESPONDER).await
        else {
            return;
        };
        let Some(slot) = responder_slot(&open, AcmeChallenge::HTTP01_RESPONDER, peer) else { continue };
        let challenges = challenges.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let answer = req
                    .uri()
                    .path()
                    .strip_prefix("/.well-known/acme-challenge/")
                    .and_then(|token| challenges.http_token(token));
                async move {
                    let resp = match answer {
                        Some(key_auth) => hyper::Response::builder()
                            .header("content-type", "application/octet-stream")
                            .body(Full::new(Bytes::from(key_auth))),
                        None => hyper::Response::builder().status(404).body(Full::new(Bytes::new())),
                    };
                    Ok::<_, std::convert::Infallible>(resp.unwrap_or_default())
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = tokio::time::timeout(
                RESPONDER_CONNECTION_LIFETIME,
                hyper::server::conn::http1::Builder::new().serve_connection(io, svc),
            )
            .await;
        });
    }
}

/// Answer TLS-ALPN-01 validation handshakes, then close.
async fn tls_alpn01_responder(listener: tokio::net::TcpListener, challenges: Arc<Challenges>, stop: CancellationToken) {
    let mut cfg =
        rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(AlpnChallengeResolver(challenges)));
    cfg.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let mut backoff = crate::app::ACCEPT_BACKOFF_MIN;
    let open = Arc::new(crate::limits::Connections::default());
    loop {
        let Some((tcp, peer)) =
            crate::app::accept(&listener, &mut backoff, &stop, AcmeChallenge::TLS_ALPN01_RESPONDER).await
        else {
            return;
        };
        let Some(slot) = responder_slot(&open, AcmeChallenge::TLS_ALPN01_RESPONDER, peer) else { continue };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(RESPONDER_CONNECTION_LIFETIME, acceptor.accept(tcp)).await {
                Ok(Ok(mut tls)) => {
                    tracing::debug!(peer = %peer, "ACME: TLS-ALPN-01 validation handshake answered");
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                }
                _ => tracing::debug!(peer = %peer, "ACME: TLS-ALPN-01 handshake refused"),
            }
        });
    }
}

/// The renewal plan for a certificate under `settings` (the account is loaded from, or created
/// in, the state directory), and whether ARI shaped it. For tests and diagnostics.
pub async fn renewal_plan(settings: &AcmeSettings, certs: Arc<CertStore>, ck: &CertifiedKey) -> Option<(Plan, bool)> {
    let spec = settings.certificates.first()?.clone();
    let task = CertTask {
        settings: settings.clone(),
        label: spec.label.clone(),
        spec,
        certs,
        challenges: Arc::new(Challenges::default()),
        account: Arc::new(tokio::sync::Mutex::new(None)),
        turns: Arc::default(),
    };
    task.planned(ck, &CancellationToken::new()).await
}

/// Whether a new order naming the certificate it replaces was refused for that (RFC 9773 §5:
/// `alreadyReplaced`; a certificate the CA does not know or not of this account is `malformed`
/// or `unauthorized`).
fn refused_as_replacement(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p) if p.r#type.as_deref().is_some_and(|t| {
        ["alreadyReplaced", "malformed", "unauthorized", "conflict"].iter().any(|kind| t.ends_with(kind))
    }))
}

/// Whether the CA answered that it does not know the account (Pebble forgets them on restart).
fn account_unknown(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p) if p.r#type.as_deref().is_some_and(|t| t.ends_with("accountDoesNotExist")))
}

/// Whether restoring a stored account failed on its key (which does not load), rather than on
/// reaching the CA.
fn stored_key_unusable(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::KeyRejected | instant_acme::Error::Crypto)
}

/// Put an HTTP-01 token where the web server serving `root` finds it. The file and the
/// directories made for it are readable by everyone whatever the process's umask (the shipped
/// systemd unit's is 0077): the web server runs as another user, and the token is public anyway
/// (the CA fetches it over plain HTTP).
fn write_webroot_token(root: &Path, token: &str, content: &str) -> AcmeResult<PathBuf> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let shown = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let dir = root.join(".well-known/acme-challenge");
    std::fs::create_dir_all(&dir).map_err(|e| shown(&dir, e))?;
    // Also when they were made before (by an earlier version under the same umask): a
    // directory the web server cannot enter fails every validation. Not ours to change (EPERM):
    // the web server's owner set it up. Whoever else can write the webroot could swap in a
    // symbolic link at any moment, so nothing here goes through one: each directory is opened
    // without following one (a shared .well-known elsewhere is not ours) and changed through
    // its descriptor, not its path.
    for d in [root.join(".well-known"), dir.clone()] {
        let Ok(opened) =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY).open(&d)
        else {
            continue;
        };
        let mode = opened.metadata().map(|m| m.permissions().mode() & 0o777).unwrap_or(0o755);
        if mode & 0o055 != 0o055
            && let Err(e) = opened.set_permissions(std::fs::Permissions::from_mode(mode | 0o755))
        {
            tracing::warn!(dir = %d.display(), error = %e, "ACME: the web server may not be able to read the challenge directory");
        }
    }
    // A new file, never one written through: whatever is at the token's name (a file left there,
    // a symbolic link to the proxy's key) is removed first, and the file is created anew.
    let file = dir.join(token);
    match std::fs::remove_file(&file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(shown(&file, e)),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&file)
        .map_err(|e| shown(&file, e))?;
    f.write_all(content.as_bytes()).map_err(|e| shown(&file, e))?;
    // The umask may have taken bits the web server needs.
    f.set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(|e| shown(&file, e))?;
    Ok(file)
}

/// A new RSA key and the CSR for `names` (DER, and the key as PEM). The subject is left empty,
/// as instant-acme does for its own ECDSA CSRs: rcgen's default subject is the common name
/// "rcgen self signed cert", which a CA reads as one more name to validate, and Let's Encrypt
/// refuses the whole order for it (`badCSR`).
fn rsa_csr(names: &[String]) -> Result<(Vec<u8>, String), String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewal slept towards by the wall clock comes when the clock reads its time, not
    /// before; a time already past comes at once.
    #[tokio::test]
    async fn a_wall_clock_sleep_ends_when_the_clock_reads_its_time() {
        let t = SystemTime::now() + Duration::from_millis(300);
        sleep_until_wall(t).await;
        assert!(SystemTime::now() >= t);
        let past = SystemTime::now() - Duration::from_secs(60);
        tokio::time::timeout(Duration::from_secs(5), sleep_until_wall(past)).await.unwrap();
    }

    /// One host holding idle connections to the HTTP-01 responder cannot keep the CA out: past
    /// its own few, its connections are closed at accept, and another address is still served.
    #[tokio::test]
    async fn one_address_cannot_take_every_http01_responder_slot() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let challenges = Arc::new(Challenges::default());
        challenges.http.lock().unwrap().insert("tok".into(), "tok.thumb".into());
        let stop = CancellationToken::new();
        let responder = tokio::spawn(http01_responder(listener, challenges, stop.clone()));
        let from = |ip: [u8; 4]| async move {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind((std::net::Ipv4Addr::from(ip), 0).into()).unwrap();
            s.connect(addr).await.unwrap()
        };
        let mut held = Vec::new();
        for _ in 0..RESPONDER_MAX_PER_ADDRESS {
            held.push(from([127, 0, 0, 1]).await);
        }
        let mut over = from([127, 0, 0, 1]).await;
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf)).await.unwrap();
        assert!(matches!(closed, Ok(0) | Err(_)), "a ninth connection from one address was kept: {closed:?}");
        let mut ca = from([127, 0, 0, 2]).await;
        ca.write_all(b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), ca.read_to_end(&mut answer)).await.unwrap().unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("tok.thumb"), "{answer}");
        stop.cancel();
        drop(held);
        responder.await.unwrap();
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn only_certificates_with_a_name_in_common_take_turns() {
        let spec = |names: &[&str], rsa| AcmeCertSpec::new(names.iter().map(|n| n.to_string()).collect(), rsa);
        let specs = [
            spec(&["mail.example.test", "imap.example.test"], false),
            spec(&["mx.other.test"], false),
            spec(&["imap.example.test"], true),
            // Joined to the first two through the last.
            spec(&["a.test"], false),
            spec(&["b.test"], false),
            spec(&["b.test", "a.test"], true),
            // dns-01 validates both at _acme-challenge.example.test.
            spec(&["*.example.test"], false),
            spec(&["example.test"], false),
        ];
        let turns = turn_groups(&specs);
        let same = |i: usize, j: usize| Arc::ptr_eq(&turns[i], &turns[j]);
        assert!(same(0, 2));
        assert!(!same(0, 1) && !same(1, 2));
        assert!(same(3, 4) && same(4, 5));
        assert!(!same(0, 3) && !same(1, 3));
        assert!(same(6, 7) && !same(0, 6));
    }

    #[test]
    fn webroot_tokens_are_readable_by_the_web_server() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let file = write_webroot_token(root.path(), "tok_en-1", "tok_en-1.thumb").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "tok_en-1.thumb");
        assert_eq!(mode(&file), 0o644);
        // Whatever mode a file or directory left there had (a umask of 0077 gives 0600 and 0700).
        let dir = root.path().join(".well-known/acme-challenge");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let again = write_webroot_token(root.path(), "tok_en-1", "tok_en-1.other").unwrap();
        assert_eq!((mode(&again), std::fs::read_to_string(&again).unwrap().as_str()), (0o644, "tok_en-1.other"));
        assert_eq!((mode(&dir), mode(dir.parent().unwrap())), (0o755, 0o755));

        // A symbolic link at the token's name (put there by whoever can write the webroot) is
        // replaced, not written through, and a linked directory is not changed: the proxy's
        // own 0600 files stay as they are.
        let secret = root.path().join("secret.key");
        std::fs::write(&secret, "key").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&secret, dir.join("tok_en-2")).unwrap();
        let written = write_webroot_token(root.path(), "tok_en-2", "tok_en-2.thumb").unwrap();
        assert!(!std::fs::symlink_metadata(&written).unwrap().file_type().is_symlink());
        assert_eq!((std::fs::read_to_string(&secret).unwrap().as_str(), mode(&secret)), ("key", 0o600));
        let elsewhere = tempfile::tempdir().unwrap();
        let private = elsewhere.path().join("state");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let linked = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&private, linked.path().join(".well-known")).unwrap();
        std::fs::create_dir(private.join("acme-challenge")).unwrap();
        std::fs::set_permissions(private.join("acme-challenge"), std::fs::Permissions::from_mode(0o700)).unwrap();
        write_webroot_token(linked.path(), "tok_en-3", "x").unwrap();
        assert_eq!(mode(&private), 0o700, "the linked .well-known itself is not ours");
    }

    #[test]
    fn an_rsa_csr_names_only_the_certificates_names() {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        use x509_parser::prelude::FromDer;
        let names = vec!["mail.example.org".to_string(), "imap.example.org".to_string()];
        let (der, key_pem) = rsa_csr(&names).unwrap();
        assert!(key_pem.contains("PRIVATE KEY"));
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        let subject = &csr.certification_request_info.subject;
        assert_eq!(subject.iter_attributes().count(), 0, "subject: {subject}");
        let sans: Vec<String> = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                ParsedExtension::SubjectAlternativeName(san) => Some(&san.general_names),
                _ => None,
            })
            .flatten()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                other => panic!("unexpected name {other:?}"),
            })
            .collect();
        assert_eq!(sans, names);
    }

    /// A key is written 0600 even where a temp file with wider permissions was left behind (a
    /// crash, or someone else): the mode of an existing file would otherwise be kept.
    #[test]
    fn a_private_file_is_0600_whatever_temp_file_was_left() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("portcullis-private-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cert.key");
        let tmp = staged_path(&path);
        std::fs::write(&tmp, b"stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"secret").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!tmp.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A certificate the CA issued without one of the names ordered, or already expired, is
    /// not stored or served: the order fails and is retried.
    #[test]
    fn an_issued_certificate_must_cover_the_names_and_be_in_date() {
        let make = |sans: &[&str], days: i64| {
            let mut p = rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
            p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
            p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
            CertifiedKey::from_der(vec![cert.der().clone()], key, &provider()).unwrap()
        };
        let names = vec!["mail.example.org".to_string(), "imap.example.org".to_string()];
        let now = SystemTime::now();
        assert_eq!(issued_problem(&make(&["imap.example.org", "mail.example.org"], 90), &names, now), None);
        let lacking = issued_problem(&make(&["mail.example.org"], 90), &names, now).unwrap();
        assert!(lacking.contains("without imap.example.org"), "{lacking}");
        let expired = issued_problem(&make(&["mail.example.org", "imap.example.org"], -1), &names, now).unwrap();
        assert!(expired.contains("already expired"), "{expired}");
    }

    #[test]
    fn two_thirds_without_ari() {
        let p = plan_renewal(t(1000), t(0), t(90 * 86400), None, 0.5);
        assert_eq!(p.renew_at, t(60 * 86400));
        assert_eq!(p.recheck_at, None);
    }

    #[test]
    fn random_point_inside_the_ari_window() {
        let (start, end) = (t(50 * 86400), t(52 * 86400));
        let p = plan_renewal(t(1000), t(0), t(90 * 86400), Some((start, end, Duration::from_secs(6 * 3600))), 0.25);
        assert_eq!(p.renew_at, t(50 * 86400 + 86400 / 2));
        // The server asked to be asked again in 6 h, long before the window.
        assert_eq!(p.recheck_at, Some(t(1000 + 6 * 3600)));
        // A window in the past means now.
        let p = plan_renewal(t(60 * 86400), t(0), t(90 * 86400), Some((start, end, Duration::from_secs(60))), 0.9);
        assert!(p.renew_at <= t(60 * 86400));
        assert_eq!(p.recheck_at, None);
    }

    /// RFC 9773 §4.2: a window that ends before it starts is malformed, so the client's own
    /// timing holds; a window past the certificate's end is followed only up to nine tenths of
    /// the lifetime, so the certificate is renewed before it expires.
    #[test]
    fn a_malformed_or_too_late_ari_window_is_not_followed() {
        let day = 86400;
        let retry = Duration::from_secs(6 * 3600);
        let p = plan_renewal(t(1000), t(0), t(90 * day), Some((t(52 * day), t(50 * day), retry)), 0.5);
        assert_eq!(p.renew_at, t(60 * day));
        assert_eq!(p.recheck_at, Some(t(1000 + 6 * 3600)), "asked again at its Retry-After");
        // A window of one instant is a window.
        let p = plan_renewal(t(1000), t(0), t(90 * day), Some((t(50 * day), t(50 * day), retry)), 0.5);
        assert_eq!(p.renew_at, t(50 * day));
        let p = plan_renewal(t(1000), t(0), t(90 * day), Some((t(95 * day), t(97 * day), retry)), 0.5);
        assert_eq!(p.renew_at, t(81 * day));
        assert_eq!(p.recheck_at, Some(t(1000 + 6 * 3600)), "still asked again at its Retry-After");
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers = |v: &str| {
            let mut h = hyper::HeaderMap::new();
            h.insert(hyper::header::RETRY_AFTER, v.parse().unwrap());
            h
        };
        assert_eq!(retry_after(&headers("3600"), now), Some(now + Duration::from_secs(3600)));
        assert_eq!(retry_after(&headers(" 60 "), now), Some(now + Duration::from_secs(60)));
        let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_086_400);
        assert_eq!(retry_after(&headers("Wed, 15 Nov 2023 22:13:20 GMT"), now), Some(date));
        assert_eq!(retry_after(&headers("soon"), now), None);
        assert_eq!(retry_after(&hyper::HeaderMap::new(), now), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let min = Duration::from_secs(60);
        assert_eq!(backoff(min, 0, 0.5), Duration::from_secs(60));
        assert_eq!(backoff(min, 3, 0.5), Duration::from_secs(480));
        assert_eq!(backoff(min, 0, 0.0), Duration::from_secs(45));
        assert_eq!(backoff(min, 0, 1.0), Duration::from_secs(75));
        assert_eq!(backoff(min, 30, 0.5), MAX_BACKOFF);
    }

    #[test]
    fn only_exact_acme_tls_alpn_gets_the_challenge() {
        let one: Vec<&[u8]> = vec![b"acme-tls/1"];
        assert!(is_alpn_challenge(Some(one.into_iter())));
        let two: Vec<&[u8]> = vec![b"acme-tls/1", b"imap"];
        assert!(!is_alpn_challenge(Some(two.into_iter())));
        let other: Vec<&[u8]> = vec![b"imap"];
        assert!(!is_alpn_challenge(Some(other.into_iter())));
        assert!(!is_alpn_challenge(None::<std::vec::IntoIter<&[u8]>>));
    }

    #[test]
    fn private_files_are_0600_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.path().join("k.tmp").exists());
    }

    /// A task for `names` (ECDSA) with its state in `dir`.
    fn test_task(dir: &Path, names: &[String]) -> CertTask {
        let text = "[auth]\nsource = \"backend\"\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:143\"\n[routing.imap]\ndefault = \"b\"\n";
        let config = crate::config::Config::parse(Path::new("/etc/portcullis/p.toml"), text).unwrap();
        let settings = AcmeSettings {
            directory: "https://acme.example/dir".into(),
            contact: Vec::new(),
            terms_agreed: true,
            eab: None,
            ca_file: None,
            state_dir: dir.to_path_buf(),
            challenge: AcmeChallenge::Http01Webroot(dir.to_path_buf()),
            retry_min: Duration::from_secs(60),
            certificates: vec![AcmeCertSpec::new(names.to_vec(), false)],
        };
        CertTask {
            settings,
            spec: AcmeCertSpec::new(names.to_vec(), false),
            label: names[0].clone(),
            certs: Arc::new(CertStore::load(&config.tls).unwrap()),
            challenges: Arc::new(Challenges::default()),
            account: Arc::new(tokio::sync::Mutex::new(None)),
            turns: Arc::default(),
        }
    }

    #[test]
    fn an_interrupted_certificate_write_is_completed_at_start() {
        crate::tls::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["mail.example.test".to_string()];
        let task = test_task(dir.path(), &names);
        let pair = || {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(names.clone()).unwrap().self_signed(&key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (old_cert, _) = pair();
        let (new_cert, new_key) = pair();
        let (cert_path, key_path) = task.paths();
        std::fs::create_dir_all(cert_path.parent().unwrap()).unwrap();
        // Reliability case 78 (never a key beside a certificate it does not match): the state
        // after a crash between the key's rename and the certificate's.
        std::fs::write(&key_path, &new_key).unwrap();
        std::fs::write(&cert_path, &old_cert).unwrap();
        std::fs::write(staged_path(&cert_path), &new_cert).unwrap();
        assert!(task.load_pair(&cert_path, &key_path).is_none(), "the old certificate does not match the new key");
        let ck = task.load_stored().expect("the staged certificate is used");
        let stored = CertificateDer::from_pem_slice(new_cert.as_bytes()).unwrap();
        assert_eq!(ck.cert[0], stored);
        assert_eq!(std::fs::read_to_string(&cert_path).unwrap(), new_cert);
        assert!(!staged_path(&cert_path).exists());
        assert!(task.load_stored().is_some());
        // A staged certificate that does not match the key either is not used.
        let (other_cert, _) = pair();
        std::fs::write(&cert_path, &old_cert).unwrap();
        std::fs::write(staged_path(&cert_path), &other_cert).unwrap();
        assert!(task.load_stored().is_none());
        // A label that passes to the other half of an ECDSA and RSA pair (as one is added or
        // removed) does not take over the other key type's files.
        std::fs::write(&key_path, &new_key).unwrap();
        std::fs::write(&cert_path, &new_cert).unwrap();
        assert!(task.load_pair(&cert_path, &key_path).is_some());
        let rsa = CertTask { spec: AcmeCertSpec::new(names.clone(), true), ..task.clone() };
        assert!(rsa.load_pair(&cert_path, &key_path).is_none());
        assert!(rsa.load_partial().is_none());
    }

    /// The RSA half's label moves as the ECDSA half of its pair is added (NAME -> NAME+rsa) or
    /// removed (back): its stored certificate moves with it rather than being ordered again,
    /// and the ECDSA half never takes it.
    #[test]
    fn an_rsa_certificate_follows_its_label_when_the_ecdsa_half_comes_or_goes() {
        crate::tls::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["mail.example.test".to_string()];
        let ecdsa = test_task(dir.path(), &names);
        let rsa_only = CertTask { spec: AcmeCertSpec::new(names.clone(), true), ..ecdsa.clone() };
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(names.clone()).unwrap().self_signed(&key).unwrap();
        let (cert_path, key_path) = rsa_only.paths();
        std::fs::create_dir_all(cert_path.parent().unwrap()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(rsa_only.issuer_path(), &rsa_only.settings.directory).unwrap();
        assert!(rsa_only.load_stored().is_some());

        // The ECDSA half is added: the RSA one is now NAME+rsa.
        let rsa = CertTask { label: format!("{}+rsa", names[0]), ..rsa_only.clone() };
        assert!(rsa.load_stored().is_none(), "nothing under the new label yet");
        rsa.adopt_previous_label_files();
        let adopted = rsa.load_stored().expect("the stored RSA certificate under the new label");
        assert_eq!(adopted.cert[0], cert.der().clone());
        assert!(ecdsa.load_stored().is_none(), "the ECDSA half does not take the RSA files");
        // The ECDSA half's order overwrites NAME's files; the RSA one keeps its copy.
        let ec_key = rcgen::KeyPair::generate().unwrap();
        let ec_cert = rcgen::CertificateParams::new(names.clone()).unwrap().self_signed(&ec_key).unwrap();
        std::fs::write(&key_path, ec_key.serialize_pem()).unwrap();
        std::fs::write(&cert_path, ec_cert.pem()).unwrap();
        rsa.adopt_previous_label_files();
        assert_eq!(rsa.load_stored().unwrap().cert[0], cert.der().clone());
        assert!(ecdsa.load_stored().is_some());

        // The ECDSA half is removed again: the RSA one is NAME once more, over the ECDSA files.
        rsa_only.adopt_previous_label_files();
        assert_eq!(rsa_only.load_stored().unwrap().cert[0], cert.der().clone());
    }

    /// A name put before the first changes the certificate's label and so where its files are:
    /// the pair stored under the old label is taken over (served for the names it has while the
    /// new one is ordered), not left behind for a stand-in. Not a pair from another directory,
    /// nor one of the other key type, nor one with none of the configured names.
    #[test]
    fn a_certificate_follows_its_label_when_its_first_name_changes() {
        crate::tls::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let old_names = vec!["mail.example.test".to_string(), "imap.example.test".to_string()];
        let old = test_task(dir.path(), &old_names);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(old_names.clone()).unwrap().self_signed(&key).unwrap();
        let (cert_path, key_path) = old.paths();
        std::fs::create_dir_all(cert_path.parent().unwrap()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(old.issuer_path(), &old.settings.directory).unwrap();
        // Unrelated pairs beside it, sorted before it: another name's, and one of the same names
        // from another directory.
        let other_key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::CertificateParams::new(vec!["other.example.test".to_string()])
            .unwrap()
            .self_signed(&other_key)
            .unwrap();
        let certs_dir = cert_path.parent().unwrap();
        std::fs::write(certs_dir.join("a-other.pem"), other.pem()).unwrap();
        std::fs::write(certs_dir.join("a-other.key"), other_key.serialize_pem()).unwrap();
        let staging = rcgen::CertificateParams::new(old_names.clone()).unwrap().self_signed(&other_key).unwrap();
        std::fs::write(certs_dir.join("b-staging.pem"), staging.pem()).unwrap();
        std::fs::write(certs_dir.join("b-staging.key"), other_key.serialize_pem()).unwrap();
        std::fs::write(certs_dir.join("b-staging.directory"), "https://staging.example/dir").unwrap();
        // And a pair from an even earlier label, with fewer of the names: not the one taken.
        let older_key = rcgen::KeyPair::generate().unwrap();
        let older = rcgen::CertificateParams::new(vec![old_names[0].clone()]).unwrap().self_signed(&older_key).unwrap();
        std::fs::write(certs_dir.join("c-older.pem"), older.pem()).unwrap();
        std::fs::write(certs_dir.join("c-older.key"), older_key.serialize_pem()).unwrap();
        std::fs::write(certs_dir.join("c-older.directory"), &old.settings.directory).unwrap();

        let new_names = ["smtp.example.test", "mail.example.test", "imap.example.test"].map(String::from).to_vec();
        let new = CertTask {
            spec: AcmeCertSpec::new(new_names.clone(), false),
            label: new_names[0].clone(),
            ..test_task(dir.path(), &new_names)
        };
        assert!(new.load_partial().is_none(), "nothing under the new label yet");
        new.adopt_previous_label_files();
        let (served, covered) = new.load_partial().expect("the old label's pair under the new one");
        assert_eq!(served.cert[0], cert.der().clone());
        assert_eq!(covered, old_names);
        assert!(new.issued_here(), "its issuer record came along");

        // An RSA certificate of the same names takes none of these ECDSA pairs.
        let rsa = CertTask {
            spec: AcmeCertSpec::new(new_names.clone(), true),
            label: "x.example.test".into(),
            ..new.clone()
        };
        rsa.adopt_previous_label_files();
        assert!(rsa.load_partial().is_none());
        assert!(!rsa.paths().0.exists());
    }

    /// A CA's Retry-After (a rate limit, up to a week) is waited out after a restart too; a
    /// time further than that from now (a clock set back) is capped.
    #[test]
    fn a_stored_rate_limit_wait_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let task = test_task(dir.path(), &["mail.example.test".to_string()]);
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        let now = SystemTime::now();
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        task.save_retry(2, now + Duration::from_secs(3 * 24 * 3600), false);
        let r = task.load_retry().unwrap();
        assert_eq!((r.failures, r.next), (2, secs(now + Duration::from_secs(3 * 24 * 3600))));
        task.save_retry(2, now + Duration::from_secs(30 * 24 * 3600), false);
        let r = task.load_retry().unwrap();
        assert!(r.next <= secs(now + MAX_RATE_LIMIT_WAIT) + 1, "{}", r.next - secs(now));
    }

    /// A Retry-After in seconds too large to add to the clock is capped before the ACME
    /// library sees it; a date or an ordinary value is left alone.
    #[test]
    fn a_huge_retry_after_is_capped() {
        let tamed = |v: &str| {
            let mut h = hyper::HeaderMap::new();
            h.insert(hyper::header::RETRY_AFTER, v.parse().unwrap());
            tame_retry_after(&mut h);
            h.get(hyper::header::RETRY_AFTER).unwrap().to_str().unwrap().to_string()
        };
        assert_eq!(tamed("9223372036854775807"), MAX_RETRY_AFTER_SECS.to_string());
        assert_eq!(tamed("18446744073709551615"), MAX_RETRY_AFTER_SECS.to_string());
        assert_eq!(tamed("86400"), "86400");
        assert_eq!(tamed("Wed, 15 Nov 2023 22:13:20 GMT"), "Wed, 15 Nov 2023 22:13:20 GMT");
    }

    #[test]
    fn alpn_challenge_certificate_is_built() {
        crate::tls::init_crypto();
        let ck = alpn_certificate("mail.example.test", &[7u8; 32]).unwrap();
        assert_eq!(dns_names(&ck).unwrap(), vec!["mail.example.test".to_string()]);
    }

    /// The renewal token file is written anew each start, owner-only, never through a link
    /// placed at its name.
    #[test]
    fn the_renewal_token_is_a_new_owner_only_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let file = dir.path().join(RENEW_TOKEN_FILE);
        std::os::unix::fs::symlink(&victim, &file).unwrap();
        let first = write_renew_token(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        let meta = std::fs::symlink_metadata(&file).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), first);
        let second = write_renew_token(dir.path()).unwrap();
        assert!(first.len() == 64 && first != second);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), second);
    }
}
