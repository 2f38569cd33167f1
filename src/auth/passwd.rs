//! Users from a Dovecot-style passwd-file: `user:{SCHEME}hash:uid:gid:gecos:home:shell:extra`.
//!
//! Only the user, the password and the extra fields matter to the proxy; the uid..shell fields
//! may be empty. Extra fields are space-separated `key=value` pairs; `backend=a,b` pins a user to
//! backends (the one speaking the session's protocol is used). Dovecot's fields that refuse or
//! restrict a login (`nologin`, `fail`, `allow_nets`, `allow_real_nets`) are refused at load
//! rather than ignored; other extra fields are ignored. Hashes are parsed when the file is loaded, so a malformed entry is a config error
//! with a line number, never a surprise at login. Verification is CPU-heavy and must run in
//! `spawn_blocking` (see `auth::Authenticator`).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use subtle::ConstantTimeEq;

use crate::config::UserRule;

#[derive(Debug)]
pub enum LoadError {
    Io(std::io::Error),
    Line { line: usize, field: String, message: String },
}

/// A password hash in one of the schemes hosting teams have in their Dovecot user files.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    /// `{PLAIN}`: for tests and demos only.
    Plain(String),
    /// `{ARGON2ID}` / `{ARGON2I}`: a PHC string `$argon2id$v=19$...`.
    Argon2(String),
    /// `{BLF-CRYPT}`: bcrypt `$2y$...`.
    BlfCrypt(String),
    /// `{SHA512-CRYPT}` `$6$...` and `{SHA256-CRYPT}` `$5$...`.
    ShaCrypt(String),
    /// `{SSHA512}`, `{SSHA256}`, `{SSHA}` (base64 of the digest of password and salt, then the
    /// salt) and their unsalted `{SHA512}`, `{SHA256}`, `{SHA}`: what older Dovecot and LDAP
    /// setups hold. One digest, so as cheap to guess as `PLAIN` is to read: for migrations.
    Digest { algorithm: &'static aws_lc_rs::digest::Algorithm, digest: Vec<u8>, salt: Vec<u8> },
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self {
            PasswordHash::Plain(_) => "PLAIN",
            PasswordHash::Argon2(_) => "ARGON2",
            PasswordHash::BlfCrypt(_) => "BLF-CRYPT",
            PasswordHash::ShaCrypt(_) => "SHA-CRYPT",
            PasswordHash::Digest { salt, .. } if salt.is_empty() => "SHA",
            PasswordHash::Digest { .. } => "SSHA",
        };
        write!(f, "{{{scheme}}}<redacted>")
    }
}

