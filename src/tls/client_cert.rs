//! Client certificates on a listener (nginx's `ssl_verify_client`; reliability case 21).
//!
//! The handshake only asks for a certificate and checks that the client holds its key (the
//! CertificateVerify signature); it never fails for the certificate itself. The chain is checked
//! after the handshake, by `ClientAuth::check`, so that a client with no certificate or a bad one
//! gets the protocol's own error line (as nginx sends) instead of a bare TLS alert, and so that
//! `optional_no_ca` can pass the verdict on to the auth service.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::{ClientCertSettings, VerifyClient};

/// One listener's client-certificate policy.
#[derive(Debug)]
pub struct ClientAuth {
    mode: VerifyClient,
    /// The listener's CAs (none for `optional_no_ca` without a CA file).
    cas: Option<Cas>,
    /// Intermediates from the client that a chain may use (`verify_depth`).
    max_intermediates: usize,
    request: Arc<RequestCertificate>,
    /// The earliest next update of the revocation lists (Unix seconds): past it, certificates
    /// whose chain needs that list are refused until a new CRL is installed.
    crl_next_update: Option<i64>,
    /// Chains verified under this policy, by a hash of the certificates given to the verifier
    /// (the client's and the intermediates the depth allows), with the times their verdict
    /// holds from and until: the latest start and the first expiry of their certificates and
    /// the CRLs. A returning client's chain then costs a hash instead of a signature check and a
    /// path search (its key signature is still checked in every handshake). The cache belongs
    /// to the policy, so new CAs or CRLs (a reload) start it empty.
    verified: std::sync::Mutex<std::collections::HashMap<[u8; 32], (i64, i64)>>,
}

/// A verifier over the CA file's CAs that are in date: webpki does not look at a trust anchor's
/// dates, and OpenSSL (so nginx) refuses a chain whose CA has expired or is not yet valid. A CA
/// that runs out while the proxy runs drops out then (the verifier is rebuilt without it), one
/// not yet valid joins when it becomes valid, and a reload never fails for either.
#[derive(Debug)]
struct Cas {
    /// Each CA with its validity (Unix seconds).
    certs: Vec<(CertificateDer<'static>, i64, i64)>,
    /// With CRLs, the file's CAs issued by another CA in it (or revoked): not anchors, but
    /// offered after the client's intermediates, so the path runs on to the root and their
    /// revocation is checked.
    below_root: Vec<CertificateDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Over every CA whatever its dates: tells "your CA has expired" from "unknown CA".
    all: Arc<dyn ClientCertVerifier>,
    /// Which CAs the current verifier is over, and it (None: no CA in date).
    current: std::sync::Mutex<CurrentVerifier>,
}

type CurrentVerifier = (Vec<usize>, Option<Arc<dyn ClientCertVerifier>>);

impl Cas {
    fn build(
        &self,
        which: &[usize],
    ) -> Result<Option<Arc<dyn ClientCertVerifier>>, rustls::server::VerifierBuilderError> {
        if which.is_empty() {
            return Ok(None);
        }
        let mut roots = rustls::RootCertStore::empty();
        for &i in which {
            // Each was added to a store when the file was read.
            let _ = roots.add(self.certs[i].0.clone());
        }
        let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone());
        if !self.crls.is_empty() {
            builder = builder.with_crls(self.crls.clone()).enforce_revocation_expiration();
        }
        builder.build().map(Some)
    }

    /// The verifier over the CAs in date at `now`, until when that set stays as it is, and
    /// whether some CA is out of date now (then `all` can tell "expired" from "unknown").
    fn at(&self, now: i64) -> (Option<Arc<dyn ClientCertVerifier>>, i64, bool) {
        let which: Vec<usize> =
            (0..self.certs.len()).filter(|&i| self.certs[i].1 <= now && now < self.certs[i].2).collect();
        let next = self
            .certs
            .iter()
            .map(|&(_, from, until)| {
                if now < from {
                    from
                } else if now < until {
                    until
                } else {
                    i64::MAX
                }
            })
            .min()
            .unwrap_or(i64::MAX);
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.0 != which {
            // The same certificates and CRLs built `all`, so this does not fail; if it ever did,
            // no CA vouches (closed) rather than the previous set (which may hold one that has
            // just run out).
            let v = self.build(&which).unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot build the client certificate verifier; refusing client certificates");
                None
            });
            *current = (which, v);
        }
        (current.1.clone(), next, current.0.len() < self.certs.len())
    }
}

/// Verified chains kept per listener; when full, expired ones go, and if none has, all.
const MAX_VERIFIED: usize = 4096;

/// What the handshake's certificate means for the session.
#[derive(Debug, PartialEq, Eq)]
pub enum CertCheck {
    /// Serve the session; the facts go to the auth service.
    Accepted(ClientCertFacts),
    /// `verify_client = "on"` and the client sent none.
    Missing,
    /// A certificate the policy refuses (untrusted, expired, unreadable), and why (for the log).
    Refused(&'static str),
}

/// The certificate facts nginx passes to `auth_http` (`Auth-SSL-Verify`, `-Subject`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFacts {
    /// `SUCCESS`, `FAILED:<reason>` or `NONE`, as nginx writes them.
    pub verify: String,
    pub cert: Option<CertDetails>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertDetails {
    /// Distinguished names in RFC 2253 form (`CN=alice,O=Example`), non-ASCII bytes escaped.
    pub subject: String,
    pub issuer: String,
    /// The serial number in upper-case hex.
    pub serial: String,
    /// SHA-1 of the DER certificate in lower-case hex (nginx's `$ssl_client_fingerprint`).
    pub fingerprint: String,
    /// The certificate itself (DER); `pem()` writes it out for `Auth-SSL-Cert`, only when sent.
    pub der: Vec<u8>,
}

impl CertDetails {
    /// The certificate in PEM.
    pub fn pem(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.der);
        let mut pem = String::with_capacity(b64.len() + b64.len() / 64 + 64);
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        // Base64 is ASCII, so every 64-byte chunk is on a character boundary.
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }
}

