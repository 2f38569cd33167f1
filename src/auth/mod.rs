//! Who is this client? Credentials in, a verdict out.
//!
//! Sources: a passwd-file (hashes checked here, off the async threads) or the backend itself
//! (`AuthSource::Backend`: the route is chosen from the user name and the backend's login reply
//! is the only proof). This module never talks to the network and never logs secrets.

pub mod http;
pub mod passwd;

use std::fmt;

use crate::config::{AuthSource, Config};

/// Longest user name accepted (RFC 4616 caps SASL identities at 255 octets).
pub const MAX_USER_LEN: usize = 255;
/// Longest password accepted.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// A password: bytes, redacted in Debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Vec<u8>);

impl Password {
    pub fn new(bytes: Vec<u8>) -> Password {
        Password(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The bytes to build a secret in place (a command line holding a password): whatever is
    /// written is zeroed on drop, on every path out. Reserve enough first: growing the vector
    /// would free a copy unzeroed.
    pub fn buffer_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Password {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Best effort: zero a buffer that held a password and empty it, so the bytes do not linger in
/// freed memory. `black_box` keeps the optimiser from dropping the stores as dead.
pub fn wipe(buf: &mut Vec<u8>) {
    buf.iter_mut().for_each(|b| *b = 0);
    std::hint::black_box(&mut *buf);
    buf.clear();
}

/// What a client presented: a user name as typed and a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name exactly as the client sent it (replayed to backends as is).
    pub user: String,
    pub password: Password,
}

/// The verdict for one login attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The password matched. `backends` are the backends the user's entry pins it to.
    Accepted { user: String, backends: Vec<String> },
    /// The backend will verify (backend-verified source): route by `user`.
    Deferred { user: String },
    /// Unknown user, wrong password or malformed credentials: all the same to the client.
    Rejected { user: Option<String> },
}

/// Decide on credentials using the config snapshot's auth source.
pub async fn authenticate(config: &Config, creds: &Credentials) -> Verdict {
    let Some(user) = config.users.canonical(&creds.user) else {
        return Verdict::Rejected { user: None };
    };
    if creds.password.expose().is_empty() || creds.password.expose().len() > MAX_PASSWORD_LEN {
        return Verdict::Rejected { user: Some(user) };
    }
    match &config.auth {
        // The HTTP service is asked by the session (it needs the connection's details).
        AuthSource::Backend | AuthSource::Http(_) => Verdict::Deferred { user },
        AuthSource::PasswdFile { users, .. } => {
            // An unknown user's password is checked too, against the file's costliest hash, and
            // the answer discarded: an unknown name must not answer sooner than a wrong password.
            let (hash, backends, known) = match (users.get(&user), users.stand_in()) {
                (Some(entry), _) => (entry.hash.clone(), entry.backends.clone(), true),
                (None, Some(stand_in)) => (stand_in.clone(), Vec::new(), false),
                (None, None) => return Verdict::Rejected { user: Some(user) },
            };
            let password = creds.password.clone();
            // Hash checks (Argon2id: ~19 MiB and tens of milliseconds each) run a few at a time,
            // not one blocking thread per attempt: a burst of guesses queues here instead of
            // taking gigabytes and every core.
            // The permit goes with the check itself: a login dropped meanwhile (shutdown) does not
            // free it while the hash still runs on its blocking thread.
            let Ok(permit) = verify_permits().clone().acquire_owned().await else {
                return Verdict::Rejected { user: Some(user) };
            };
            let ok = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                hash.verify(password.expose())
            })
            .await
            .unwrap_or(false);
            if ok && known { Verdict::Accepted { user, backends } } else { Verdict::Rejected { user: Some(user) } }
        }
    }
}

/// Password hash checks allowed at once: one per core.
fn verify_permits() -> &'static std::sync::Arc<tokio::sync::Semaphore> {
    static PERMITS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        std::sync::Arc::new(tokio::sync::Semaphore::new(cores))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reliability case 43: case variants of one user are one name for routing and limits.
    #[test]
    fn canonical_names() {
        use crate::config::{Lowercase, UserRule};
        let r = UserRule::default();
        assert_eq!(r.canonical("Alice@EXAMPLE.test").as_deref(), Some("alice@example.test"));
        let domain_only = UserRule { lowercase: Lowercase::Domain, ..UserRule::default() };
        assert_eq!(domain_only.canonical("Alice@EXAMPLE.test").as_deref(), Some("Alice@example.test"));
        assert_eq!(r.canonical("bob").as_deref(), Some("bob"));
        assert_eq!(r.canonical(""), None);
        assert_eq!(r.canonical("a b"), None);
        assert_eq!(r.canonical("a\u{0}b"), None);
        assert_eq!(r.canonical("@x"), None);
        assert_eq!(r.canonical("x@"), None);
        // Postfix's XCLIENT takes LOGIN=[UNAVAILABLE] for no login at all.
        assert_eq!(r.canonical("[UNAVAILABLE]"), None);
        assert_eq!(r.canonical("[tempunavail]@example.test"), None);
        assert_eq!(r.canonical(&"a".repeat(256)), None);
        let all = UserRule {
            lowercase: Lowercase::All,
            default_domain: Some("example.org".into()),
            strip_default_domain: false,
        };
        assert_eq!(all.canonical("Bob").as_deref(), Some("bob@example.org"));
        assert_eq!(all.canonical("Bob@Example.NET").as_deref(), Some("bob@example.net"));
        let strip = UserRule {
            lowercase: Lowercase::Domain,
            default_domain: Some("example.org".into()),
            strip_default_domain: true,
        };
        assert_eq!(strip.canonical("Bob@EXAMPLE.org").as_deref(), Some("Bob"));
        assert_eq!(strip.canonical("Bob").as_deref(), Some("Bob"));
        assert_eq!(strip.canonical("bob@other.net").as_deref(), Some("bob@other.net"));
        // Internationalised domains: U-label, A-label (any case) and a decomposed U-label are one.
        for typed in
            ["jo@Bücher.Example", "jo@xn--bcher-kva.example", "jo@XN--BCHER-KVA.example", "jo@bu\u{308}cher.example"]
        {
            assert_eq!(r.canonical(typed).as_deref(), Some("jo@xn--bcher-kva.example"), "{typed}");
            assert_eq!(domain_only.canonical(typed).as_deref(), Some("jo@xn--bcher-kva.example"), "{typed}");
        }
        assert_eq!(r.canonical("jo@xn--zz.example"), None, "a broken A-label");
        let none = UserRule { lowercase: Lowercase::None, ..UserRule::default() };
        assert_eq!(none.canonical("Jo@Bücher.example").as_deref(), Some("Jo@Bücher.example"));
        let idn_default = UserRule {
            lowercase: Lowercase::All,
            default_domain: Some("xn--bcher-kva.example".into()),
            strip_default_domain: true,
        };
        assert_eq!(idn_default.canonical("jo@bücher.example").as_deref(), Some("jo"));
    }

    #[test]
    fn password_debug_is_redacted() {
        let c = Credentials { user: "u".into(), password: Password::new(b"hunter2".to_vec()) };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