impl PasswordHash {
    /// Parse `{SCHEME}data`, checking that the data is well formed for its scheme. Without a
    /// `{SCHEME}`, or with `{CRYPT}`, a crypt(3) string is taken by its own marker (`$6$`, `$5$`,
    /// `$2y$`, `$argon2id$`), as Dovecot's default scheme CRYPT does.
    pub fn parse(s: &str) -> Result<PasswordHash, String> {
        const SCHEMES: &str = "ARGON2ID, BLF-CRYPT, SHA512-CRYPT, SHA256-CRYPT, CRYPT, SSHA512, SSHA256, SSHA, SHA512, SHA256, SHA, SHA1, PLAIN";
        let (scheme, data) = match s.strip_prefix('{').and_then(|r| r.split_once('}')) {
            Some((scheme, data)) if !scheme.eq_ignore_ascii_case("CRYPT") => (scheme, data),
            crypt => {
                let data = crypt.map_or(s, |(_, d)| d);
                let scheme = match data {
                    d if d.starts_with("$6$") => "SHA512-CRYPT",
                    d if d.starts_with("$5$") => "SHA256-CRYPT",
                    d if ["$2y$", "$2b$", "$2a$"].iter().any(|m| d.starts_with(m)) => "BLF-CRYPT",
                    d if d.starts_with("$argon2") => "ARGON2ID",
                    _ if crypt.is_some() => {
                        return Err(
                            "a CRYPT hash must be $6$, $5$, $2y$ or $argon2 (DES and MD5 crypt are not supported)"
                                .into(),
                        );
                    }
                    _ => {
                        return Err(format!(
                            "password must start with {{SCHEME}} ({SCHEMES}); a crypt(3) hash without one must be $6$, $5$, $2y$ or $argon2 (DES and MD5 crypt are not supported)"
                        ));
                    }
                };
                (scheme, data)
            }
        };
        let data = data.to_string();
        let digest = |algorithm: &'static aws_lc_rs::digest::Algorithm, salted: bool| {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| format!("malformed {scheme} hash (base64): {e}"))?;
            let n = algorithm.output_len();
            if raw.len() < n || (!salted && raw.len() != n) {
                return Err(format!("malformed {scheme} hash: {} bytes, a digest is {n}", raw.len()));
            }
            let (digest, salt) = raw.split_at(n);
            Ok(PasswordHash::Digest { algorithm, digest: digest.to_vec(), salt: salt.to_vec() })
        };
        use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, SHA512};
        match scheme.to_ascii_uppercase().as_str() {
            "PLAIN" | "CLEARTEXT" => Ok(PasswordHash::Plain(data)),
            "SSHA512" => digest(&SHA512, true),
            "SSHA256" => digest(&SHA256, true),
            "SSHA" => digest(&SHA1_FOR_LEGACY_USE_ONLY, true),
            "SHA512" => digest(&SHA512, false),
            "SHA256" => digest(&SHA256, false),
            "SHA" | "SHA1" => digest(&SHA1_FOR_LEGACY_USE_ONLY, false),
            "ARGON2ID" | "ARGON2I" => {
                let parsed = argon2::password_hash::phc::PasswordHash::new(&data)
                    .map_err(|e| format!("malformed {scheme} hash: {e}"))?;
                // Well-formed but with parameters Argon2 refuses would pass `check` and then fail
                // every login. (The algorithm is the hash's own: `{ARGON2ID}$argon2i$...`
                // verifies as argon2i, as Dovecot's does.)
                argon2::Params::try_from(&parsed).map_err(|e| format!("{scheme} hash parameters: {e}"))?;
                Ok(PasswordHash::Argon2(data))
            }
            "BLF-CRYPT" => {
                if !(data.starts_with("$2y$") || data.starts_with("$2b$") || data.starts_with("$2a$"))
                    || data.len() != 60
                {
                    return Err("malformed BLF-CRYPT hash".into());
                }
                Ok(PasswordHash::BlfCrypt(data))
            }
            "SHA512-CRYPT" | "SHA256-CRYPT" => {
                let prefix = if scheme.eq_ignore_ascii_case("SHA512-CRYPT") { "$6$" } else { "$5$" };
                if !data.starts_with(prefix) {
                    return Err(format!("{scheme} hash must start with {prefix}"));
                }
                sha_crypt::PasswordHashRef::new(&data).map_err(|e| format!("malformed {scheme} hash: {e}"))?;
                Ok(PasswordHash::ShaCrypt(data))
            }
            other => Err(format!("unsupported password scheme {other:?} ({SCHEMES})")),
        }
    }

    /// How expensive the hash is to verify: roughly the microseconds one check takes on a
    /// current x86 core, from each scheme's own cost parameters (bcrypt's cost, Argon2's memory
    /// times passes, SHA-crypt's rounds). Only the order matters, across schemes too: a users
    /// file mixing SHA-crypt at 656,000 rounds (passlib's default, about half a second) with
    /// bcrypt at cost 5 (about 2 ms) must take the SHA-crypt hash as the stand-in.
    fn cost(&self) -> u64 {
        // `name=value` in a `$`- or `,`-separated hash string.
        let param = |h: &str, name: &str| {
            h.split(['$', ',']).find_map(|p| p.strip_prefix(name)?.strip_prefix('=')?.parse::<u64>().ok())
        };
        match self {
            PasswordHash::Plain(_) => 0,
            PasswordHash::Digest { .. } => 1,
            // About 0.7 µs a round (5,000 by default: 3.5 ms).
            PasswordHash::ShaCrypt(h) => param(h, "rounds").unwrap_or(5000).saturating_mul(7) / 10,
            // About 60 µs times 2^cost (cost 10: 60 ms).
            PasswordHash::BlfCrypt(h) => {
                let cost = h.get(4..6).and_then(|c| c.parse::<u32>().ok()).unwrap_or(0).min(31);
                60u64 << cost
            }
            // About 0.6 µs per KiB and pass (19 MiB, 2 passes: 24 ms).
            PasswordHash::Argon2(h) => {
                param(h, "m").unwrap_or(0).saturating_mul(param(h, "t").unwrap_or(1)).saturating_mul(6) / 10
            }
        }
    }

    /// Check a password. CPU-bound for every scheme but PLAIN: call from a blocking thread.
    pub fn verify(&self, password: &[u8]) -> bool {
        use argon2::password_hash::PasswordVerifier;
        match self {
            // Compared as digests: a comparison of the texts themselves ends at once when the
            // lengths differ, which would tell the stored password's length.
            PasswordHash::Plain(p) => {
                let digest = |b: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
                digest(p.as_bytes()).as_ref().ct_eq(digest(password).as_ref()).into()
            }
            PasswordHash::Argon2(h) => match argon2::password_hash::phc::PasswordHash::new(h) {
                Ok(parsed) => argon2::Argon2::default().verify_password(password, &parsed).is_ok(),
                Err(_) => false,
            },
            PasswordHash::BlfCrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            PasswordHash::ShaCrypt(h) => {
                sha_crypt::PasswordVerifier::verify_password(&sha_crypt::ShaCrypt::default(), password, h.as_str())
                    .is_ok()
            }
            PasswordHash::Digest { algorithm, digest, salt } => {
                let mut context = aws_lc_rs::digest::Context::new(algorithm);
                context.update(password);
                context.update(salt);
                context.finish().as_ref().ct_eq(digest).into()
            }
        }
    }
}