impl ClientAuth {
    /// The policy for `mode` with the CAs in `ca_file` (required for `on` and `optional`), the
    /// revocation lists in `crl_file` and the chain length `verify_depth` (both only with a CA
    /// file).
    ///
    /// With CRLs, every certificate in the chain is checked, as nginx's `ssl_crl` does (OpenSSL's
    /// `CRL_CHECK_ALL`): each issuer needs a CRL in the file, and an expired CRL refuses, so a CRL
    /// that is not refreshed fails closed.
    pub fn new(settings: &ClientCertSettings) -> Result<ClientAuth, String> {
        let (mode, ca_file, crl_file) = (settings.mode, settings.ca_file.as_deref(), settings.crl_file.as_deref());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut crl_next_update = None;
        let (cas, hints) = match ca_file {
            Some(path) => {
                let mut certs = Vec::new();
                let roots = super::load_roots_checked(path, |cert| {
                    client_ca(cert)?;
                    if let Ok((_, c)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
                        let v = c.validity();
                        if !v.is_valid() {
                            tracing::warn!(ca = %rfc2253(c.subject()), file = %path.display(), not_before = %v.not_before,
                                not_after = %v.not_after, "client CA not valid now: chains through it are refused while it is not");
                        }
                        certs.push((cert.clone().into_owned(), v.not_before.timestamp(), v.not_after.timestamp()));
                    }
                    Ok(())
                })?;
                let hints = roots.subjects();
                let crls = match crl_file {
                    Some(crl_path) => {
                        let crls = load_crls(crl_path)?;
                        crl_next_update = self::crl_next_update(crl_path, &crls)?;
                        crls
                    }
                    None => Vec::new(),
                };
                // webpki checks revocation below a trust anchor only, and every certificate in
                // the CA file would be one: an issuing CA listed there beside its root would go
                // unchecked, revoked by the root's CRL or with no CRL from the root at all, where
                // OpenSSL (so nginx) builds on to the root and checks it. With CRLs, such a CA is
                // no anchor but offered to the verifier after the client's own intermediates, so
                // the path runs on to its root: "certificate revoked" or "unable to get
                // certificate CRL", in every mode. One revoked by a CRL whose issuer is not in the
                // file is left out as well.
                let mut below_root = Vec::new();
                if !crls.is_empty() {
                    let names: Vec<(Vec<u8>, Vec<u8>)> =
                        certs.iter().filter_map(|(c, _, _)| subject_issuer(c)).collect();
                    certs.retain(|(cert, _, _)| {
                        let Some((subject, issuer)) = subject_issuer(cert) else { return true };
                        let issuer_here = subject != issuer && names.iter().any(|(s, _)| *s == issuer);
                        let revoked = revoked_by(cert, &crls);
                        if let Some(by) = &revoked {
                            tracing::warn!(ca = %by.0, crl_issuer = %by.1, file = %path.display(),
                                "client CA revoked by its issuer's CRL: chains through it are refused");
                        }
                        if issuer_here || revoked.is_some() {
                            below_root.push(cert.clone());
                            return false;
                        }
                        true
                    });
                }
                let builder_error = |e| match e {
                    rustls::server::VerifierBuilderError::InvalidCrl(e) => {
                        format!("{}: not a usable CRL ({e:?})", crl_file.unwrap_or(path).display())
                    }
                    e => format!("{}: {e}", path.display()),
                };
                let mut cas = Cas {
                    certs,
                    below_root,
                    crls,
                    provider: provider.clone(),
                    all: WebPkiClientVerifier::no_client_auth(),
                    current: Default::default(),
                };
                let every: Vec<usize> = (0..cas.certs.len()).collect();
                cas.all = cas
                    .build(&every)
                    .map_err(builder_error)?
                    .ok_or_else(|| format!("{}: no CA certificates in the file", path.display()))?;
                // The verifier over the CAs in date now, built here rather than at the first
                // handshake.
                cas.at(UnixTime::now().as_secs() as i64);
                (Some(cas), hints)
            }
            None if crl_file.is_some() => return Err("revocation lists need a CA file".into()),
            None if mode == VerifyClient::OptionalNoCa => (None, Vec::new()),
            None => return Err("client certificates need a CA file".into()),
        };
        let request = Arc::new(RequestCertificate { hints, algorithms: provider.signature_verification_algorithms });
        Ok(ClientAuth {
            mode,
            cas,
            max_intermediates: settings.verify_depth,
            request,
            crl_next_update,
            verified: Default::default(),
        })
    }

    /// Verify a chain, or find it verified before and still within the time its verdict holds.
    fn verify(
        &self,
        v: &dyn ClientCertVerifier,
        ca_until: i64,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let now = UnixTime::now();
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for cert in std::iter::once(leaf).chain(intermediates) {
            hash.update(&(cert.len() as u64).to_be_bytes());
            hash.update(cert.as_ref());
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(hash.finish().as_ref());
        let cache = || self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if cache().get(&key).is_some_and(|&(from, until)| from <= secs && secs < until) {
            return Ok(());
        }
        v.verify_client_cert(leaf, intermediates, now)?;
        // Good while every certificate the path may use is in date, the set of CAs in date
        // stays as it is and the CRLs have not run out; not kept if a certificate cannot be
        // read here.
        let validity: Option<Vec<(i64, i64)>> = std::iter::once(leaf)
            .chain(intermediates)
            .map(|c| {
                let v = x509_parser::parse_x509_certificate(c).ok()?.1.validity().clone();
                Some((v.not_before.timestamp(), v.not_after.timestamp()))
            })
            .collect();
        if let Some(validity) = validity {
            let from = validity.iter().map(|v| v.0).max().unwrap_or(i64::MAX);
            let until =
                validity.iter().map(|v| v.1).chain(self.crl_next_update).chain([ca_until]).min().unwrap_or(i64::MIN);
            let mut cache = cache();
            if cache.len() >= MAX_VERIFIED {
                cache.retain(|_, &mut (_, until)| secs < until);
                if cache.len() >= MAX_VERIFIED {
                    cache.clear();
                }
            }
            cache.insert(key, (from, until));
        }
        Ok(())
    }

    /// When the first of the listener's CRLs expires (Unix seconds), if it has any.
    pub fn crl_next_update(&self) -> Option<i64> {
        self.crl_next_update
    }

    /// The handshake's side: ask for a certificate, check the key signature, never refuse.
    pub fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.request.clone()
    }

    /// Judge the certificate chain the client presented (`None`: it sent none).
    pub fn check<'c>(&self, chain: Option<&[CertificateDer<'c>]>) -> CertCheck {
        let Some((leaf, intermediates)) = chain.and_then(|c| c.split_first()) else {
            return match self.mode {
                VerifyClient::On => CertCheck::Missing,
                _ => CertCheck::Accepted(ClientCertFacts { verify: "NONE".into(), cert: None }),
            };
        };
        let Some((details, in_date, for_clients)) = details(leaf) else {
            return CertCheck::Refused("unreadable certificate");
        };
        if !for_clients {
            // OpenSSL's "unsupported certificate purpose", which nginx refuses in every mode;
            // webpki would say so only where it runs (a CA file, an issuer found).
            return CertCheck::Refused("unsupported certificate purpose");
        }
        let self_signed = details.subject == details.issuer;
        // nginx's `ssl_verify_depth`: only the first `depth` certificates the client sent after
        // its own may link it to a CA. Clients send each issuer after what it issued (TLS 1.2
        // requires it); one that sends them out of order needs a larger depth.
        let within_depth = &intermediates[..intermediates.len().min(self.max_intermediates)];
        let verdict = match &self.cas {
            Some(cas) => {
                // The CA file's own intermediates (below its roots) go with what the client sent.
                // Of what the client sent, not one whose keyUsage rules out signing certificates:
                // OpenSSL takes no such issuer (`check_ssl_ca`), and webpki reads no keyUsage.
                let with_below = |sent: &[CertificateDer<'c>]| -> Vec<CertificateDer<'c>> {
                    sent.iter().filter(|c| may_issue(c)).chain(&cas.below_root).cloned().collect()
                };
                let allowed = &with_below(within_depth)[..];
                let now = UnixTime::now();
                let (v, ca_until, some_out_of_date) = cas.at(i64::try_from(now.as_secs()).unwrap_or(i64::MAX));
                let result = match &v {
                    Some(v) => self.verify(v.as_ref(), ca_until, leaf, allowed),
                    None => Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)),
                };
                let result = result.map_err(|e| match reason(e) {
                    // Unknown to the CAs in date, and some CA is not: its CA may be that one.
                    // Then it is OpenSSL's "certificate has expired" (or "is not yet valid"), or
                    // whatever else the chain fails on (revoked, an expired CRL): hard failures
                    // all, which not even `optional_no_ca` accepts.
                    Failure::Unknown(why) if some_out_of_date => {
                        match cas.all.verify_client_cert(leaf, allowed, now).map_err(reason) {
                            Ok(_) => Failure::Hard("certificate has expired or is not yet valid"),
                            Err(Failure::Hard(hard)) => Failure::Hard(hard),
                            Err(Failure::Unknown(_)) => Failure::Unknown(why),
                        }
                    }
                    other => other,
                });
                result.map_err(|failure| match failure {
                    // Linked to a CA only through more intermediates than the depth allows:
                    // OpenSSL's "chain too long", which not even `optional_no_ca` accepts.
                    Failure::Unknown(_)
                        if within_depth.len() < intermediates.len()
                            && cas.all.verify_client_cert(leaf, &with_below(intermediates), now).is_ok() =>
                    {
                        Failure::Hard("certificate chain too long")
                    }
                    // OpenSSL's word for it, with or without a CA file. A self-signed certificate
                    // is often marked CA:TRUE (`openssl req -x509` does), which webpki refuses as
                    // an end entity before it looks for an issuer: the same case, if in date.
                    Failure::Unknown(_) | Failure::Hard("certificate verify failed") if self_signed => {
                        if in_date {
                            Failure::Unknown("self-signed certificate")
                        } else {
                            Failure::Hard("certificate has expired or is not yet valid")
                        }
                    }
                    other => other,
                })
            }
            None if !in_date => Err(Failure::Hard("certificate has expired or is not yet valid")),
            None if self_signed => Err(Failure::Unknown("self-signed certificate")),
            None => Err(Failure::Unknown("unable to get local issuer certificate")),
        };
        let verify = match verdict {
            Ok(()) => "SUCCESS".to_string(),
            // Only `optional_no_ca` lets an unknown issuer through, as nginx does.
            Err(Failure::Unknown(why)) if self.mode == VerifyClient::OptionalNoCa => format!("FAILED:{why}"),
            Err(Failure::Unknown(why) | Failure::Hard(why)) => return CertCheck::Refused(why),
        };
        CertCheck::Accepted(ClientCertFacts { verify, cert: Some(details) })
    }
}

