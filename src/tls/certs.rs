//! The certificate store: SNI selection over hot-swappable maps.
//!
//! One `CertStore` lives for the whole process and is shared by every listener's `ServerConfig`,
//! so swapping certificates (file change, reload, later ACME) never rebuilds a `ServerConfig` and
//! never touches a session. Lookup: exact name, then `*.parent`, then the default.
//!
//! A name (or the default) may have one certificate per key type, an ECDSA and an RSA one say,
//! as nginx and Dovecot allow: each handshake gets the first (ECDSA and EdDSA before RSA) that
//! the client can use, judged by its signature algorithms and, for a TLS 1.2-only client, its
//! cipher suites; old devices that know only RSA (printers and scanners sending mail) get RSA.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, SignatureAlgorithm, SignatureScheme};

use crate::config::{CertSpec, TlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A configured file: `field` and `position` say where the config names it.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String, field: String, position: Option<(usize, usize)> },
    #[error("self-signed certificate: {0}")]
    SelfSigned(String),
}

/// The maps one swap replaces together.
#[derive(Default)]
pub struct CertMaps {
    exact: HashMap<String, Served>,
    /// Keyed by the parent domain of `*.parent`.
    wildcard: HashMap<String, Served>,
    default: Served,
    explicit_default: bool,
    /// Without an explicit default, the first certificate's first name: a certificate of
    /// another key type for the same name joins it as the default.
    implicit_default_name: Option<String>,
    /// The default is the generated self-signed certificate (no configured one is): an issued
    /// ACME certificate answers clients without SNI before it.
    generated_default: bool,
    /// The generated self-signed certificate (`tls.self_signed_names`), if any.
    generated: Option<Arc<CertifiedKey>>,
    /// Each configured certificate's end of validity (Unix seconds), by its address: read once
    /// here rather than parsed again in handshakes.
    not_after: HashMap<usize, i64>,
    /// `tls.strict_sni`: an unknown name gets no certificate (the handshake fails).
    strict_sni: bool,
    /// What each configured pair was loaded from, to keep a good pair when its files break.
    loaded: HashMap<(PathBuf, PathBuf), (Vec<u8>, Arc<CertifiedKey>)>,
    /// (label, not-after as Unix seconds) of every certificate served.
    expiry: Vec<(String, i64)>,
    /// Why each pair that no longer loads kept its previous certificate (a reload that is only
    /// partly applied, and reported as such).
    kept: Vec<String>,
}

impl CertMaps {
    /// Why pairs that no longer load kept their previous certificate (empty when every pair
    /// loaded).
    pub fn kept(&self) -> &[String] {
        &self.kept
    }
}

/// The certificates served for one name: one per key type, in config order (`usable` prefers).
type Served = Vec<Arc<CertifiedKey>>;

pub struct CertStore {
    maps: ArcSwap<CertMaps>,
    /// Certificates obtained over ACME, by label, in the order they are configured (the first
    /// answers clients without SNI); they win over configured ones for their names.
    acme: ArcSwap<Vec<AcmeEntry>>,
    /// The configured ACME labels in config order (`retain_acme`), which `acme` keeps: tasks
    /// install concurrently and renew at any time.
    acme_order: ArcSwap<Vec<String>>,
}

#[derive(Clone)]
struct AcmeEntry {
    label: String,
    names: Vec<String>,
    key: Arc<CertifiedKey>,
    not_after: Option<i64>,
    /// A stand-in served until the CA issues the certificate: self-signed, or a stored one
    /// from another ACME directory (perhaps staging).
    placeholder: bool,
}

impl AcmeEntry {
    /// A stand-in or an expired certificate gives way to a configured one for the same name.
    fn weak(&self) -> bool {
        self.placeholder || self.not_after.is_some_and(|t| t < crate::app::unix_now())
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.maps.load();
        f.debug_struct("CertStore")
            .field("names", &m.exact.keys().collect::<Vec<_>>())
            .field("has_default", &!m.default.is_empty())
            .finish()
    }
}

impl CertStore {
    /// Load every configured pair; any failure is an error (used at start and by `check`).
    pub fn load(settings: &TlsSettings) -> Result<CertStore, CertError> {
        Ok(CertStore::with(build(settings, None)?))
    }

