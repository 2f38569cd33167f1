//! SASL PLAIN (RFC 4616) and LOGIN decoding into `Credentials`.
//!
//! Input is the already base64-decoded client response. Malformed input is `None`: the caller
//! answers it exactly like a wrong password. Authorisation identities other than the user itself
//! are refused here (reliability case 37): the proxy never lets a client act as someone else.

use base64::Engine;

use crate::auth::{Credentials, MAX_PASSWORD_LEN, MAX_USER_LEN, Password};

/// A SASL PLAIN response line for a backend: `prefix`, then base64 of `authzid NUL authcid NUL
/// password`, then CRLF. It holds a password, so it comes back as a `Password` (zeroed when
/// dropped), and the message it was encoded from is zeroed here; no other copy is made.
pub fn plain_response(prefix: &[u8], authzid: &[u8], authcid: &[u8], password: &[u8]) -> Password {
    let mut msg = Vec::with_capacity(authzid.len() + authcid.len() + password.len() + 2);
    msg.extend_from_slice(authzid);
    msg.push(0);
    msg.extend_from_slice(authcid);
    msg.push(0);
    msg.extend_from_slice(password);
    let line = base64_line(prefix, &msg);
    crate::auth::wipe(&mut msg);
    line
}

/// `prefix`, then base64 of `secret`, then CRLF, as a `Password` (zeroed when dropped): a SASL
/// response that may hold a password.
pub fn base64_line(prefix: &[u8], secret: &[u8]) -> Password {
    let encoded = base64::encoded_len(secret.len(), true).unwrap_or(0);
    let mut line = vec![0u8; prefix.len() + encoded + 2];
    line[..prefix.len()].copy_from_slice(prefix);
    let written =
        base64::engine::general_purpose::STANDARD.encode_slice(secret, &mut line[prefix.len()..]).unwrap_or(0);
    line.truncate(prefix.len() + written);
    line.extend_from_slice(b"\r\n");
    Password::new(line)
}

/// Decode `authzid NUL authcid NUL passwd`.
pub fn decode_plain(msg: &[u8]) -> Option<Credentials> {
    let mut parts = msg.split(|b| *b == 0);
    let authzid = parts.next()?;
    let authcid = parts.next()?;
    let passwd = parts.next()?;
    if parts.next().is_some() || authcid.is_empty() || passwd.is_empty() {
        return None;
    }
    if !authzid.is_empty() && authzid != authcid {
        return None;
    }
    credentials(authcid, passwd)
}

/// Build credentials from a LOGIN user name and password (SASL LOGIN or IMAP LOGIN).
pub fn credentials(user: &[u8], password: &[u8]) -> Option<Credentials> {
    if user.is_empty() || user.len() > MAX_USER_LEN || password.is_empty() || password.len() > MAX_PASSWORD_LEN {
        return None;
    }
    if password.contains(&0) {
        return None;
    }
    let user = std::str::from_utf8(user).ok()?;
    if user.chars().any(|c| c.is_control()) {
        return None;
    }
    Some(Credentials { user: user.to_string(), password: Password::new(password.to_vec()) })
}

/// SASL EXTERNAL's one response: the user to act as (the authorisation identity). An empty one
/// (leave it to the certificate) is refused: the proxy routes and limits by user name.
pub fn external(authzid: &[u8]) -> Option<Credentials> {
    if authzid.is_empty() || authzid.len() > MAX_USER_LEN || authzid.contains(&0) {
        return None;
    }
    let user = std::str::from_utf8(authzid).ok()?;
    if user.chars().any(|c| c.is_control()) {
        return None;
    }
    Some(Credentials { user: user.to_string(), password: Password::new(Vec::new()) })
}

/// The server challenges of SASL LOGIN, base64 of "Username:" and "Password:".
pub const LOGIN_USER_CHALLENGE: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_response_line() {
        let line = plain_response(b"AUTH PLAIN ", b"", b"alice", b"secret");
        // base64("\0alice\0secret")
        assert_eq!(line.expose(), b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        let line = plain_response(b"", b"alice", b"master", b"pw");
        assert_eq!(line.expose(), b"YWxpY2UAbWFzdGVyAHB3\r\n");
    }
    use proptest::prelude::*;

    #[test]
    fn plain_forms() {
        let c = decode_plain(b"\0alice\0pw").unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.password.expose(), b"pw");
        assert!(decode_plain(b"alice\0alice\0pw").is_some());
        // Reliability case 37: authzid differing from authcid is refused.
        assert!(decode_plain(b"admin\0alice\0pw").is_none());
        // Case 38: wrong NUL counts, empty parts, NUL in password.
        assert!(decode_plain(b"alice").is_none());
        assert!(decode_plain(b"\0alice").is_none());
        assert!(decode_plain(b"\0alice\0pw\0x").is_none());
        assert!(decode_plain(b"\0\0pw").is_none());
        assert!(decode_plain(b"\0alice\0").is_none());
        assert!(decode_plain(b"\0\xff\xfe\0pw").is_none());
    }

    #[test]
    fn external_names_a_user_and_nothing_else() {
        let c = external(b"alice@example.org").unwrap();
        assert_eq!((c.user.as_str(), c.password.expose()), ("alice@example.org", &b""[..]));
        assert!(external(b"").is_none());
        assert!(external(b"a\0b").is_none());
        assert!(external(b"a\rb").is_none());
        assert!(external(b"\xff").is_none());
        assert!(external(&[b'a'; 300]).is_none());
    }

    proptest! {
        #[test]
        fn plain_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Some(c) = decode_plain(&bytes) {
                prop_assert!(!c.user.is_empty());
                prop_assert!(!c.password.expose().contains(&0));
            }
        }
    }
}

/// One client response in a SASL exchange (a base64 line, or `*` to cancel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Data(Vec<u8>),
    Cancel,
    /// Not base64: answered with the protocol's syntax error.
    Invalid,
}

/// Longest base64 response accepted (RFC 4954 allows 12288 octets for an AUTH line).
pub const MAX_RESPONSE: usize = 12288;

/// Decode a continuation line or an initial response (`=` is the empty response, RFC 4954).
pub fn decode_response(line: &[u8]) -> Response {
    use base64::Engine;
    if line == b"*" {
        return Response::Cancel;
    }
    if line == b"=" {
        return Response::Data(Vec::new());
    }
    if line.len() > MAX_RESPONSE {
        return Response::Invalid;
    }
    match base64::engine::general_purpose::STANDARD.decode(line) {
        Ok(d) => Response::Data(d),
        Err(_) => Response::Invalid,
    }
}

#[cfg(test)]
mod response_tests {
    use super::*;

    #[test]
    fn responses() {
        assert_eq!(decode_response(b"*"), Response::Cancel);
        assert_eq!(decode_response(b"="), Response::Data(Vec::new()));
        assert_eq!(decode_response(b"dXNlcg=="), Response::Data(b"user".to_vec()));
        // Reliability case 39: garbage, bad padding, whitespace.
        assert_eq!(decode_response(b"dXNlcg="), Response::Invalid);
        assert_eq!(decode_response(b"d XNlcg=="), Response::Invalid);
        assert_eq!(decode_response(b"!!"), Response::Invalid);
    }
}