/// A certificate's subject and issuer names (DER).
fn subject_issuer(cert: &CertificateDer<'_>) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some((c.subject().as_raw().to_vec(), c.issuer().as_raw().to_vec()))
}

/// The CA (its name, and its CRL's issuer) if one of `crls`, from the CA's own issuer, lists
/// it as revoked. Only ever used to leave a CA out, so a CRL is not checked for a signature here
/// (the verifier checks the ones it uses).
fn revoked_by(cert: &CertificateDer<'_>, crls: &[CertificateRevocationListDer<'_>]) -> Option<(String, String)> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if c.subject().as_raw() == c.issuer().as_raw() {
        return None;
    }
    crls.iter().find_map(|crl| {
        let (_, list) = x509_parser::parse_x509_crl(crl).ok()?;
        let listed = list.issuer().as_raw() == c.issuer().as_raw()
            && list.iter_revoked_certificates().any(|r| r.raw_serial() == c.raw_serial());
        listed.then(|| (rfc2253(c.subject()), rfc2253(list.issuer())))
    })
}

/// The CRLs in a PEM file (`-----BEGIN X509 CRL-----`), at least one.
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if crls.is_empty() {
        return Err(format!("{}: no CRLs in the file (PEM, -----BEGIN X509 CRL-----)", path.display()));
    }
    Ok(crls)
}

/// When the first of the CRLs expires (Unix seconds). Two CRLs for the same scope (issuer and
/// issuing distribution point) are refused: only the first would ever be consulted, so a newer
/// one appended after it would silently not apply. Partitioned CRLs (one issuer, different
/// distribution points) are fine. A CRL that cannot be read here is refused too: its expiry
/// would be missing from the metric and from how long a verified chain is remembered.
fn crl_next_update(path: &Path, crls: &[CertificateRevocationListDer<'_>]) -> Result<Option<i64>, String> {
    let mut scopes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let mut next_update = None::<i64>;
    for crl in crls {
        let Ok((_, parsed)) = x509_parser::parse_x509_crl(crl) else {
            return Err(format!("{}: not a usable CRL (cannot be read)", path.display()));
        };
        let issuer = parsed.issuer();
        let point = parsed
            .extensions()
            .iter()
            .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_ISSUER_DISTRIBUTION_POINT)
            .map(|e| e.value.to_vec());
        let scope = (issuer.as_raw().to_vec(), point);
        if scopes.contains(&scope) {
            return Err(format!("{}: two CRLs from {}; keep only the newest", path.display(), rfc2253(issuer)));
        }
        scopes.push(scope);
        if let Some(t) = parsed.next_update() {
            next_update = Some(next_update.map_or(t.timestamp(), |n| n.min(t.timestamp())));
        }
    }
    Ok(next_update)
}

/// Why a chain did not verify: an issuer nobody vouches for (which `optional_no_ca` accepts), or
/// anything else.
enum Failure {
    Unknown(&'static str),
    Hard(&'static str),
}

/// OpenSSL's words for the error, which is what nginx's `Auth-SSL-Verify` carries.
fn reason(e: rustls::Error) -> Failure {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            Failure::Unknown("unable to get local issuer certificate")
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            Failure::Hard("certificate has expired")
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => Failure::Hard("certificate is not yet valid"),
        rustls::Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
        ) => Failure::Hard("unsupported certificate purpose"),
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            Failure::Hard("certificate signature failure")
        }
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => Failure::Hard("certificate revoked"),
        rustls::Error::InvalidCertificate(CertificateError::UnknownRevocationStatus) => {
            Failure::Hard("unable to get certificate CRL")
        }
        rustls::Error::InvalidCertificate(
            CertificateError::ExpiredRevocationList | CertificateError::ExpiredRevocationListContext { .. },
        ) => Failure::Hard("CRL has expired"),
        rustls::Error::InvalidCertRevocationList(rustls::CertRevocationListError::IssuerInvalidForCrl) => {
            Failure::Hard("key usage does not include CRL signing")
        }
        rustls::Error::InvalidCertRevocationList(_) => Failure::Hard("CRL signature failure"),
        _ => Failure::Hard("certificate verify failed"),
    }
}

/// Subject, issuer, serial, fingerprint and the DER, and whether it is within its validity
/// period now, from one parse; None if the certificate cannot be parsed.
/// The facts nginx passes on, whether the certificate is in date, and whether it may
/// authenticate a TLS client: no extended key usage (any purpose, as OpenSSL reads it), or one
/// that lists clientAuth. anyExtendedKeyUsage alone is not enough: OpenSSL's ssl_client purpose
/// (`xku_reject`) refuses it, and so nginx does. Nor a keyUsage that allows neither
/// digitalSignature nor keyAgreement (`ku_reject`): an encryption-only certificate, whose key
/// an escrow may hold, is not one to log in with. One parse per handshake for all three.
fn details(leaf: &CertificateDer<'_>) -> Option<(CertDetails, bool, bool)> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let eku_allows = match cert.extended_key_usage() {
        Ok(None) => true,
        Ok(Some(eku)) => eku.value.client_auth,
        Err(_) => false,
    };
    let ku_allows = match cert.key_usage() {
        Ok(None) => true,
        Ok(Some(ku)) => ku.value.digital_signature() || ku.value.key_agreement(),
        Err(_) => false,
    };
    let for_clients = eku_allows && ku_allows;
    let serial = cert.raw_serial();
    let first = serial.iter().position(|&b| b != 0).unwrap_or(serial.len().saturating_sub(1));
    let serial = serial[first..].iter().map(|b| format!("{b:02X}")).collect();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, leaf.as_ref());
    let fingerprint = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let details = CertDetails {
        subject: rfc2253(cert.subject()),
        issuer: rfc2253(cert.issuer()),
        serial,
        fingerprint,
        der: leaf.as_ref().to_vec(),
    };
    Some((details, cert.validity().is_valid(), for_clients))
}

/// A keyUsage that does not allow signing certificates (or cannot be read).
fn no_cert_sign(cert: &x509_parser::certificate::X509Certificate<'_>) -> bool {
    match cert.key_usage() {
        Ok(None) => false,
        Ok(Some(ku)) => !ku.value.key_cert_sign(),
        Err(_) => true,
    }
}

/// Whether a certificate a client sent may issue others in its chain, as far as its keyUsage
/// says (basicConstraints webpki checks itself).
fn may_issue(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert.as_ref()).is_ok_and(|(_, c)| !no_cert_sign(&c))
}