    fn with(maps: CertMaps) -> CertStore {
        CertStore {
            maps: ArcSwap::from_pointee(maps),
            acme: ArcSwap::from_pointee(Vec::new()),
            acme_order: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Build the maps for new settings without installing them. A pair that loaded before and is
    /// now broken keeps its previous key (logged); a new pair that is broken is an error.
    pub fn prepare(&self, settings: &TlsSettings) -> Result<CertMaps, CertError> {
        let current = self.maps.load();
        build(settings, Some(&current))
    }

    pub fn install(&self, maps: CertMaps) {
        self.maps.store(Arc::new(maps));
    }

    /// (label, not-after in Unix seconds) of every certificate served: the label is the first
    /// configured name, `default` for an unnamed default, `self-signed` for the generated one,
    /// the ACME label for an issued one; a file's whose label an ACME certificate also has (an
    /// RSA file beside an ECDSA certificate from the CA) is `NAME (file)`, its own series.
    pub fn expiries(&self) -> Vec<(String, i64)> {
        // Not a stand-in's: its year of validity would hide that the CA has issued nothing.
        let acme: Vec<(String, i64)> = self
            .acme
            .load()
            .iter()
            .filter(|e| !e.placeholder)
            .filter_map(|e| e.not_after.map(|t| (e.label.clone(), t)))
            .collect();
        let mut out = self.maps.load().expiry.clone();
        for (label, _) in &mut out {
            if acme.iter().any(|(l, _)| l == label) {
                label.push_str(" (file)");
            }
        }
        out.extend(acme);
        out
    }

    /// Set the expiry gauge afresh from `expiries`: every certificate served, each under its own
    /// label. Called with `app::GAUGES` held, at every config load and every ACME install (an
    /// issued certificate can give a file's series its ` (file)` label).
    pub fn record_expiries(&self) {
        let gauge = &crate::metrics::metrics().certificate_not_after;
        gauge.reset();
        for (label, t) in self.expiries() {
            gauge.with_label_values(&[&label]).set(t as f64);
        }
    }

    /// Whether the generated self-signed certificate is in its last 30 days: a reload (which the
    /// config watcher asks for) then makes a new one.
    pub fn self_signed_ending(&self) -> bool {
        self.maps.load().expiry.iter().any(|(label, t)| label == SELF_SIGNED_LABEL && renewal_due(*t))
    }

    /// Install (or replace) an ACME certificate. New handshakes see it at once; sessions in
    /// progress are untouched. A `placeholder` (self-signed, until the CA issues one) is served
    /// only for names no configured certificate covers.
    pub fn install_acme(&self, label: &str, names: &[String], key: Arc<CertifiedKey>, placeholder: bool) {
        let entry =
            AcmeEntry { label: label.to_string(), names: names.to_vec(), not_after: not_after(&key), key, placeholder };
        self.acme.rcu(|current| {
            let mut next: Vec<AcmeEntry> = current.iter().filter(|e| e.label != label).cloned().collect();
            next.push(entry.clone());
            // Read inside, so an install racing a reload's new order is sorted again by it.
            in_config_order(&mut next, &self.acme_order.load());
            next
        });
    }

    /// Keep only the ACME certificates whose labels are still configured (a reload that removes
    /// one, or `[acme]` altogether, stops serving it), in the order `labels` has, the config's.
    pub fn retain_acme(&self, labels: &[&str]) {
        let order: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        // Stored first: an install from now on sorts by it.
        self.acme_order.store(Arc::new(order.clone()));
        self.acme.rcu(|current| {
            let mut next: Vec<AcmeEntry> =
                current.iter().filter(|e| labels.contains(&e.label.as_str())).cloned().collect();
            in_config_order(&mut next, &order);
            next
        });
    }

    /// The ACME certificate installed under `label`, if any.
    pub fn acme_certificate(&self, label: &str) -> Option<Arc<CertifiedKey>> {
        self.acme.load().iter().find(|e| e.label == label).map(|e| e.key.clone())
    }

    /// The ACME entry for `name`, whether it is weak (see `AcmeEntry::weak`) and whether it names
    /// `name` itself (not by wildcard): the first sound one that names it, exactly or by
    /// wildcard (exact first), else the first weak one.
    /// A stand-in for a newly added name must not hide an issued wildcard that covers it. Where
    /// several sound ones name it (an ECDSA and an RSA certificate), the client (`hello`) gets
    /// the first it can use, ECDSA and EdDSA before RSA.
    fn acme_lookup(&self, name: &str, hello: Option<&Offered<'_>>) -> Option<(Arc<CertifiedKey>, bool, bool)> {
        let acme = self.acme.load();
        let parent = name.split_once('.').map(|(_, p)| p);
        let exact = || acme.iter().filter(|e| e.names.iter().any(|n| n == name));
        let wildcard =
            || acme.iter().filter(|e| e.names.iter().any(|n| n.strip_prefix("*.").is_some_and(|p| Some(p) == parent)));
        // The name's own certificates before a wildcard's, as for files, whatever their types.
        if let Some(sound) = choose(exact().filter(|e| !e.weak()), hello) {
            return Some((sound.key.clone(), false, true));
        }
        if let Some(sound) = choose(wildcard().filter(|e| !e.weak()), hello) {
            return Some((sound.key.clone(), false, false));
        }
        let weak = |e: &AcmeEntry, exact| (e.key.clone(), true, exact);
        exact().next().map(|e| weak(e, true)).or_else(|| wildcard().next().map(|e| weak(e, false)))
    }

    /// The certificate a handshake for `name` would get from a client that can use any: an
    /// ACME one, else a configured one, except that a stand-in or expired ACME certificate
    /// comes after a configured one.
    pub fn lookup(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        self.lookup_for(name, None)
    }

    /// As `lookup`, for a client that offers `hello` (its signature schemes and cipher suites):
    /// where a name has one certificate per key type, the first it can use.
    fn lookup_for(&self, name: Option<&str>, hello: Option<&Offered<'_>>) -> Option<Arc<CertifiedKey>> {
        let maps = self.maps.load();
        if let Some(name) = name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let acme = self.acme_lookup(&name, hello);
            let configured = || {
                maps.exact.get(&name).or_else(|| name.split_once('.').and_then(|(_, parent)| maps.wildcard.get(parent)))
            };
            // A configured certificate for the name itself before an ACME wildcard, as a name's
            // own entry comes before a wildcard's among files (a customer's own certificate under
            // the host's wildcard): one that is in date and that the client can use, and not the
            // generated self-signed one.
            let own_file = |ck: &&Arc<CertifiedKey>| {
                !maps.generated.as_ref().is_some_and(|g| Arc::ptr_eq(ck, g))
                    && maps.not_after.get(&(Arc::as_ptr(ck) as usize)).is_none_or(|t| *t > crate::app::unix_now())
                    && hello.is_none_or(|h| h.accepts(ck))
            };
            if let Some((_, false, false)) = &acme
                && let Some(own) = maps.exact.get(&name)
                && let Some(file) = usable(own.iter().filter(own_file), |ck: &Arc<CertifiedKey>| &**ck, hello)
            {
                return Some(file.clone());
            }
            if let Some((k, false, _)) = &acme {
                // A client that can use no ACME certificate for the name (an RSA-only device, an
                // ECDSA certificate) gets a configured one that it can, if there is one.
                if let Some(hello) = hello
                    && let Some(configured) = configured()
                    && !hello.accepts(k)
                    && let Some(usable) = configured.iter().find(|ck| hello.accepts(ck))
                {
                    return Some(usable.clone());
                }
                return Some(k.clone());
            }
            if let Some(served) = configured() {
                return pick(served, hello);
            }
            if let Some((k, true, _)) = acme {
                return Some(k);
            }
            if maps.strict_sni {
                return None;
            }
        }
        let acme = self.acme.load();
        if maps.default.is_empty() || maps.generated_default {
            // No configured default: an issued ACME certificate (the first configured) rather
            // than a generated one, for clients that send no name or an address.
            if let Some(first) = acme.iter().find(|e| !e.weak()) {
                // With the other half of its pair, if any (the same label but for `+rsa`).
                let pair = acme.iter().filter(|e| !e.weak() && pair_base(&e.label) == pair_base(&first.label));
                return choose(pair, hello).map(|e| e.key.clone());
            }
        }
        pick(&maps.default, hello).or_else(|| acme.first().map(|e| e.key.clone()))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = Offered { schemes: hello.signature_schemes(), suites: hello.cipher_suites() };
        self.lookup_for(hello.server_name(), Some(&offered))
    }
}

/// Sort ACME entries as their labels are configured (any not configured last, as they were).
fn in_config_order(entries: &mut [AcmeEntry], order: &[String]) {
    entries.sort_by_key(|e| order.iter().position(|l| *l == e.label).unwrap_or(usize::MAX));
}

/// An ACME label without the `+rsa` that sets the RSA half of a pair apart.
fn pair_base(label: &str) -> &str {
    label.strip_suffix("+rsa").unwrap_or(label)
}

/// Of one name's candidates (one per key type, their certificates given by `key`), the first
/// the client can use, ECDSA and EdDSA before RSA; the first of all when there is only one,
/// nothing is known of the client, or it can use none (the handshake then fails as it would
/// have). Only with several is the client's offer looked at.
fn usable<'a, T>(
    candidates: impl Iterator<Item = &'a T> + Clone,
    key: impl Fn(&T) -> &CertifiedKey,
    hello: Option<&Offered<'_>>,
) -> Option<&'a T> {
    let first = candidates.clone().next()?;
    if let Some(hello) = hello
        && candidates.clone().nth(1).is_some()
    {
        let rsa = |c: &&T| key(c).key.algorithm() == SignatureAlgorithm::RSA;
        let by_type = candidates.clone().filter(|c| !rsa(c)).chain(candidates.filter(rsa));
        if let Some(found) = by_type.into_iter().find(|c| hello.accepts(key(c))) {
            return Some(found);
        }
    }
    Some(first)
}