/// Make a `{ARGON2ID}` entry for a users file.
pub fn hash_argon2id(password: &[u8]) -> Result<String, String> {
    use argon2::password_hash::PasswordHasher;
    let hash = argon2::Argon2::default().hash_password(password).map_err(|e| e.to_string())?;
    Ok(format!("{{ARGON2ID}}{hash}"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub hash: PasswordHash,
    /// Backends this user is pinned to (`backend=a,b`); the one speaking the session's protocol
    /// is used.
    pub backends: Vec<String>,
    /// Where the entry is in the file, for errors found after loading.
    pub line: usize,
}

#[derive(Debug, Default)]
pub struct UserDb {
    users: HashMap<String, UserEntry>,
    /// The hash of the costliest scheme in the file (the first such entry): what an unknown
    /// user's password is checked against, so that an unknown name costs what a known one does
    /// (no user enumeration by timing).
    stand_in: Option<PasswordHash>,
}

impl UserDb {
    pub fn load(path: &Path, rule: &UserRule) -> Result<UserDb, LoadError> {
        let text = std::fs::read_to_string(path).map_err(LoadError::Io)?;
        Self::parse(&text, rule)
    }

    /// Parse a users file; names are made canonical with `rule`, as logins will be.
    pub fn parse(text: &str, rule: &UserRule) -> Result<UserDb, LoadError> {
        let mut users = HashMap::new();
        let mut stand_in = None;
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let err = |field: &str, message: String| LoadError::Line { line: line_no, field: field.into(), message };
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.splitn(8, ':').collect();
            if fields.len() < 2 {
                return Err(err("user", "expected user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]".into()));
            }
            let user = rule.canonical(fields[0]).ok_or_else(|| err("user", "empty or invalid user name".into()))?;
            let hash = PasswordHash::parse(fields[1]).map_err(|m| err("password", m))?;
            let mut backends = Vec::new();
            if let Some(extra) = fields.get(7) {
                for kv in extra.split_whitespace() {
                    match kv.split_once('=') {
                        Some(("backend", v)) if !v.is_empty() => {
                            backends.extend(v.split(',').filter(|b| !b.is_empty()).map(str::to_string))
                        }
                        // Fields with which Dovecot refuses or restricts a login: ignoring them
                        // would let in a user the file shuts out.
                        Some((k @ ("allow_nets" | "allow_real_nets"), _)) => {
                            return Err(err(
                                "extra",
                                format!("{k} is not supported here: the user would not be restricted"),
                            ));
                        }
                        // Bare or with a value (`nologin=y`, as Dovecot's documentation writes it).
                        _ if matches!(kv.split_once('=').map_or(kv, |(k, _)| k), "nologin" | "fail") => {
                            let k = kv.split_once('=').map_or(kv, |(k, _)| k);
                            return Err(err(
                                "extra",
                                format!("{k} is not supported here: the user would not be refused"),
                            ));
                        }
                        // Other Dovecot extra fields (userdb_*, nodelay, ...) are allowed and ignored.
                        _ => {}
                    }
                }
            }
            // The costliest hash in the file, so no unknown name answers sooner than a real one.
            if stand_in.as_ref().is_none_or(|s: &PasswordHash| s.cost() < hash.cost()) {
                stand_in = Some(hash.clone());
            }
            if users.insert(user.clone(), UserEntry { hash, backends, line: line_no }).is_some() {
                return Err(err("user", format!("duplicate user {user:?}")));
            }
        }
        Ok(UserDb { users, stand_in })
    }

    /// A hash to check an unknown user's password against (its result never counts).
    pub fn stand_in(&self) -> Option<&PasswordHash> {
        self.stand_in.as_ref()
    }

    pub fn get(&self, canonical_user: &str) -> Option<&UserEntry> {
        self.users.get(canonical_user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// (line, user, backend) for every user pinned to a backend, in file order, for config
    /// validation.
    pub fn backend_refs(&self) -> Vec<(usize, &str, &str)> {
        let mut refs: Vec<(usize, &str, &str)> = self
            .users
            .iter()
            .flat_map(|(u, e)| e.backends.iter().map(move |b| (e.line, u.as_str(), b.as_str())))
            .collect();
        refs.sort_unstable();
        refs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl UserDb {
        fn parse_default(text: &str) -> Result<UserDb, LoadError> {
            UserDb::parse(text, &UserRule::default())
        }
    }

    #[test]
    fn parses_entries_and_extra_fields() {
        let db =
            UserDb::parse_default("# comment\n\nalice@Example.TEST:{PLAIN}pw::::::backend=b1 nodelay\nbob:{PLAIN}x\n")
                .unwrap();
        assert_eq!(db.len(), 2);
        let a = db.get("alice@example.test").unwrap();
        assert_eq!(a.backends, vec!["b1".to_string()]);
        assert!(a.hash.verify(b"pw"));
        assert!(!a.hash.verify(b"pw2"));
    }

    #[test]
    fn rejects_bad_lines_with_line_number() {
        match UserDb::parse_default("ok:{PLAIN}x\nbad:{MD5}abc\n") {
            Err(LoadError::Line { line, field, .. }) => {
                assert_eq!(line, 2);
                assert_eq!(field, "password");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(UserDb::parse_default("nohash\n"), Err(LoadError::Line { line: 1, .. })));
        assert!(matches!(UserDb::parse_default("a:{ARGON2ID}garbage\n"), Err(LoadError::Line { line: 1, .. })));
        // Well-formed, unusable: parameters Argon2 refuses (m=1).
        let bad = "{ARGON2ID}$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        assert!(matches!(UserDb::parse_default(&format!("a:{bad}\n")), Err(LoadError::Line { line: 1, .. })));
        // The hash's own algorithm counts, not the label: Dovecot verifies these too.
        let argon2i = "{ARGON2ID}$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        assert!(UserDb::parse_default(&format!("a:{argon2i}\n")).is_ok());
        let good = hash_argon2id(b"pw").unwrap();
        assert!(UserDb::parse_default(&format!("a:{good}\n")).is_ok());
        assert!(matches!(UserDb::parse_default("a:{PLAIN}x\na:{PLAIN}y\n"), Err(LoadError::Line { line: 2, .. })));
        // Dovecot fields that shut a user out are refused, never ignored (the user would get in).
        for extra in
            ["nologin", "nologin=y", "fail=yes", "fail", "allow_nets=10.0.0.0/8", "nodelay allow_real_nets=127.0.0.1"]
        {
            match UserDb::parse_default(&format!("ok:{{PLAIN}}x\nbob:{{PLAIN}}y::::::{extra}\n")) {
                Err(LoadError::Line { line: 2, field, .. }) => assert_eq!(field, "extra", "{extra}"),
                other => panic!("{extra}: unexpected {other:?}"),
            }
        }
    }

    /// Unknown users are checked against the costliest hash, cost parameters included: a cheap
    /// early bcrypt or Argon2 hash would let unknown names answer sooner than real ones.
    #[test]
    fn the_stand_in_is_the_costliest_hash() {
        let (cheap, dear) = (bcrypt::hash("x", 4).unwrap(), bcrypt::hash("x", 6).unwrap());
        let db = UserDb::parse_default(&format!(
            "a:{{BLF-CRYPT}}{cheap}
b:{{BLF-CRYPT}}{dear}
c:{{PLAIN}}x
"
        ))
        .unwrap();
        assert!(matches!(db.stand_in(), Some(PasswordHash::BlfCrypt(h)) if *h == dear));
        let argon =
            |m: u32, t: u32| format!("{{ARGON2ID}}$argon2id$v=19$m={m},t={t},p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA");
        let db = UserDb::parse_default(&format!(
            "a:{}
b:{}
c:{}
",
            argon(19456, 2),
            argon(65536, 3),
            argon(8192, 1)
        ))
        .unwrap();
        assert!(matches!(db.stand_in(), Some(PasswordHash::Argon2(h)) if h.contains("m=65536,t=3")));
        let sha = |rounds: &str| {
            format!(
                "{{SHA512-CRYPT}}$6${rounds}saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1"
            )
        };
        assert!(
            PasswordHash::parse(&sha("rounds=9000$")).unwrap().cost() > PasswordHash::parse(&sha("")).unwrap().cost()
        );
        // Across schemes by what a check costs, not by the scheme: SHA-crypt at passlib's
        // 656,000 rounds outweighs bcrypt at cost 5, and bcrypt at cost 14 outweighs it.
        let slow_sha = sha("rounds=656000$");
        let db = UserDb::parse_default(&format!("a:{slow_sha}\nb:{{BLF-CRYPT}}{cheap}\n")).unwrap();
        assert!(matches!(db.stand_in(), Some(PasswordHash::ShaCrypt(h)) if h.contains("rounds=656000")));
        let dearer = format!("$2y$14${}", &dear[7..]);
        let db = UserDb::parse_default(&format!("a:{slow_sha}\nb:{{BLF-CRYPT}}{dearer}\n")).unwrap();
        assert!(matches!(db.stand_in(), Some(PasswordHash::BlfCrypt(h)) if h.starts_with("$2y$14$")));
    }

    /// PLAIN passwords are compared in time that does not depend on where they differ or on
    /// their lengths (compared as digests); the answer is still exact.
    #[test]
    fn plain_passwords_compare_exactly() {
        let plain = PasswordHash::parse("{PLAIN}secret").unwrap();
        assert!(plain.verify(b"secret"));
        for wrong in [&b""[..], b"secre", b"secret ", b"Secret", b"secretsecret"] {
            assert!(!plain.verify(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn verifies_every_scheme() {
        let bc = bcrypt::hash("secret", 4).unwrap();
        let blf = PasswordHash::parse(&format!("{{BLF-CRYPT}}{bc}")).unwrap();
        assert!(blf.verify(b"secret"));
        assert!(!blf.verify(b"Secret"));
        // `openssl passwd -6 / -5 -salt saltsalt secret`, as Dovecot's SHA512-CRYPT / SHA256-CRYPT store them.
        let sha512 = PasswordHash::parse("{SHA512-CRYPT}$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1").unwrap();
        assert!(sha512.verify(b"secret"));
        assert!(!sha512.verify(b"secreT"));
        let sha256 =
            PasswordHash::parse("{SHA256-CRYPT}$5$saltsalt$0IyaXrmV7.sGNS6tirgqHLqX/G.FBvgkYA.lpPdS5sA").unwrap();
        assert!(sha256.verify(b"secret"));
        assert!(!sha256.verify(b""));
        let argon = hash_argon2id("s3cr\u{e9}t".as_bytes()).unwrap();
        let h3 = PasswordHash::parse(&argon).unwrap();
        assert!(h3.verify("s3cr\u{e9}t".as_bytes()));
        assert!(!h3.verify(b"secret"));
        assert!(!format!("{h3:?}").contains("argon2id$"), "Debug must not print the hash");
    }

    /// What older Dovecot and LDAP users files hold: a crypt(3) string with no scheme or
    /// `{CRYPT}` (taken by its marker), and the (salted) SHA digests. Expected values from
    /// `openssl passwd` and Python's hashlib.
    #[test]
    fn verifies_crypt_without_a_scheme_and_sha_digests() {
        let sha512 =
            "$6$abcdefgh$ltjgWl6579NluT/Vi1nwEvcil.G5Nbc4NiXZaNGStk8PSwGfQv72N2CKPPrVACtLtip/cZ/1GM/O6IND4WQhG.";
        for entry in [
            sha512.to_string(),
            format!("{{CRYPT}}{sha512}"),
            format!("{{crypt}}{}", bcrypt::hash("secret", 4).unwrap()),
        ] {
            let h = PasswordHash::parse(&entry).unwrap();
            assert!(h.verify(b"secret") && !h.verify(b"secreT"), "{entry}");
        }
        for (entry, password) in [
            (
                "{SSHA512}aCu7JRc+kLsuEmFs1zTY+AiP7DSGnjjG+dH28Dp+E5usqoAixeTPihKqZmkWal4mUfp63tqvCAkFV1LKTDFH6XNhbHRzYWx0",
                "secret",
            ),
            ("{SHA256}MMlS+rEiw/l1nwKm2Vw3WLJGtP7iOZV7LU/uRuJhcMQ=", "pw"),
            ("{SSHA}74L53nwlLqeQf7yzYP9SroC99HZOYUNs", "pw"),
        ] {
            let h = PasswordHash::parse(entry).unwrap();
            assert!(h.verify(password.as_bytes()), "{entry}");
            assert!(!h.verify(b"wrong") && !h.verify(b""), "{entry}");
            assert!(format!("{h:?}").ends_with("SHA}<redacted>"));
        }
        // DES and MD5 crypt, a digest of the wrong length, bad base64: refused at load.
        for bad in ["abJnggxhB/yWI", "$1$salt$hash", "{SHA256}c2hvcnQ=", "{SSHA512}not base64!", "{MD5}abc"] {
            assert!(PasswordHash::parse(bad).is_err(), "{bad}");
        }
    }
}