/// What webpki does not check in a trust anchor and OpenSSL (so nginx) does: that it is a CA. A
/// client's own certificate put in the CA file would otherwise let its key sign certificates
/// for any subject, verified "SUCCESS". (Its dates are checked at each verification: `Cas`.)
pub(crate) fn client_ca(cert: &CertificateDer<'_>) -> Result<(), String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Err("a certificate that cannot be parsed".into());
    };
    let subject = rfc2253(parsed.subject());
    // OpenSSL's X509_check_ca, which nginx's verification applies to every issuer, the trust
    // anchor included: basicConstraints CA:TRUE; without basicConstraints, a version 1
    // self-signed root or a keyUsage with keyCertSign. Anything else (CA:FALSE, no extension at
    // all as many end-entity certificates have, a broken one) is not a CA.
    // A keyUsage without keyCertSign rules it out first, CA:TRUE or not (`ku_reject`).
    let no_cert_sign = no_cert_sign(&parsed);
    let is_ca = match parsed.basic_constraints() {
        _ if no_cert_sign => false,
        Ok(Some(bc)) => bc.value.ca,
        Ok(None) => {
            let v1_root = parsed.version() == x509_parser::x509::X509Version::V1 && parsed.subject() == parsed.issuer();
            let cert_sign = matches!(parsed.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
            v1_root || cert_sign
        }
        Err(_) => false,
    };
    if !is_ca {
        return Err(format!(
            "{subject} is not a CA certificate (no basicConstraints CA:TRUE, or a keyUsage without keyCertSign); client certificates are checked against the CAs that issue them"
        ));
    }
    Ok(())
}

/// A distinguished name as OpenSSL prints it with `XN_FLAG_RFC2253`: last RDN first, `,`
/// between RDNs, `+` inside one, special characters backslash-escaped and every byte outside
/// printable ASCII as `\XX`, so the result is always a valid header value.
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.into_iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match x509_parser::objects::oid2abbrev(atv.attr_type(), registry) {
                Ok(short) => out.push_str(short),
                Err(_) => out.push_str(&atv.attr_type().to_id_string()),
            }
            out.push('=');
            let converted = value_text(atv.attr_value().tag().0, atv.attr_value().data);
            let value = match &converted {
                Some(text) => text.as_bytes(),
                None => atv.as_str().map(str::as_bytes).unwrap_or(atv.attr_value().data),
            };
            let last = value.len().saturating_sub(1);
            for (k, &b) in value.iter().enumerate() {
                let edge_space = b == b' ' && (k == 0 || k == last);
                match b {
                    // RFC 2253's specials, as OpenSSL escapes them for nginx (not '=').
                    b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';' => {
                        out.push('\\');
                        out.push(b as char);
                    }
                    b'#' if k == 0 => out.push_str("\\#"),
                    _ if edge_space => out.push_str("\\ "),
                    0x20..=0x7e => out.push(b as char),
                    _ => out.push_str(&format!("\\{b:02X}")),
                }
            }
        }
    }
    out
}

/// A name value in one of the wide or legacy string types, as UTF-8, as OpenSSL converts it
/// before escaping for nginx: BMPString (UTF-16BE, tag 30), UniversalString (UTF-32BE, 28),
/// T61String (read as Latin-1, 20). None for the others (already ASCII or UTF-8).
fn value_text(tag: u32, data: &[u8]) -> Option<String> {
    match tag {
        30 if data.len().is_multiple_of(2) => {
            char::decode_utf16(data.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])))
                .collect::<Result<String, _>>()
                .ok()
        }
        28 if data.len().is_multiple_of(4) => {
            data.chunks_exact(4).map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))).collect()
        }
        20 => Some(data.iter().map(|&b| char::from(b)).collect()),
        _ => None,
    }
}