/// `usable` among ACME entries.
fn choose<'a>(
    entries: impl Iterator<Item = &'a AcmeEntry> + Clone,
    hello: Option<&Offered<'_>>,
) -> Option<&'a AcmeEntry> {
    usable(entries, |e: &AcmeEntry| &*e.key, hello)
}

/// What a client offers that decides which key type it can be served.
struct Offered<'a> {
    schemes: &'a [SignatureScheme],
    suites: &'a [CipherSuite],
}

impl Offered<'_> {
    /// Whether the client can verify `ck`: its key signs with a scheme the client offers, and a
    /// client without TLS 1.3 offers a TLS 1.2 suite for that key type (the suite, not the
    /// signature list, is what old RSA-only stacks get right).
    fn accepts(&self, ck: &CertifiedKey) -> bool {
        let tls13 = self.suites.iter().any(|s| {
            matches!(
                s,
                CipherSuite::TLS13_AES_128_GCM_SHA256
                    | CipherSuite::TLS13_AES_256_GCM_SHA384
                    | CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            )
        });
        let alg = ck.key.algorithm();
        ck.key.choose_scheme(self.schemes).is_some()
            && (tls13 || self.suites.iter().any(|s| tls12_key_type(*s) == Some(signing_type(alg))))
    }
}

/// The TLS 1.2 suites' view of a key type: ECDHE_ECDSA suites serve EdDSA keys too (RFC 8422).
fn signing_type(alg: SignatureAlgorithm) -> SignatureAlgorithm {
    match alg {
        SignatureAlgorithm::ED25519 | SignatureAlgorithm::ED448 => SignatureAlgorithm::ECDSA,
        other => other,
    }
}

/// The key type a TLS 1.2 ECDHE suite is for (rustls offers no others).
fn tls12_key_type(suite: CipherSuite) -> Option<SignatureAlgorithm> {
    match suite {
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => Some(SignatureAlgorithm::ECDSA),
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(SignatureAlgorithm::RSA),
        _ => None,
    }
}

/// `usable` among a name's configured certificates.
fn pick(served: &[Arc<CertifiedKey>], hello: Option<&Offered<'_>>) -> Option<Arc<CertifiedKey>> {
    usable(served.iter(), |ck: &Arc<CertifiedKey>| &**ck, hello).cloned()
}

fn build(settings: &TlsSettings, previous: Option<&CertMaps>) -> Result<CertMaps, CertError> {
    let mut maps = CertMaps { strict_sni: settings.strict_sni, ..CertMaps::default() };
    // Which certificate serves each name, and the default, for each key type: a second of the
    // same type would never be served, and the expiry alert would watch the wrong one.
    let mut owner: HashMap<(Option<&str>, String), usize> = HashMap::new();
    for (i, spec) in settings.certificates.iter().enumerate() {
        let key = (spec.cert.clone(), spec.key.clone());
        let certified = match read_pair(spec) {
            Ok((bytes, ck)) => {
                maps.loaded.insert(key, (bytes, ck.clone()));
                ck
            }
            // The previous certificate of these files, while they do not load, as long as it
            // covers the names now listed: served under a name added since, it would fail
            // every client's host name check where another certificate may cover the name.
            Err(e) => {
                match previous.and_then(|p| p.loaded.get(&key)).filter(|(_, ck)| covers_names(spec, ck).is_ok()) {
                    Some((bytes, ck)) => {
                        tracing::error!(error = %e, "certificate reload failed; keeping the previous certificate");
                        maps.kept.push(e.to_string());
                        maps.loaded.insert(key, (bytes.clone(), ck.clone()));
                        ck.clone()
                    }
                    None => return Err(e),
                }
            }
        };
        let key_type = key_type_name(certified.key.algorithm());
        let served_as = spec.names.iter().map(|n| Some(n.as_str())).chain(spec.default.then_some(None));
        for name in served_as {
            if let Some(first) = owner.insert((name, key_type.clone()), i).filter(|first| *first != i) {
                let what = name.map_or_else(|| "the default".to_string(), |n| format!("{n:?}"));
                return Err(CertError::File {
                    path: spec.cert.clone(),
                    message: format!(
                        "{what} is already served by tls.certificate[{first}] with an {key_type} key: one certificate per name and key type (keep the one to serve)"
                    ),
                    field: spec.origin[0].0.clone(),
                    position: spec.origin[0].1,
                });
            }
        }
        let mut label = spec.names.first().cloned().unwrap_or_else(|| "default".into());
        if maps.expiry.iter().any(|(l, _)| *l == label) {
            // The second key type for the same names: a series of its own.
            label = format!("{label} ({key_type})");
        }
        if let Some(t) = not_after(&certified) {
            maps.expiry.push((label, t));
        }
        add(&mut maps, spec, certified);
    }
    if !settings.self_signed_names.is_empty() {
        let names = settings.self_signed_names.clone();
        // Reuse the previous self-signed key if the names did not change: clients that pinned it
        // keep working across reloads. Not within 30 days of its end (a year after it was
        // made): a process that runs that long makes a new one at a reload.
        let fresh = |ck: &Arc<CertifiedKey>| not_after(ck).is_some_and(|t| !renewal_due(t));
        let cached = previous.and_then(|p| p.loaded.get(&self_signed_key(&names))).filter(|(_, ck)| fresh(ck)).cloned();
        // Only where nothing configured is served, a wildcard's certificate included: a
        // configured certificate (of any key type) for a name must not be put behind a
        // generated one.
        let uncovered: Vec<String> =
            names.iter().map(|n| n.to_ascii_lowercase()).filter(|n| !configured_for(&maps, n)).collect();
        let (bytes, ck) = match cached {
            Some(c) => c,
            None => {
                if !uncovered.is_empty() {
                    tracing::warn!(names = ?uncovered, "no certificate configured for these names: using a self-signed certificate");
                }
                (Vec::new(), self_signed(&names)?)
            }
        };
        maps.loaded.insert(self_signed_key(&names), (bytes, ck.clone()));
        maps.generated_default = maps.default.is_empty();
        maps.generated = Some(ck.clone());
        if let Some(t) = not_after(&ck) {
            maps.expiry.push((SELF_SIGNED_LABEL.into(), t));
        }
        for name in &uncovered {
            served_mut(&mut maps, name).push(ck.clone());
        }
        if maps.default.is_empty() {
            maps.default.push(ck);
        }
    }
    Ok(maps)
}