/// Asks for a certificate (naming the listener's CAs) and checks the client's signature with its
/// key; the certificate itself is judged after the handshake by `ClientAuth::check`.
#[derive(Debug)]
struct RequestCertificate {
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for RequestCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    use std::time::{Duration, SystemTime};

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    /// An intermediate CA named `name`, issued by `by`, with `serial` if given.
    fn sub_ca(
        name: &str,
        by: &CertifiedIssuer<'static, KeyPair>,
        serial: Option<&[u8]>,
    ) -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.serial_number = serial.map(rcgen::SerialNumber::from_slice);
        CertifiedIssuer::signed_by(p, KeyPair::generate().unwrap(), by).unwrap()
    }

    /// A client certificate for `cn`, valid from `from` to `to` days from now.
    fn client_params(cn: &str, from: i64, to: i64) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.distinguished_name.push(DnType::OrganizationName, "Example, Inc.");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = SystemTime::now();
        let day = |d: i64| {
            let t = if d >= 0 {
                now + Duration::from_secs(d as u64 * 86400)
            } else {
                now - Duration::from_secs((-d) as u64 * 86400)
            };
            time::OffsetDateTime::from(t)
        };
        p.not_before = day(from);
        p.not_after = day(to);
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x00, 0x42, 0x1f]));
        p
    }

    fn issued(cn: &str, by: &CertifiedIssuer<'static, KeyPair>, from: i64, to: i64) -> CertificateDer<'static> {
        client_params(cn, from, to).signed_by(&KeyPair::generate().unwrap(), by).unwrap().der().clone()
    }

    fn policy(mode: VerifyClient, ca: Option<&CertifiedIssuer<'static, KeyPair>>) -> ClientAuth {
        let dir = std::env::temp_dir().join(format!(
            "portcullis-cc-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ca.pem");
        let file = ca.map(|c| {
            std::fs::write(&path, c.pem()).unwrap();
            path.as_path()
        });
        let settings = ClientCertSettings { mode, ca_file: file.map(Path::to_path_buf), ..Default::default() };
        ClientAuth::new(&settings).unwrap()
    }

    /// A certificate for servers only (serverAuth) is refused in every mode, also without a CA
    /// file (`optional_no_ca`), as nginx refuses it.
    #[test]
    fn a_server_only_certificate_is_refused() {
        let mut server_only = client_params("alice", -1, 30);
        server_only.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = server_only.self_signed(&KeyPair::generate().unwrap()).unwrap().der().clone();
        for p in [policy(VerifyClient::OptionalNoCa, None), policy(VerifyClient::OptionalNoCa, Some(&ca("Example CA")))]
        {
            let got = p.check(Some(std::slice::from_ref(&cert)));
            assert!(matches!(got, CertCheck::Refused("unsupported certificate purpose")), "{got:?}");
        }
        // anyExtendedKeyUsage alone, as OpenSSL reads it for a TLS client: not a client's.
        let mut any = client_params("alice", -1, 30);
        any.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::Any];
        let any = any.self_signed(&KeyPair::generate().unwrap()).unwrap().der().clone();
        let got = policy(VerifyClient::OptionalNoCa, None).check(Some(std::slice::from_ref(&any)));
        assert!(matches!(got, CertCheck::Refused("unsupported certificate purpose")), "{got:?}");
        let client = client_params("alice", -1, 30).self_signed(&KeyPair::generate().unwrap()).unwrap().der().clone();
        let got = policy(VerifyClient::OptionalNoCa, None).check(Some(std::slice::from_ref(&client)));
        assert!(matches!(got, CertCheck::Accepted(_)), "{got:?}");
    }

    /// OpenSSL's `ssl_client` purpose reads keyUsage too, which webpki does not: a client
    /// certificate whose keyUsage allows neither digitalSignature nor keyAgreement (one for
    /// encryption only, its key perhaps in escrow) is refused, and an intermediate the client
    /// sends whose keyUsage does not allow signing certificates issues nothing.
    #[test]
    fn key_usage_is_read_as_openssl_reads_it() {
        let root = ca("Example Root");
        let p = policy(VerifyClient::On, Some(&root));
        let with_usage = |usages: Vec<rcgen::KeyUsagePurpose>| {
            let mut c = client_params("alice", -1, 30);
            c.key_usages = usages;
            c.signed_by(&KeyPair::generate().unwrap(), &root).unwrap().der().clone()
        };
        use rcgen::KeyUsagePurpose::{DigitalSignature, KeyAgreement, KeyEncipherment};
        let encryption_only = with_usage(vec![KeyEncipherment]);
        let got = p.check(Some(std::slice::from_ref(&encryption_only)));
        assert_eq!(got, CertCheck::Refused("unsupported certificate purpose"));
        for usages in [vec![DigitalSignature, KeyEncipherment], vec![KeyAgreement], vec![]] {
            let cert = with_usage(usages.clone());
            let got = p.check(Some(std::slice::from_ref(&cert)));
            assert!(matches!(&got, CertCheck::Accepted(f) if f.verify == "SUCCESS"), "{usages:?}: {got:?}");
        }
        // Through an intermediate: one that may sign certificates links alice to the root; one
        // marked CA:TRUE whose keyUsage is digitalSignature only does not.
        let intermediate = |usages: Vec<rcgen::KeyUsagePurpose>| {
            let mut q = CertificateParams::new(Vec::<String>::new()).unwrap();
            q.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            q.distinguished_name.push(DnType::CommonName, "Example Issuing CA");
            q.key_usages = usages;
            CertifiedIssuer::signed_by(q, KeyPair::generate().unwrap(), &root).unwrap()
        };
        for (usages, ok) in [(vec![rcgen::KeyUsagePurpose::KeyCertSign], true), (vec![DigitalSignature], false)] {
            let sub = intermediate(usages);
            let chain = [issued("alice", &sub, -1, 30), sub.der().clone()];
            let got = p.check(Some(&chain));
            assert_eq!(matches!(&got, CertCheck::Accepted(f) if f.verify == "SUCCESS"), ok, "{got:?}");
        }
    }

    /// The CA file holds CAs in date: a client's own certificate (CA:FALSE, or no
    /// basicConstraints at all) "pinned" there would let its key sign certificates for any
    /// subject; an expired CA would go on vouching.
    #[test]
    fn the_ca_file_takes_only_cas_in_date() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        let load = |pem: &str| {
            std::fs::write(&path, pem).unwrap();
            let settings =
                ClientCertSettings { mode: VerifyClient::On, ca_file: Some(path.clone()), ..Default::default() };
            ClientAuth::new(&settings).map(|_| ())
        };
        assert!(load(&ca("Example Client CA").pem()).is_ok());
        let leaf = client_params("alice", -1, 30).self_signed(&KeyPair::generate().unwrap()).unwrap();
        let mut not_ca = client_params("alice", -1, 30);
        not_ca.is_ca = IsCa::ExplicitNoCa;
        let not_ca = not_ca.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let e = load(&not_ca.pem()).unwrap_err();
        assert!(e.contains("CN=alice") && e.contains("not a CA certificate"), "{e}");
        // Without basicConstraints either (rcgen's default, `openssl x509 -req` without an
        // extfile): OpenSSL refuses it as an issuer, and webpki would not.
        let e = load(&leaf.pem()).unwrap_err();
        assert!(e.contains("CN=alice") && e.contains("not a CA certificate"), "{e}");
        // ... unless its keyUsage allows signing certificates, as OpenSSL's check allows.
        let mut signer = client_params("Signer", -1, 30);
        signer.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        assert!(load(&signer.self_signed(&KeyPair::generate().unwrap()).unwrap().pem()).is_ok());
        // CA:TRUE with a keyUsage that does not allow it to sign certificates: not a CA to
        // OpenSSL either.
        let mut no_sign = client_params("No Signer", -1, 30);
        no_sign.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        no_sign.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let e = load(&no_sign.self_signed(&KeyPair::generate().unwrap()).unwrap().pem()).unwrap_err();
        assert!(e.contains("CN=No Signer") && e.contains("not a CA certificate"), "{e}");
        // An expired CA loads (a CA that runs out must not make every later reload fail, a
        // certificate renewal's included), and vouches for no one: "certificate has expired".
        let mut old = client_params("Old CA", -30, -1);
        old.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let old = CertifiedIssuer::self_signed(old, KeyPair::generate().unwrap()).unwrap();
        assert!(load(&old.pem()).is_ok());
        let alice = issued("alice", &old, -1, 30);
        for mode in [VerifyClient::On, VerifyClient::OptionalNoCa] {
            assert_eq!(
                policy(mode, Some(&old)).check(Some(std::slice::from_ref(&alice))),
                CertCheck::Refused("certificate has expired or is not yet valid")
            );
        }
    }

    /// webpki does not look at a trust anchor's dates; OpenSSL (so nginx) refuses a chain whose
    /// CA has expired. A CA in date at load that runs out while the proxy runs stops vouching
    /// then, and a remembered verdict does not outlive it.
    #[test]
    fn a_ca_that_runs_out_while_running_stops_vouching() {
        let good_ca = ca("Example Client CA");
        let alice = issued("alice", &good_ca, -1, 30);
        let mut on = policy(VerifyClient::On, Some(&good_ca));
        let now = UnixTime::now().as_secs() as i64;
        fn until(on: &mut ClientAuth) -> &mut i64 {
            &mut on.cas.as_mut().unwrap().certs[0].2
        }
        *until(&mut on) = now + 100;
        assert!(matches!(on.check(Some(std::slice::from_ref(&alice))), CertCheck::Accepted(_)));
        assert!(on.verified.lock().unwrap().values().all(|&(_, until)| until == now + 100));
        // Run out since: refused at once, the remembered verdict notwithstanding (it ended with
        // the CA), and not let through as an unknown issuer under `optional_no_ca` either.
        *until(&mut on) = now - 1;
        let expired = CertCheck::Refused("certificate has expired or is not yet valid");
        assert_eq!(on.check(Some(std::slice::from_ref(&alice))), expired);
        on.mode = VerifyClient::OptionalNoCa;
        assert_eq!(on.check(Some(std::slice::from_ref(&alice))), expired);
        // A CA beside it that is in date still vouches for its own.
        let other_ca = ca("Other CA");
        let bob = issued("bob", &other_ca, -1, 30);
        let both = format!("{}{}", good_ca.pem(), other_ca.pem());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), both).unwrap();
        let settings = ClientCertSettings {
            mode: VerifyClient::On,
            ca_file: Some(dir.path().join("ca.pem")),
            ..Default::default()
        };
        let mut two = ClientAuth::new(&settings).unwrap();
        *until(&mut two) = now - 1;
        assert_eq!(two.check(Some(std::slice::from_ref(&alice))), expired);
        assert!(matches!(two.check(Some(std::slice::from_ref(&bob))), CertCheck::Accepted(_)));
        // Sending the CA in date along (a public certificate anyone has) changes nothing: the
        // verdict is over the CAs in date, not over names in the chain.
        let with_other = [alice.clone(), other_ca.der().clone()];
        assert_eq!(two.check(Some(&with_other)), expired);
    }

    /// Reliability case 21: none / wrong / untrusted certificates, per mode.
    #[test]
    fn verdicts_per_mode() {
        let good_ca = ca("Example Client CA");
        let other_ca = ca("Somebody Else");
        let good = issued("alice", &good_ca, -1, 30);
        let untrusted = issued("mallory", &other_ca, -1, 30);
        let expired = issued("old", &good_ca, -30, -1);

        let on = policy(VerifyClient::On, Some(&good_ca));
        assert_eq!(on.check(None), CertCheck::Missing);
        assert_eq!(on.check(Some(&[])), CertCheck::Missing);
        let CertCheck::Accepted(facts) = on.check(Some(std::slice::from_ref(&good))) else { panic!("good refused") };
        assert_eq!(facts.verify, "SUCCESS");
        let cert = facts.cert.expect("details");
        assert_eq!(cert.subject, "O=Example\\, Inc.,CN=alice");
        assert_eq!(cert.issuer, "CN=Example Client CA");
        assert_eq!(cert.serial, "421F");
        assert_eq!(cert.fingerprint.len(), 40);
        assert!(
            cert.pem().starts_with("-----BEGIN CERTIFICATE-----\n")
                && cert.pem().ends_with("-----END CERTIFICATE-----\n")
        );
        assert_eq!(
            on.check(Some(std::slice::from_ref(&untrusted))),
            CertCheck::Refused("unable to get local issuer certificate")
        );
        assert_eq!(on.check(Some(std::slice::from_ref(&expired))), CertCheck::Refused("certificate has expired"));
        assert_eq!(
            on.check(Some(&[CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])])),
            CertCheck::Refused("unreadable certificate")
        );

        let optional = policy(VerifyClient::Optional, Some(&good_ca));
        assert_eq!(optional.check(None), CertCheck::Accepted(ClientCertFacts { verify: "NONE".into(), cert: None }));
        assert!(matches!(optional.check(Some(std::slice::from_ref(&untrusted))), CertCheck::Refused(_)));

        let no_ca = policy(VerifyClient::OptionalNoCa, Some(&good_ca));
        let CertCheck::Accepted(facts) = no_ca.check(Some(std::slice::from_ref(&untrusted))) else { panic!("refused") };
        assert_eq!(facts.verify, "FAILED:unable to get local issuer certificate");
        assert_eq!(facts.cert.expect("details").issuer, "CN=Somebody Else");
        // Expired is not "optional": refused even here, as nginx does.
        assert!(matches!(no_ca.check(Some(std::slice::from_ref(&expired))), CertCheck::Refused(_)));

        let self_signed = {
            let key = KeyPair::generate().unwrap();
            client_params("me", -1, 30).self_signed(&key).unwrap().der().clone()
        };
        // A self-signed certificate is named so with a CA file too, as OpenSSL does.
        let CertCheck::Accepted(facts) = no_ca.check(Some(std::slice::from_ref(&self_signed))) else {
            panic!("refused")
        };
        assert_eq!(facts.verify, "FAILED:self-signed certificate");
        assert_eq!(on.check(Some(std::slice::from_ref(&self_signed))), CertCheck::Refused("self-signed certificate"));
        // ... also when it says CA:TRUE, as `openssl req -x509` makes them, unless out of date.
        let self_signed_ca = |from, to| {
            let mut p = client_params("me too", from, to);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.self_signed(&KeyPair::generate().unwrap()).unwrap().der().clone()
        };
        let CertCheck::Accepted(facts) = no_ca.check(Some(&[self_signed_ca(-1, 30)])) else { panic!("refused") };
        assert_eq!(facts.verify, "FAILED:self-signed certificate");
        assert!(matches!(no_ca.check(Some(&[self_signed_ca(-30, -1)])), CertCheck::Refused(_)));
        let bare = policy(VerifyClient::OptionalNoCa, None);
        let CertCheck::Accepted(facts) = bare.check(Some(std::slice::from_ref(&self_signed))) else {
            panic!("refused")
        };
        assert_eq!(facts.verify, "FAILED:self-signed certificate");
        assert!(matches!(bare.check(Some(std::slice::from_ref(&expired))), CertCheck::Refused(_)));
        assert!(bare.verifier().root_hint_subjects().is_empty());
        assert_eq!(on.verifier().root_hint_subjects().len(), 1);
    }

    /// A CRL from `by` revoking `serials`, its next update `next` days from now.
    fn crl(by: &CertifiedIssuer<'static, KeyPair>, serials: &[&[u8]], next: i64) -> String {
        crl_at(by, serials, next, None)
    }

    /// The same, for the distribution point `uri` (a partition of the issuer's CRL).
    fn crl_at(by: &CertifiedIssuer<'static, KeyPair>, serials: &[&[u8]], next: i64, uri: Option<&str>) -> String {
        let now = time::OffsetDateTime::now_utc();
        rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::days(2),
            next_update: now + time::Duration::days(next),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: uri.map(|u| rcgen::CrlIssuingDistributionPoint {
                distribution_point: rcgen::CrlDistributionPoint { uris: vec![u.to_string()] },
                scope: None,
            }),
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: now - time::Duration::days(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(by)
        .unwrap()
        .pem()
        .unwrap()
    }

    /// An issuing CA listed in the CA file beside its root is checked against the root's CRL as
    /// nginx checks it: revoked, or with no CRL from the root, its clients are refused whether
    /// they send it or not, in every mode.
    #[test]
    fn an_issuing_ca_in_the_ca_file_is_checked_against_its_roots_crl() {
        let root = ca("Example Root");
        let issuing = sub_ca("Example Issuing CA", &root, Some(&[0x1c, 0xa0]));
        let carol = issued("carol", &issuing, -1, 30);
        let dir = std::env::temp_dir().join(format!("portcullis-revoked-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), format!("{}{}", root.pem(), issuing.pem())).unwrap();
        let with = |mode, revoked: &[&[u8]]| {
            std::fs::write(dir.join("crl.pem"), format!("{}{}", crl(&root, revoked, 7), crl(&issuing, &[], 7)))
                .unwrap();
            ClientAuth::new(&ClientCertSettings {
                mode,
                ca_file: Some(dir.join("ca.pem")),
                crl_file: Some(dir.join("crl.pem")),
                verify_depth: 1,
            })
            .unwrap()
        };
        let sent_alone = std::slice::from_ref(&carol);
        let with_issuer = [carol.clone(), issuing.der().clone()];
        let fine = with(VerifyClient::On, &[&[0x42]]);
        assert!(matches!(fine.check(Some(sent_alone)), CertCheck::Accepted(_)));
        assert!(matches!(fine.check(Some(&with_issuer)), CertCheck::Accepted(_)));
        for mode in [VerifyClient::On, VerifyClient::OptionalNoCa] {
            let revoked = with(mode, &[&[0x1c, 0xa0]]);
            assert_eq!(revoked.check(Some(sent_alone)), CertCheck::Refused("certificate revoked"), "{mode:?}");
            assert_eq!(revoked.check(Some(&with_issuer)), CertCheck::Refused("certificate revoked"), "{mode:?}");
        }
        // No CRL from the root: the issuing CA's status is unknown, as nginx finds it.
        std::fs::write(dir.join("crl.pem"), crl(&issuing, &[], 7)).unwrap();
        let settings =
            |mode, crl_file| ClientCertSettings { mode, ca_file: Some(dir.join("ca.pem")), crl_file, verify_depth: 1 };
        for mode in [VerifyClient::On, VerifyClient::OptionalNoCa] {
            let no_root_crl = ClientAuth::new(&settings(mode, Some(dir.join("crl.pem")))).unwrap();
            assert_eq!(
                no_root_crl.check(Some(sent_alone)),
                CertCheck::Refused("unable to get certificate CRL"),
                "{mode:?}"
            );
        }
        // Without CRLs nothing is checked for revocation, and both CAs vouch as before.
        let no_crls = ClientAuth::new(&settings(VerifyClient::On, None)).unwrap();
        assert!(matches!(no_crls.check(Some(sent_alone)), CertCheck::Accepted(_)));
    }

    /// nginx's `ssl_crl`: a revoked certificate is refused in every mode; each issuer needs a
    /// CRL, and an expired or forged one refuses too (fails closed).
    #[test]
    fn revocation_lists() {
        let good_ca = ca("Example Client CA");
        let other_ca = ca("Somebody Else");
        let alice = issued("alice", &good_ca, -1, 30);
        let bob = {
            let mut p = client_params("bob", -1, 30);
            p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x0b, 0x0b]));
            p.signed_by(&KeyPair::generate().unwrap(), &good_ca).unwrap().der().clone()
        };
        let dir = std::env::temp_dir().join(format!("portcullis-crl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, good_ca.pem()).unwrap();
        let with = |mode, crl_pem: &str| {
            let path = dir.join("crl.pem");
            std::fs::write(&path, crl_pem).unwrap();
            ClientAuth::new(&ClientCertSettings {
                mode,
                ca_file: Some(ca_path.clone()),
                crl_file: Some(path),
                verify_depth: 1,
            })
        };
        let revoking_bob = crl(&good_ca, &[&[0x0b, 0x0b]], 7);
        // The earliest next update, for the metric: the 3-day list, not the 7-day one.
        let soonest = with(VerifyClient::On, &format!("{revoking_bob}{}", crl(&other_ca, &[], 3))).unwrap();
        let in_3_days = time::OffsetDateTime::now_utc().unix_timestamp() + 3 * 86400;
        assert!((soonest.crl_next_update().unwrap() - in_3_days).abs() < 60);
        assert_eq!(policy(VerifyClient::On, Some(&good_ca)).crl_next_update(), None);
        // Two from one issuer: only the first would count, so the file is refused.
        let e = with(VerifyClient::On, &format!("{revoking_bob}{}", crl(&good_ca, &[], 3))).unwrap_err();
        assert!(e.contains("two CRLs from CN=Example Client CA"), "{e}");
        // ... unless they are partitions of its list, for different distribution points.
        let partitions = format!(
            "{revoking_bob}{}{}",
            crl_at(&good_ca, &[], 7, Some("http://crl.example/1")),
            crl_at(&good_ca, &[], 7, Some("http://crl.example/2"))
        );
        assert!(with(VerifyClient::On, &partitions).is_ok());
        for mode in [VerifyClient::On, VerifyClient::Optional, VerifyClient::OptionalNoCa] {
            let p = with(mode, &revoking_bob).unwrap();
            assert!(matches!(p.check(Some(std::slice::from_ref(&alice))), CertCheck::Accepted(_)), "{mode:?}");
            assert_eq!(
                p.check(Some(std::slice::from_ref(&bob))),
                CertCheck::Refused("certificate revoked"),
                "{mode:?}"
            );
            // A verified chain is remembered only until the CRL runs out (7 days, before alice).
            let week = time::OffsetDateTime::now_utc().unix_timestamp() + 7 * 86400;
            let untils: Vec<i64> = p.verified.lock().unwrap().values().map(|v| v.1).collect();
            assert!(untils.len() == 1 && (untils[0] - week).abs() < 120, "{untils:?}");
        }
        // Its CA out of date since: still "revoked" under `optional_no_ca`, not let through as
        // an unknown issuer (the verifier in date knows no CA; the one over all says why).
        let mut p = with(VerifyClient::OptionalNoCa, &revoking_bob).unwrap();
        p.cas.as_mut().unwrap().certs[0].2 = time::OffsetDateTime::now_utc().unix_timestamp() - 1;
        assert_eq!(p.check(Some(std::slice::from_ref(&bob))), CertCheck::Refused("certificate revoked"));
        assert_eq!(
            p.check(Some(std::slice::from_ref(&alice))),
            CertCheck::Refused("certificate has expired or is not yet valid")
        );
        // Several CRLs in one file: the issuer's own is used.
        let both = format!("{}{revoking_bob}", crl(&other_ca, &[], 7));
        assert_eq!(
            with(VerifyClient::On, &both).unwrap().check(Some(std::slice::from_ref(&bob))),
            CertCheck::Refused("certificate revoked")
        );
        // No CRL from this issuer: status unknown, refused (OpenSSL's CRL_CHECK_ALL).
        let p = with(VerifyClient::On, &crl(&other_ca, &[], 7)).unwrap();
        assert_eq!(p.check(Some(std::slice::from_ref(&alice))), CertCheck::Refused("unable to get certificate CRL"));
        // Expired: refused, so a CRL nobody refreshes fails closed.
        let p = with(VerifyClient::On, &crl(&good_ca, &[], -1)).unwrap();
        assert_eq!(p.check(Some(std::slice::from_ref(&alice))), CertCheck::Refused("CRL has expired"));
        // Signed by another key under the same name: refused.
        let impostor = {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, "Example Client CA");
            CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
        };
        let p = with(VerifyClient::On, &crl(&impostor, &[], 7)).unwrap();
        assert_eq!(p.check(Some(std::slice::from_ref(&alice))), CertCheck::Refused("CRL signature failure"));
        // An intermediate's certificates need the intermediate's own CRL: the root's is not
        // enough (the whole chain up to the CAs in the CA file is checked).
        let intermediate = sub_ca("Example Intermediate", &good_ca, Some(&[0x1a]));
        let carol = issued("carol", &intermediate, -1, 30);
        let chain = [carol, intermediate.der().clone()];
        let p = with(VerifyClient::On, &crl(&good_ca, &[], 7)).unwrap();
        assert_eq!(p.check(Some(&chain)), CertCheck::Refused("unable to get certificate CRL"));
        let p = with(VerifyClient::On, &format!("{}{}", crl(&good_ca, &[], 7), crl(&intermediate, &[], 7))).unwrap();
        assert!(matches!(p.check(Some(&chain)), CertCheck::Accepted(_)));
        let p = with(
            VerifyClient::On,
            &format!("{}{}", crl(&good_ca, &[], 7), crl(&intermediate, &[&[0x00, 0x42, 0x1f]], 7)),
        )
        .unwrap();
        assert_eq!(p.check(Some(&chain)), CertCheck::Refused("certificate revoked"));
        // The root revoking the intermediate refuses its certificates, not only the leaf's CRL.
        let p =
            with(VerifyClient::On, &format!("{}{}", crl(&good_ca, &[&[0x1a]], 7), crl(&intermediate, &[], 7))).unwrap();
        assert_eq!(p.check(Some(&chain)), CertCheck::Refused("certificate revoked"));
        // A file without a CRL, or with a broken one, is a config error naming it.
        let e = with(VerifyClient::On, &good_ca.pem()).unwrap_err();
        assert!(e.contains("crl.pem") && e.contains("no CRLs"), "{e}");
        let e = with(VerifyClient::On, "-----BEGIN X509 CRL-----\nMAMCAQE=\n-----END X509 CRL-----\n").unwrap_err();
        assert!(e.contains("crl.pem") && e.contains("not a usable CRL"), "{e}");
        let no_ca = ClientCertSettings {
            mode: VerifyClient::OptionalNoCa,
            crl_file: Some(dir.join("crl.pem")),
            ..Default::default()
        };
        assert!(ClientAuth::new(&no_ca).is_err());
    }

    /// nginx's `ssl_verify_depth`, counted as OpenSSL 1.1 and later do: 0 is a certificate a CA
    /// issued itself, 1 (the default) allows one intermediate from the client, and so on.
    #[test]
    fn verify_depth() {
        let root = ca("Example Root");
        let intermediate = sub_ca("Example Intermediate", &root, None);
        let direct = issued("alice", &root, -1, 30);
        let chain = [issued("carol", &intermediate, -1, 30), intermediate.der().clone()];
        let dir = std::env::temp_dir().join(format!("portcullis-depth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("root.pem"), root.pem()).unwrap();
        let at = |mode, verify_depth| {
            let s = ClientCertSettings { mode, ca_file: Some(dir.join("root.pem")), crl_file: None, verify_depth };
            ClientAuth::new(&s).unwrap()
        };
        let second = sub_ca("Example Second Intermediate", &intermediate, None);
        let long = [issued("dave", &second, -1, 30), second.der().clone(), intermediate.der().clone()];
        for mode in [VerifyClient::On, VerifyClient::OptionalNoCa] {
            let zero = at(mode, 0);
            assert!(matches!(zero.check(Some(std::slice::from_ref(&direct))), CertCheck::Accepted(_)));
            assert_eq!(zero.check(Some(&chain)), CertCheck::Refused("certificate chain too long"), "{mode:?}");
            let default = at(mode, crate::config::DEFAULT_VERIFY_DEPTH);
            let CertCheck::Accepted(facts) = default.check(Some(&chain)) else { panic!("one intermediate refused") };
            assert_eq!(facts.verify, "SUCCESS");
            assert_eq!(default.check(Some(&long)), CertCheck::Refused("certificate chain too long"), "{mode:?}");
            assert!(matches!(at(mode, 2).check(Some(&long)), CertCheck::Accepted(_)));
        }
        // An intermediate the client did not send is still an unknown issuer.
        assert_eq!(
            at(VerifyClient::On, 1).check(Some(&chain[..1])),
            CertCheck::Refused("unable to get local issuer certificate")
        );
    }

    /// The depth check with an issuing CA in the CA file beside its root and CRLs (the CA is
    /// then offered after the client's own intermediates, not an anchor): a chain that is too
    /// long is still "chain too long" in every mode, never an unknown issuer that
    /// `optional_no_ca` would let through.
    #[test]
    fn verify_depth_with_an_issuing_ca_in_the_ca_file() {
        let root = ca("Example Root");
        let issuing = sub_ca("Example Issuing CA", &root, Some(&[0x11]));
        let second = sub_ca("Example Second Intermediate", &issuing, Some(&[0x12]));
        let chain = [issued("erin", &second, -1, 30), second.der().clone()];
        let dir = std::env::temp_dir().join(format!("portcullis-depth-crl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cas.pem"), format!("{}{}", root.pem(), issuing.pem())).unwrap();
        let crls = [crl(&root, &[], 7), crl(&issuing, &[], 7), crl(&second, &[], 7)].concat();
        std::fs::write(dir.join("crl.pem"), crls).unwrap();
        for mode in [VerifyClient::On, VerifyClient::OptionalNoCa] {
            let at = |verify_depth| {
                ClientAuth::new(&ClientCertSettings {
                    mode,
                    ca_file: Some(dir.join("cas.pem")),
                    crl_file: Some(dir.join("crl.pem")),
                    verify_depth,
                })
                .unwrap()
            };
            // Depth 2: the client's intermediate and the file's issuing CA.
            assert!(matches!(at(2).check(Some(&chain)), CertCheck::Accepted(_)), "{mode:?}");
            assert_eq!(at(0).check(Some(&chain)), CertCheck::Refused("certificate chain too long"), "{mode:?}");
        }
    }

    /// Counts the chain verifications it passes on.
    #[derive(Debug)]
    struct Counting(Arc<dyn ClientCertVerifier>, std::sync::atomic::AtomicUsize);

    impl ClientCertVerifier for Counting {
        fn root_hint_subjects(&self) -> &[DistinguishedName] {
            self.0.root_hint_subjects()
        }
        fn verify_client_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            now: UnixTime,
        ) -> Result<ClientCertVerified, rustls::Error> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.verify_client_cert(end_entity, intermediates, now)
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }

    /// A returning client's chain is not verified again while its verdict holds; a refused
    /// chain, another chain, or an expired verdict is.
    #[test]
    fn verified_chains_are_remembered_until_they_expire() {
        let good_ca = ca("Example Client CA");
        let alice = issued("alice", &good_ca, -1, 30);
        let bob = issued("bob", &good_ca, -1, 30);
        let mallory = issued("mallory", &ca("Somebody Else"), -1, 30);
        let p = policy(VerifyClient::On, Some(&good_ca));
        let counting = Arc::new(Counting(current(&p), Default::default()));
        set_current(&p, counting.clone());
        let calls = || counting.1.load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..3 {
            assert!(matches!(p.check(Some(std::slice::from_ref(&alice))), CertCheck::Accepted(_)));
        }
        assert_eq!(calls(), 1);
        assert!(matches!(p.check(Some(std::slice::from_ref(&bob))), CertCheck::Accepted(_)));
        assert_eq!(calls(), 2);
        for _ in 0..2 {
            assert!(matches!(p.check(Some(std::slice::from_ref(&mallory))), CertCheck::Refused(_)));
        }
        assert_eq!(calls(), 4);
        // Kept until the certificate's own expiry, about 30 days from now.
        let month = time::OffsetDateTime::now_utc().unix_timestamp() + 30 * 86400;
        let untils: Vec<i64> = p.verified.lock().unwrap().values().map(|v| v.1).collect();
        assert!(untils.len() == 2 && untils.iter().all(|u| (u - month).abs() < 120), "{untils:?}");
        // Past it, verified again; so too before its start (a clock set back).
        p.verified.lock().unwrap().values_mut().for_each(|v| v.1 = 0);
        assert!(matches!(p.check(Some(std::slice::from_ref(&alice))), CertCheck::Accepted(_)));
        assert_eq!(calls(), 5);
        p.verified.lock().unwrap().values_mut().for_each(|v| v.0 = i64::MAX);
        assert!(matches!(p.check(Some(std::slice::from_ref(&alice))), CertCheck::Accepted(_)));
        assert_eq!(calls(), 6);
        // The intermediates given to the verifier are part of the key.
        let with_extra = [alice.clone(), bob.clone()];
        let mut deep = policy(VerifyClient::On, Some(&good_ca));
        deep.max_intermediates = 1;
        set_current(&deep, counting.clone());
        assert!(matches!(deep.check(Some(std::slice::from_ref(&alice))), CertCheck::Accepted(_)));
        assert!(matches!(deep.check(Some(&with_extra)), CertCheck::Accepted(_)));
        assert_eq!(calls(), 8);
    }

    /// The verifier a policy uses now (over its CAs, all in date here).
    fn current(p: &ClientAuth) -> Arc<dyn ClientCertVerifier> {
        p.cas.as_ref().unwrap().current.lock().unwrap().1.clone().unwrap()
    }

    fn set_current(p: &ClientAuth, v: Arc<dyn ClientCertVerifier>) {
        p.cas.as_ref().unwrap().current.lock().unwrap().1 = Some(v);
    }

    #[test]
    fn names_are_escaped_for_headers() {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "Zoë \"x\"+y;#=\r\n ");
        let cert = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let (d, _, _) = details(cert.der()).unwrap();
        assert_eq!(d.subject, "CN=Zo\\C3\\AB \\\"x\\\"\\+y\\;#=\\0D\\0A\\ ");
        assert!(d.subject.bytes().all(|b| (0x20..0x7f).contains(&b)));
    }

    /// BMPString and the other wide types are printed as their text, as OpenSSL does, not as
    /// their bytes (`\00a\00l...`).
    #[test]
    fn wide_string_names_are_printed_as_text() {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        let bmp = rcgen::string::BmpString::try_from("Zoë").unwrap();
        p.distinguished_name.push(DnType::CommonName, rcgen::DnValue::BmpString(bmp));
        let universal = rcgen::string::UniversalString::try_from("Ünit").unwrap();
        p.distinguished_name.push(DnType::OrganizationalUnitName, rcgen::DnValue::UniversalString(universal));
        let cert = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let (d, _, _) = details(cert.der()).unwrap();
        assert_eq!(d.subject, "OU=\\C3\\9Cnit,CN=Zo\\C3\\AB");
        assert_eq!(value_text(20, b"caf\xe9").as_deref(), Some("café"));
        assert_eq!(value_text(30, b"\x00"), None);
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let missing = Path::new("/nonexistent/ca.pem");
        assert!(super::super::load_roots(missing).unwrap_err().contains("/nonexistent/ca.pem"));
        let dir = std::env::temp_dir().join(format!("portcullis-cc-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(super::super::load_roots(&empty).unwrap_err().contains("no CA certificates"));
        assert!(ClientAuth::new(&ClientCertSettings { mode: VerifyClient::On, ..Default::default() }).is_err());
    }
}