/// The expiry label of the generated self-signed certificate.
const SELF_SIGNED_LABEL: &str = "self-signed";

/// Whether a generated self-signed certificate ending at `not_after` (Unix seconds) is in its
/// last 30 days, when a reload makes a new one.
fn renewal_due(not_after: i64) -> bool {
    not_after < crate::app::unix_now() + 30 * 86_400
}

/// The leaf certificate's notAfter, in Unix seconds.
fn not_after(ck: &CertifiedKey) -> Option<i64> {
    let leaf = ck.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn self_signed_key(names: &[String]) -> (PathBuf, PathBuf) {
    (PathBuf::from(format!("self-signed:{}", names.join(","))), PathBuf::new())
}

fn add(maps: &mut CertMaps, spec: &CertSpec, ck: Arc<CertifiedKey>) {
    if let Some(t) = not_after(&ck) {
        maps.not_after.insert(Arc::as_ptr(&ck) as usize, t);
    }
    for name in &spec.names {
        serve(served_mut(maps, name), &ck);
    }
    if spec.default {
        if !maps.explicit_default {
            maps.default.clear();
            maps.explicit_default = true;
        }
        serve(&mut maps.default, &ck);
    } else if !maps.explicit_default {
        // Without an explicit default, the first certificate answers clients without SNI, and
        // with it one of another key type for the same (first) name.
        match &maps.implicit_default_name {
            None => {
                maps.implicit_default_name = spec.names.first().cloned();
                serve(&mut maps.default, &ck);
            }
            Some(first) if spec.names.first() == Some(first) => serve(&mut maps.default, &ck),
            Some(_) => {}
        }
    }
}

/// Add `ck` to a name's certificates unless one of its key type is there already (the first
/// listed wins).
fn serve(served: &mut Served, ck: &Arc<CertifiedKey>) {
    if !served.iter().any(|c| c.key.algorithm() == ck.key.algorithm()) {
        served.push(ck.clone());
    }
}

/// The certificates served for `name` (`*.parent` in the wildcard map), made empty if none.
/// Whether a configured certificate is served for `name` (lower case): its own, or for a
/// wildcard covering it (one label, as the lookup matches).
fn configured_for(maps: &CertMaps, name: &str) -> bool {
    let has = |served: Option<&Served>| served.is_some_and(|s| !s.is_empty());
    match name.strip_prefix("*.") {
        Some(parent) => has(maps.wildcard.get(parent)),
        None => {
            has(maps.exact.get(name)) || name.split_once('.').is_some_and(|(_, parent)| has(maps.wildcard.get(parent)))
        }
    }
}

fn served_mut<'a>(maps: &'a mut CertMaps, name: &str) -> &'a mut Served {
    match name.strip_prefix("*.") {
        Some(parent) => maps.wildcard.entry(parent.to_string()).or_default(),
        None => maps.exact.entry(name.to_string()).or_default(),
    }
}

/// A key type as the config's errors and the expiry series name it.
fn key_type_name(alg: SignatureAlgorithm) -> String {
    match alg {
        SignatureAlgorithm::RSA => "RSA".into(),
        SignatureAlgorithm::ECDSA => "ECDSA".into(),
        SignatureAlgorithm::ED25519 => "Ed25519".into(),
        other => format!("{other:?}"),
    }
}

/// An error about one of `spec`'s files, placed at its line in the config.
fn spec_file_err(spec: &CertSpec, path: &Path, message: String) -> CertError {
    let (field, position) = if path == spec.cert { spec.origin[0].clone() } else { spec.origin[1].clone() };
    CertError::File { path: path.to_path_buf(), message, field, position }
}

/// Read and check one certificate/key pair; returns the raw bytes (for change detection) too.
fn read_pair(spec: &CertSpec) -> Result<(Vec<u8>, Arc<CertifiedKey>), CertError> {
    let file_err = |path: &Path, message: String| spec_file_err(spec, path, message);
    let cert_bytes = std::fs::read(&spec.cert).map_err(|e| file_err(&spec.cert, e.to_string()))?;
    let key_bytes = std::fs::read(&spec.key).map_err(|e| file_err(&spec.key, e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&spec.cert, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(&spec.cert, "no certificate in file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| file_err(&spec.key, format!("bad private key PEM: {e}")))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let ck = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| file_err(&spec.key, format!("certificate and key do not match or are unsupported: {e}")))?;
    covers_names(spec, &ck)?;
    let mut bytes = cert_bytes;
    bytes.extend_from_slice(&key_bytes);
    Ok((bytes, Arc::new(ck)))
}

/// Served by SNI for `names` alone: a name the certificate does not cover would fail every
/// client's host name check (a certificate renewed without one of its names, a file mixed up,
/// a name added to the list that no file covers).
fn covers_names(spec: &CertSpec, ck: &CertifiedKey) -> Result<(), CertError> {
    let mut has = dns_names(ck).unwrap_or_default();
    if has.is_empty() {
        // No subjectAltName: the subject's CN, which clients built on OpenSSL still match then
        // (X509_check_host), though browsers and newer stacks do not.
        has = common_names(ck);
        if !has.is_empty() {
            tracing::warn!(path = %spec.cert.display(), names = ?has,
                "certificate has no DNS name in a subjectAltName, only a CN: many clients (Apple Mail, Chrome, Go, rustls) refuse it");
        }
    }
    if let Some(name) = spec.names.iter().find(|n| !covers(&has, n)) {
        let what = if has.is_empty() { "no DNS names".to_string() } else { has.join(", ") };
        return Err(spec_file_err(
            spec,
            &spec.cert,
            format!(
                "the certificate does not cover {name:?}, which names lists (it has {what}): clients asking for that name would refuse it"
            ),
        ));
    }
    Ok(())
}

/// The DNS names of a certificate's subjectAltName, lower case (its CN is not read here).
pub(crate) fn dns_names(ck: &CertifiedKey) -> Option<Vec<String>> {
    let leaf = ck.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    Some(
        san.value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
    )
}

/// The subject's common names, lower case.
fn common_names(ck: &CertifiedKey) -> Vec<String> {
    let Some(leaf) = ck.cert.first() else { return Vec::new() };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else { return Vec::new() };
    cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(|cn| cn.to_ascii_lowercase()).collect()
}

/// Whether a certificate with the DNS names `has` is good for `name` (lower case; `*.parent`
/// only for itself): the name itself, or a wildcard one label above it.
fn covers(has: &[String], name: &str) -> bool {
    has.iter().any(|h| {
        h == name
            || h.strip_prefix("*.").is_some_and(|parent| {
                name.split_once('.').is_some_and(|(label, rest)| label != "*" && !label.is_empty() && rest == parent)
            })
    })
}

/// A self-signed ECDSA P-256 certificate for `names`, for demos and first starts.
pub fn self_signed(names: &[String]) -> Result<Arc<CertifiedKey>, CertError> {
    // A year, like a real certificate, so expiry metrics and alerts mean something.
    self_signed_for(names, 365)
}

fn self_signed_for(names: &[String], days: i64) -> Result<Arc<CertifiedKey>, CertError> {
    let err = |e: rcgen::Error| CertError::SelfSigned(e.to_string());
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
    let signing_key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&signing_key).map_err(err)?;
    let chain = vec![cert.der().clone()];
    let key = PrivateKeyDer::try_from(signing_key.serialize_der()).map_err(|e| CertError::SelfSigned(e.to_string()))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|e| CertError::SelfSigned(e.to_string()))?;
    Ok(Arc::new(ck))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated self-signed certificate is kept across reloads (clients may have pinned
    /// it), but not into its last 30 days: a process that runs for a year gets a new one.
    #[test]
    fn the_self_signed_certificate_is_renewed_before_it_ends() {
        crate::tls::init_crypto();
        let names = vec!["localhost".to_string()];
        let settings = tls_settings(Vec::new(), &["localhost"]);
        let first = build(&settings, None).unwrap();
        let key = self_signed_key(&names);
        let same = |a: &CertMaps, b: &CertMaps| a.loaded[&key].1.cert[0] == b.loaded[&key].1.cert[0];
        let again = build(&settings, Some(&first)).unwrap();
        assert!(same(&first, &again), "kept across a reload");
        let mut ending = again;
        let old = self_signed_for(&names, 10).unwrap();
        ending.loaded.insert(key.clone(), (Vec::new(), old));
        let renewed = build(&settings, Some(&ending)).unwrap();
        assert!(!same(&ending, &renewed), "renewed 10 days before its end");
        // What the config watcher asks before forcing that reload.
        let store = |maps: &CertMaps| {
            let m = CertMaps { expiry: maps.expiry.clone(), ..CertMaps::default() };
            CertStore::with(m)
        };
        ending.expiry = vec![(SELF_SIGNED_LABEL.into(), not_after(&ending.loaded[&key].1).unwrap_or(0))];
        assert!(store(&ending).self_signed_ending());
        assert!(!store(&renewed).self_signed_ending());
        assert!(not_after(&renewed.loaded[&key].1).is_some_and(|t| t > crate::app::unix_now() + 300 * 86_400));
    }

    /// TLS settings with these configured certificates and self-signed names, the rest default.
    fn tls_settings(certificates: Vec<CertSpec>, self_signed_names: &[&str]) -> TlsSettings {
        TlsSettings {
            certificates,
            self_signed_names: self_signed_names.iter().map(|n| n.to_string()).collect(),
            session_tickets: 1,
            cipher_suites: Vec::new(),
            strict_sni: false,
        }
    }

    /// A client that takes ECDSA and RSA, over TLS 1.3 or 1.2.
    const MODERN: Offered<'static> = Offered {
        schemes: &[SignatureScheme::ECDSA_NISTP256_SHA256, SignatureScheme::RSA_PSS_SHA256],
        suites: &[CipherSuite::TLS13_AES_128_GCM_SHA256, CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256],
    };
    /// A client that knows only RSA signatures.
    const RSA_ONLY: Offered<'static> = Offered {
        schemes: &[SignatureScheme::RSA_PSS_SHA256, SignatureScheme::RSA_PKCS1_SHA256],
        suites: &[CipherSuite::TLS13_AES_128_GCM_SHA256],
    };

    /// A certificate for `names` with a new key of `alg`, written as `NAME.pem`/`NAME.key` in
    /// `dir`, and its spec as the config would give it (index `i`).
    /// A self-signed RSA certificate for `names`, as an ACME one of that key type would be.
    fn rsa_self_signed(names: &[String]) -> Arc<CertifiedKey> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(names.to_vec()).unwrap().self_signed(&key).unwrap();
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        Arc::new(
            CertifiedKey::from_der(vec![cert.der().clone()], der, &rustls::crypto::aws_lc_rs::default_provider())
                .unwrap(),
        )
    }

    fn pair(dir: &Path, name: &str, alg: &'static rcgen::SignatureAlgorithm, names: &[&str], i: usize) -> CertSpec {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names.clone()).unwrap().self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        CertSpec {
            cert: cert_path,
            key: key_path,
            origin: [
                (format!("tls.certificate[{i}].cert"), Some((i + 1, 1))),
                (format!("tls.certificate[{i}].key"), None),
            ],
            names: names.into_iter().filter(|n| !n.is_empty()).collect(),
            default: false,
        }
    }

    /// A certificate is served by SNI for the names the config lists: one that does not cover
    /// them (its own subjectAltName, a wildcard one label above) is refused where it is named.
    #[test]
    fn listed_names_must_be_covered_by_the_certificate() {
        crate::tls::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let load = |cert_names: &[&str], listed: &[&str]| {
            let mut spec = pair(dir.path(), "c", &rcgen::PKCS_ECDSA_P256_SHA256, cert_names, 0);
            spec.names = listed.iter().map(|n| n.to_string()).collect();
            CertStore::load(&tls_settings(vec![spec], &[]))
        };
        assert!(load(&["mail.example.org"], &["mail.example.org"]).is_ok());
        // A certificate with no subjectAltName, only a CN (OpenSSL-based clients still take it).
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "Mail.Example.org");
        let cn_only = params.self_signed(&key).unwrap();
        let spec = CertSpec {
            cert: dir.path().join("cn.pem"),
            key: dir.path().join("cn.key"),
            origin: [("tls.certificate[0].cert".into(), None), ("tls.certificate[0].key".into(), None)],
            names: vec!["mail.example.org".into()],
            default: false,
        };
        std::fs::write(&spec.cert, cn_only.pem()).unwrap();
        std::fs::write(&spec.key, key.serialize_pem()).unwrap();
        assert!(CertStore::load(&tls_settings(vec![spec.clone()], &[])).is_ok());
        let other = CertSpec { names: vec!["imap.example.org".into()], ..spec };
        assert!(CertStore::load(&tls_settings(vec![other], &[])).is_err());
        assert!(load(&["*.example.org"], &["mail.example.org", "*.example.org"]).is_ok());
        for (cert_names, listed) in [
            (&["mail.example.org"][..], &["imap.example.org"][..]),
            (&["*.example.org"], &["a.b.example.org"]),
            (&["*.example.org"], &["example.org"]),
            (&["mail.example.org"], &["*.example.org"]),
        ] {
            let Err(CertError::File { field, message, .. }) = load(cert_names, listed) else {
                panic!("{listed:?} served with a certificate for {cert_names:?}")
            };
            assert_eq!(field, "tls.certificate[0].cert");
            assert!(message.contains(&format!("does not cover {:?}", listed[0])), "{message}");
        }
    }

    /// One certificate per name and key type: an ECDSA and an RSA certificate for the same
    /// names are both served, each client getting the first it can use (ECDSA first, whichever
    /// is listed first), also without SNI; two of one type for a name are refused at the
    /// second's `cert`; each has its own expiry series.
    #[test]
    fn one_certificate_per_name_and_key_type() {
        crate::tls::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let names = ["mail.example.org", "*.example.org"];
        let rsa = pair(dir.path(), "rsa", &rcgen::PKCS_RSA_SHA256, &names, 0);
        let ecdsa = pair(dir.path(), "ecdsa", &rcgen::PKCS_ECDSA_P256_SHA256, &names, 1);
        let settings = tls_settings(vec![rsa, ecdsa], &[]);
        let store = CertStore::load(&settings).unwrap();
        // An old TLS 1.2 stack that lists ECDSA signatures but has no ECDSA suite.
        let tls12_rsa_suites = Offered {
            schemes: &[SignatureScheme::ECDSA_NISTP256_SHA256, SignatureScheme::RSA_PKCS1_SHA256],
            suites: &[CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256],
        };
        let alg =
            |name: Option<&str>, hello: &Offered<'_>| store.lookup_for(name, Some(hello)).unwrap().key.algorithm();
        for name in [Some("mail.example.org"), Some("imap.example.org"), None] {
            assert_eq!(alg(name, &MODERN), SignatureAlgorithm::ECDSA, "{name:?}");
            assert_eq!(alg(name, &RSA_ONLY), SignatureAlgorithm::RSA, "{name:?}");
            assert_eq!(alg(name, &tls12_rsa_suites), SignatureAlgorithm::RSA, "{name:?}");
        }
        let mut labels: Vec<String> = store.expiries().into_iter().map(|(l, _)| l).collect();
        labels.sort();
        assert_eq!(labels, ["mail.example.org", "mail.example.org (ECDSA)"]);

        // A second ECDSA certificate for one of the names: refused where the config names it.
        let again =
            pair(dir.path(), "again", &rcgen::PKCS_ECDSA_P256_SHA256, &["imap.example.org", "mail.example.org"], 2);
        let mut twice = settings.clone();
        twice.certificates.push(again);
        let Err(CertError::File { field, position, message, .. }) = CertStore::load(&twice) else {
            panic!("two ECDSA certificates for one name were accepted")
        };
        assert_eq!((field.as_str(), position), ("tls.certificate[2].cert", Some((3, 1))));
        assert!(
            message.contains("\"mail.example.org\" is already served by tls.certificate[1] with an ECDSA key"),
            "{message}"
        );
        // Two defaults of one type likewise; of two types, fine.
        let mut defaults = settings.clone();
        for c in &mut defaults.certificates {
            c.default = true;
        }
        let store = CertStore::load(&defaults).unwrap();
        assert_eq!(store.lookup_for(None, Some(&RSA_ONLY)).unwrap().key.algorithm(), SignatureAlgorithm::RSA);
        defaults.certificates[1] = pair(dir.path(), "rsa2", &rcgen::PKCS_RSA_SHA256, &["pop.example.org"], 1);
        defaults.certificates[1].default = true;
        let Err(CertError::File { message, .. }) = CertStore::load(&defaults) else { panic!("two RSA defaults") };
        assert!(message.contains("the default is already served by tls.certificate[0] with an RSA key"), "{message}");

        // A generated certificate serves only names nothing configured does: not put ahead of
        // a configured RSA one (ECDSA first) for the same name, nor joining its default.
        let mut generated = settings.clone();
        generated.certificates.truncate(1);
        generated.self_signed_names =
            vec!["mail.example.org".into(), "other.example.org".into(), "other.example.net".into()];
        let store = CertStore::load(&generated).unwrap();
        let alg = |name: Option<&str>| store.lookup_for(name, Some(&MODERN)).unwrap().key.algorithm();
        assert_eq!(alg(Some("mail.example.org")), SignatureAlgorithm::RSA);
        assert_eq!(alg(None), SignatureAlgorithm::RSA);
        // Nor ahead of the configured wildcard that covers a name.
        assert_eq!(alg(Some("other.example.org")), SignatureAlgorithm::RSA);
        assert_eq!(alg(Some("other.example.net")), SignatureAlgorithm::ECDSA);
    }

    /// A configured wildcard covers a name left in `self_signed_names` (from a first start): the
    /// name gets the wildcard's certificate, not the generated one, which the exact-name map
    /// would otherwise put first.
    #[test]
    fn a_configured_wildcard_is_not_put_behind_a_generated_certificate() {
        crate::tls::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let wildcard = pair(dir.path(), "wild", &rcgen::PKCS_ECDSA_P256_SHA256, &["*.example.org"], 0);
        let store = CertStore::load(&tls_settings(
            vec![wildcard],
            &["MAIL.example.org", "mail.example.net", "a.b.example.org"],
        ))
        .unwrap();
        let wild = store.lookup(Some("www.example.org")).unwrap();
        let generated = store.lookup(Some("mail.example.net")).unwrap();
        assert!(wild.cert[0] != generated.cert[0]);
        assert!(store.lookup(Some("mail.example.org")).unwrap().cert[0] == wild.cert[0]);
        // Two labels below the wildcard's: not covered by it.
        assert!(store.lookup(Some("a.b.example.org")).unwrap().cert[0] == generated.cert[0]);
    }

    /// Clients without SNI get the first configured ACME certificate, whichever order the
    /// tasks installed or renewed them in; and a configured file for a name itself is served
    /// before an ACME wildcard that covers it (a customer's own certificate under the host's
    /// wildcard), while the generated self-signed one is not.
    #[test]
    fn acme_order_is_the_configs_and_a_files_own_name_beats_an_acme_wildcard() {
        crate::tls::init_crypto();
        let store = CertStore::load(&tls_settings(Vec::new(), &["localhost", "mail.example.org"])).unwrap();
        let a = self_signed(&["a.example.net".to_string()]).unwrap();
        let b = self_signed(&["b.example.net".to_string()]).unwrap();
        store.retain_acme(&["a.example.net", "b.example.net"]);
        store.install_acme("b.example.net", &["b.example.net".into()], b.clone(), false);
        store.install_acme("a.example.net", &["a.example.net".into()], a.clone(), false);
        assert!(store.lookup(None).unwrap().cert[0] == a.cert[0]);
        // A renewal of the first does not move it behind the others.
        store.install_acme("a.example.net", &["a.example.net".into()], a.clone(), false);
        assert!(store.lookup(None).unwrap().cert[0] == a.cert[0]);
        store.install_acme("b.example.net", &["b.example.net".into()], b.clone(), false);
        assert!(store.lookup(None).unwrap().cert[0] == a.cert[0]);
        // A reload that configures them the other way round.
        store.retain_acme(&["b.example.net", "a.example.net"]);
        assert!(store.lookup(None).unwrap().cert[0] == b.cert[0]);

        let wildcard = self_signed(&["*.example.org".to_string()]).unwrap();
        store.install_acme("*.example.org", &["*.example.org".into()], wildcard.clone(), false);
        // Only the generated certificate names mail.example.org: the issued wildcard wins.
        assert!(store.lookup(Some("mail.example.org")).unwrap().cert[0] == wildcard.cert[0]);

        let dir = tempfile::tempdir().unwrap();
        let own = pair(dir.path(), "own", &rcgen::PKCS_ECDSA_P256_SHA256, &["mail.example.org"], 0);
        let store = CertStore::load(&tls_settings(vec![own], &[])).unwrap();
        let file = store.lookup(Some("mail.example.org")).unwrap();
        store.install_acme("*.example.org", &["*.example.org".into()], wildcard.clone(), false);
        assert!(store.lookup(Some("mail.example.org")).unwrap().cert[0] == file.cert[0]);
        assert!(store.lookup(Some("pop.example.org")).unwrap().cert[0] == wildcard.cert[0]);
        // A client that cannot use the file's key type gets the wildcard (the file is ECDSA,
        // the wildcard here RSA).
        let rsa_wildcard = rsa_self_signed(&["*.example.org".to_string()]);
        store.install_acme("*.example.org", &["*.example.org".into()], rsa_wildcard.clone(), false);
        assert!(store.lookup_for(Some("mail.example.org"), Some(&RSA_ONLY)).unwrap().cert[0] == rsa_wildcard.cert[0]);
        assert!(store.lookup_for(Some("mail.example.org"), Some(&MODERN)).unwrap().cert[0] == file.cert[0]);
        // An expired file does not hide an issued wildcard.
        let dir = tempfile::tempdir().unwrap();
        let old = pair(dir.path(), "old", &rcgen::PKCS_ECDSA_P256_SHA256, &["mail.example.org"], 0);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["mail.example.org".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        std::fs::write(&old.cert, params.self_signed(&key).unwrap().pem()).unwrap();
        std::fs::write(&old.key, key.serialize_pem()).unwrap();
        let expired = CertStore::load(&tls_settings(vec![old], &[])).unwrap();
        expired.install_acme("*.example.org", &["*.example.org".into()], wildcard.clone(), false);
        assert!(expired.lookup(Some("mail.example.org")).unwrap().cert[0] == wildcard.cert[0]);
        // An ACME certificate for the name itself still comes first.
        let exact = self_signed(&["mail.example.org".to_string()]).unwrap();
        store.install_acme("mail.example.org", &["mail.example.org".into()], exact.clone(), false);
        assert!(store.lookup(Some("mail.example.org")).unwrap().cert[0] == exact.cert[0]);
    }

    /// An issued ACME certificate wins for its names, except for a client that cannot use its
    /// key type, which gets a configured certificate for the name that it can (an RSA one from
    /// files beside an ECDSA one from the CA).
    #[test]
    fn a_configured_certificate_serves_clients_the_acme_key_type_does_not() {
        crate::tls::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let rsa = pair(dir.path(), "rsa", &rcgen::PKCS_RSA_SHA256, &["mail.example.org"], 0);
        let settings = tls_settings(vec![rsa], &[]);
        let store = CertStore::load(&settings).unwrap();
        let names = vec!["mail.example.org".to_string(), "imap.example.org".to_string()];
        let issued = self_signed(&names).unwrap();
        store.install_acme("mail.example.org", &names, issued.clone(), false);
        let served = |name: &str, hello: &Offered<'_>| store.lookup_for(Some(name), Some(hello)).unwrap();
        assert!(served("mail.example.org", &MODERN).cert[0] == issued.cert[0]);
        // Each has its own expiry series: the file's is not hidden behind the ACME one's label.
        let mut labels: Vec<String> = store.expiries().into_iter().map(|(l, _)| l).collect();
        labels.sort();
        assert_eq!(labels, ["mail.example.org", "mail.example.org (file)"]);
        {
            // And the gauge has both, as an ACME install sets it (not the ACME label's alone,
            // which the file's expiry was recorded under before the install).
            let _gauges = crate::app::GAUGES.lock().unwrap_or_else(|e| e.into_inner());
            store.record_expiries();
            let gauge = &crate::metrics::metrics().certificate_not_after;
            for (label, t) in store.expiries() {
                assert_eq!(gauge.with_label_values(&[&label]).get(), t as f64, "{label}");
            }
            assert_ne!(
                gauge.with_label_values(&["mail.example.org"]).get(),
                gauge.with_label_values(&["mail.example.org (file)"]).get()
            );
        }
        assert_eq!(served("mail.example.org", &RSA_ONLY).key.algorithm(), SignatureAlgorithm::RSA);
        // Nothing configured for the name: the ACME certificate (the handshake then fails).
        assert!(served("imap.example.org", &RSA_ONLY).cert[0] == issued.cert[0]);

        // An RSA certificate from ACME as well, for the same names: each client gets the ACME
        // one it can use, whichever was installed first, with SNI and (no default configured
        // but a generated one) without.
        let store = CertStore::load(&tls_settings(Vec::new(), &["localhost"])).unwrap();
        let rsa_issued = rsa_self_signed(&names);
        store.install_acme("mail.example.org+rsa", &names, rsa_issued.clone(), false);
        store.install_acme("mail.example.org", &names, issued.clone(), false);
        for name in [Some("imap.example.org"), None] {
            let served = |hello: &Offered<'_>| store.lookup_for(name, Some(hello)).unwrap();
            assert!(served(&MODERN).cert[0] == issued.cert[0], "{name:?}");
            assert!(served(&RSA_ONLY).cert[0] == rsa_issued.cert[0], "{name:?}");
        }
        // A name's own certificate before a wildcard's, whatever their key types.
        let wildcard = self_signed(&["*.example.org".to_string()]).unwrap();
        store.retain_acme(&["mail.example.org+rsa"]);
        store.install_acme("*.example.org", &["*.example.org".into()], wildcard.clone(), false);
        assert!(store.lookup_for(Some("mail.example.org"), Some(&MODERN)).unwrap().cert[0] == rsa_issued.cert[0]);
        assert!(store.lookup_for(Some("pop.example.org"), Some(&MODERN)).unwrap().cert[0] == wildcard.cert[0]);
    }

    /// ACME certificates win for their names, except a stand-in (before the CA has issued one)
    /// or an expired one, which give way to a configured certificate; a label no longer
    /// configured stops being served; a stand-in's expiry is not reported.
    #[test]
    fn acme_layer_order_and_removal() {
        crate::tls::init_crypto();
        let names = vec!["mail.example.test".to_string()];
        let text = r#"
[tls]
self_signed_names = ["mail.example.test"]
[auth]
source = "backend"
[[backend]]
name = "b"
address = "127.0.0.1:143"
[routing.imap]
default = "b"
"#;
        let config = crate::config::Config::parse(std::path::Path::new("/etc/portcullis/p.toml"), text).unwrap();
        let store = CertStore::load(&config.tls).unwrap();
        let configured = store.lookup(Some("mail.example.test")).unwrap();
        let same = |a: &Arc<CertifiedKey>, b: &Arc<CertifiedKey>| a.cert[0] == b.cert[0];

        let placeholder = self_signed(&names).unwrap();
        store.install_acme("mail.example.test", &names, placeholder.clone(), true);
        assert!(same(&store.lookup(Some("mail.example.test")).unwrap(), &configured));
        assert!(!store.expiries().iter().any(|(l, _)| l == "mail.example.test"));
        // For a name nothing configured covers, the stand-in is served.
        store.install_acme("other.example.test", &["other.example.test".into()], placeholder.clone(), true);
        assert!(same(&store.lookup(Some("other.example.test")).unwrap(), &placeholder));

        let issued = self_signed(&names).unwrap();
        store.install_acme("mail.example.test", &names, issued.clone(), false);
        assert!(same(&store.lookup(Some("mail.example.test")).unwrap(), &issued));
        assert!(store.expiries().iter().any(|(l, _)| l == "mail.example.test"));

        // No name (or an address): the issued ACME certificate, not the generated default.
        assert!(same(&store.lookup(None).unwrap(), &issued));

        store.retain_acme(&["other.example.test"]);
        assert!(same(&store.lookup(Some("mail.example.test")).unwrap(), &configured));
        store.retain_acme(&[]);
        assert!(store.acme_certificate("other.example.test").is_none());
        assert!(same(&store.lookup(None).unwrap(), &configured), "the generated default again");

        // A stand-in for a newly added name gives way to an issued wildcard that covers it.
        let wildcard = self_signed(&["*.example.test".to_string()]).unwrap();
        store.install_acme("wild", &["*.example.test".into()], wildcard.clone(), false);
        store.install_acme("new.example.test", &["new.example.test".into()], placeholder.clone(), true);
        assert!(same(&store.lookup(Some("new.example.test")).unwrap(), &wildcard));
    }
}
