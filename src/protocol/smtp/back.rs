//! SMTP toward a submission backend, up to and including the login: greeting, EHLO, optional
//! STARTTLS (fail closed if refused), then `XCLIENT` per Postfix's XCLIENT_README (client
//! address, HELO name, protocol, and `LOGIN=` when the proxy's verification is to be trusted),
//! or `AUTH PLAIN` replay, or a master user. After XCLIENT the backend starts a new session, so
//! the client's own EHLO is replayed and the relay continues in the state the client expects.
//!
//! Values are xtext-encoded (RFC 3461) before they go into XCLIENT (reliability case 51).

use std::sync::Arc;

use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::auth::Credentials;
use crate::backend::{self, BackendError, ClientInfo, Lines, LoggedIn, MAX_BACKEND_LINE};
use crate::config::{Backend, BackendLogin, ClientAddress, Transport};
use crate::protocol::sasl::{base64_line, plain_response};

/// Most lines accepted in one multi-line reply.
const MAX_REPLY_LINES: usize = 64;

/// Connect, read the greeting, EHLO as `hostname`, and with `transport = "starttls"` upgrade
/// and EHLO again: the stream, its reader, and what the backend announces on it. Shared by the
/// login and the EHLO probe, so neither can skip a step of it.
pub(crate) async fn open(
    backend: &Backend,
    tls: Option<&Arc<ClientConfig>>,
    client: &ClientInfo,
    connect_timeout: std::time::Duration,
    hostname: &str,
) -> Result<(crate::tls::BackendStream, Lines, Vec<String>), BackendError> {
    let mut stream = backend::connect(backend, tls, client, connect_timeout).await?;
    let mut lines = Lines::default();
    let (code, text) = read_reply(&mut stream, &mut lines).await?;
    match code {
        220 => {}
        // The client's address given in a PROXY header, Postfix applies its per-client limits
        // before the greeting and names the client (`421 4.7.0 host Error: too many connections
        // from 192.0.2.1`): the client's own refusal, as at XCLIENT below, not the backend's.
        421 | 554
            if backend.client_address == ClientAddress::ProxyV2
                && !client.probe
                && text.iter().any(|t| names_address(t, client.peer.ip())) =>
        {
            return Err(BackendError::ClientRefused { temporary: code == 421, address: true });
        }
        421 | 554 => return Err(BackendError::Refused),
        _ => return Err(BackendError::Protocol("unexpected greeting")),
    }
    let mut exts = ehlo(&mut stream, &mut lines, hostname, true).await?;
    if backend.transport == Transport::StartTls {
        // Reliability case 12: no STARTTLS, no session; never fall back to plaintext.
        if !has(&exts, "STARTTLS") {
            return Err(BackendError::Protocol("backend does not offer STARTTLS"));
        }
        stream.write_all(b"STARTTLS\r\n").await?;
        if read_reply(&mut stream, &mut lines).await?.0 != 220 {
            return Err(BackendError::Protocol("backend refused STARTTLS"));
        }
        stream = backend::starttls(backend, tls, stream, &lines).await?;
        exts = ehlo(&mut stream, &mut lines, hostname, true).await?;
    }
    Ok((stream, lines, exts))
}

#[allow(clippy::too_many_arguments)]
pub async fn connect_and_login(
    backend: &Backend,
    tls: Option<Arc<ClientConfig>>,
    client: &ClientInfo,
    user: &str,
    creds: &Credentials,
    connect_timeout: std::time::Duration,
    hostname: &str,
) -> Result<LoggedIn, BackendError> {
    // Postfix refuses any XCLIENT value over 255 bytes ("attribute value too long"), as for
    // HELO below, but a login cannot leave its name out. Such a user cannot log in through
    // this backend: told before connecting, neither the user's password nor the backend's
    // health (its refusal of the XCLIENT would count against it for everyone).
    if backend.login == BackendLogin::Xclient && xtext(user.as_bytes()).len() > 255 {
        return Err(BackendError::UserUnsupported);
    }
    let (mut stream, mut lines, mut exts) = open(backend, tls.as_ref(), client, connect_timeout, hostname).await?;
    let announced = exts.clone();

    let xclient_login = backend.login == BackendLogin::Xclient;
    if backend.client_address == ClientAddress::Xclient || xclient_login {
        let Some(attrs) = exts.iter().find_map(|e| keyword_args(e, "XCLIENT")) else {
            return Err(BackendError::Protocol("backend does not offer XCLIENT (smtpd_authorized_xclient_hosts?)"));
        };
        let attrs: Vec<String> = attrs.split(' ').map(|a| a.to_ascii_uppercase()).collect();
        let supports = |a: &str| attrs.iter().any(|x| x == a);
        let mut cmd = String::from("XCLIENT");
        if backend.client_address == ClientAddress::Xclient {
            // The address is what XCLIENT is for: without it, fail closed as without XCLIENT.
            if !supports("ADDR") {
                return Err(BackendError::Protocol("backend XCLIENT does not accept ADDR"));
            }
            let addr = match client.peer.ip() {
                std::net::IpAddr::V4(a) => a.to_string(),
                std::net::IpAddr::V6(a) => format!("IPV6:{a}"),
            };
            for (name, value) in [
                ("ADDR", addr),
                ("PORT", client.peer.port().to_string()),
                ("NAME", "[UNAVAILABLE]".to_string()),
                ("PROTO", if client.esmtp { "ESMTP" } else { "SMTP" }.to_string()),
            ] {
                if supports(name) {
                    cmd.push_str(&format!(" {name}={}", xtext(value.as_bytes())));
                }
            }
            // Postfix refuses an XCLIENT value over 255 bytes before decoding ("attribute value
            // too long"): a client's long name, and a few `+` make it three times as long, must
            // not make the backend look broken. It still gets the name in the replayed EHLO.
            if let Some(helo) = client.helo.as_ref().map(|h| xtext(h.as_bytes())).filter(|h| h.len() <= 255)
                && supports("HELO")
            {
                cmd.push_str(&format!(" HELO={helo}"));
            }
        }
        if xclient_login {
            if !supports("LOGIN") {
                return Err(BackendError::Protocol("backend XCLIENT does not accept LOGIN"));
            }
            cmd.push_str(&format!(" LOGIN={}", xtext(user.as_bytes())));
        }
        cmd.push_str("\r\n");
        stream.write_all(cmd.as_bytes()).await?;
        let (code, text) = read_reply(&mut stream, &mut lines).await?;
        // Postfix answers XCLIENT by running its client checks again for the address it gives
        // (smtpd_client_restrictions with smtpd_delay_reject = no, a milter's connect check),
        // and names the client in such a refusal (`450 4.7.25 Client host rejected: cannot find
        // your hostname, [192.0.2.1]`, `554 5.7.1 <unknown[192.0.2.1]>: Client host
        // rejected`): the client's own, not a fault of the backend. The proxy's own XCLIENT
        // refused (not authorised, a bad attribute: 5.5.x syntax replies, which may quote the
        // ADDR sent) names no client.
        let addr_sent = backend.client_address == ClientAddress::Xclient;
        let syntax = (500..=504).contains(&code);
        let names_client = addr_sent && !syntax && text.iter().any(|t| names_address(t, client.peer.ip()));
        match code {
            220 => {}
            400..=599 if names_client => {
                return Err(BackendError::ClientRefused { temporary: code < 500, address: true });
            }
            421 => return Err(BackendError::Refused),
            // A syntax refusal of the client's own HELO name (Postfix: "501 5.5.4 Bad HELO
            // syntax") is the client's, as for the replayed EHLO below; other 501s are the
            // proxy's XCLIENT (its configuration), which counts against the backend.
            501 if cmd.contains(" HELO=") && text.iter().any(|t| t.to_ascii_uppercase().contains("HELO")) => {
                return Err(BackendError::ClientRefused { temporary: false, address: false });
            }
            _ => return Err(BackendError::Protocol("backend rejected XCLIENT")),
        }
        // XCLIENT starts a new SMTP session: replay the client's greeting command. The backend
        // took ours, so a refusal now is of the client's name (Exim's syntax check, Postfix with
        // smtpd_delay_reject = no): the client's failure, not the backend's.
        let helo = client.helo.as_deref().unwrap_or(hostname);
        let (code, replayed) = send_ehlo(&mut stream, &mut lines, helo, client.esmtp).await?;
        match code {
            // What the backend offers the client's session now (AUTH may differ by address:
            // Postfix's smtpd_sasl_exceptions_networks).
            250 => exts = replayed,
            421 => return Err(BackendError::Refused),
            code @ 400..=599 if client.helo.is_some() => {
                return Err(BackendError::ClientRefused { temporary: code < 500, address: false });
            }
            _ => return Err(BackendError::Protocol("EHLO refused")),
        }
    }

    match &backend.login {
        BackendLogin::Xclient => {}
        BackendLogin::Replay => {
            let mechanisms = auth_mechanisms(&exts);
            if mechanisms.iter().any(|m| m.eq_ignore_ascii_case("PLAIN")) {
                let line = plain_response(b"AUTH PLAIN ", b"", creds.user.as_bytes(), creds.password.expose());
                auth_plain(&mut stream, &mut lines, line.expose()).await?;
            } else if mechanisms.iter().any(|m| m.eq_ignore_ascii_case("LOGIN")) {
                // Exchange and other servers that offer LOGIN (and NTLM or GSSAPI) but not PLAIN.
                auth_login(&mut stream, &mut lines, creds.user.as_bytes(), creds.password.expose()).await?;
            } else if auth_mechanisms(&announced)
                .iter()
                .any(|m| ["PLAIN", "LOGIN"].iter().any(|u| m.eq_ignore_ascii_case(u)))
            {
                return Err(not_for_this_client());
            } else {
                return Err(BackendError::Protocol(
                    "backend offers neither AUTH PLAIN nor AUTH LOGIN (AUTH only inside TLS?)",
                ));
            }
        }
        BackendLogin::Master { user: master, password } => {
            // A master login names the user as the authorization identity, which only PLAIN has.
            if !auth_mechanisms(&exts).iter().any(|m| m.eq_ignore_ascii_case("PLAIN")) {
                if auth_mechanisms(&announced).iter().any(|m| m.eq_ignore_ascii_case("PLAIN")) {
                    return Err(not_for_this_client());
                }
                return Err(BackendError::Protocol("backend does not offer AUTH PLAIN, which a master login needs"));
            }
            let line = plain_response(b"AUTH PLAIN ", user.as_bytes(), master.as_bytes(), password.as_bytes());
            auth_plain(&mut stream, &mut lines, line.expose()).await?;
        }
    }
    Ok(LoggedIn {
        stream,
        untagged: Vec::new(),
        reply: Vec::new(),
        leftover: lines.into_leftover(),
        extensions: Some(announced),
    })
}

/// The SASL mechanisms of the backend's `AUTH` extension, and of the `AUTH=` form that older
/// Exchange and Outlook-era servers send beside or instead of it.
fn auth_mechanisms(exts: &[String]) -> Vec<&str> {
    exts.iter()
        .filter_map(|e| {
            keyword_args(e, "AUTH").or_else(|| e.get(..5).filter(|k| k.eq_ignore_ascii_case("AUTH=")).map(|_| &e[5..]))
        })
        .flat_map(|args| args.split(' '))
        .filter(|m| !m.is_empty())
        .collect()
}

/// Send an `AUTH PLAIN` line (from `plain_response`) and read its verdict.
async fn auth_plain<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    lines: &mut Lines,
    line: &[u8],
) -> Result<(), BackendError> {
    s.write_all(line).await?;
    auth_verdict(read_reply(s, lines).await?.0)
}

/// `AUTH LOGIN`: the user name and the password, each base64 on its own line after a 334.
async fn auth_login<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    lines: &mut Lines,
    user: &[u8],
    password: &[u8],
) -> Result<(), BackendError> {
    s.write_all(b"AUTH LOGIN\r\n").await?;
    for answer in [user, password] {
        match read_reply(s, lines).await?.0 {
            334 => s.write_all(base64_line(b"", answer).expose()).await?,
            code => return auth_verdict(code).and(Err(BackendError::Protocol("unexpected AUTH reply"))),
        }
    }
    auth_verdict(read_reply(s, lines).await?.0)
}

/// AUTH offered to the proxy and not after XCLIENT named the client's address (Postfix's
/// smtpd_sasl_exceptions_networks): the backend refuses this client, not everyone, so it is not
/// counted against its health (a few clients from such a network would mark it down).
fn not_for_this_client() -> BackendError {
    tracing::info!("the SMTP backend offers AUTH to the proxy but not for the client's address");
    BackendError::LoginRefused
}

/// What an AUTH reply means for the login. Only replies no client can bring about count
/// against the backend's health: a long password's `500 5.5.6` or a user's `432` (password
/// transition, RFC 4954) would let anyone mark a pool down, a login at a time.
fn auth_verdict(code: u16) -> Result<(), BackendError> {
    match code {
        235 => Ok(()),
        535 | 534 | 501 | 500 => Err(BackendError::Rejected),
        421 => Err(BackendError::Refused),
        400..=499 => Err(BackendError::LoginRefused),
        _ => Err(BackendError::Protocol("unexpected AUTH reply")),
    }
}

/// Send EHLO (or HELO) and return the extension lines of a 250 reply.
pub async fn ehlo<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    lines: &mut Lines,
    name: &str,
    esmtp: bool,
) -> Result<Vec<String>, BackendError> {
    match send_ehlo(s, lines, name, esmtp).await? {
        (250, extensions) => Ok(extensions),
        (421, _) => Err(BackendError::Refused),
        _ => Err(BackendError::Protocol("EHLO refused")),
    }
}

/// Send EHLO (or HELO): the reply's code, and the extension lines of a 250 reply.
async fn send_ehlo<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    lines: &mut Lines,
    name: &str,
    esmtp: bool,
) -> Result<(u16, Vec<String>), BackendError> {
    let verb = if esmtp { "EHLO" } else { "HELO" };
    s.write_all(format!("{verb} {name}\r\n").as_bytes()).await?;
    s.flush().await?;
    let (code, text) = read_reply(s, lines).await?;
    Ok((code, if code == 250 { text.into_iter().skip(1).collect() } else { Vec::new() }))
}

/// Read one (possibly multi-line) reply: its code and the text of each line.
pub async fn read_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    lines: &mut Lines,
) -> Result<(u16, Vec<String>), BackendError> {
    let mut text = Vec::new();
    let mut total = 0;
    loop {
        let line = lines.line(s).await?;
        total += line.len();
        if line.len() < 4 || total > MAX_BACKEND_LINE || text.len() >= MAX_REPLY_LINES {
            return Err(BackendError::Protocol("malformed reply"));
        }
        let code = std::str::from_utf8(&line[..3]).ok().and_then(|c| c.parse::<u16>().ok());
        let Some(code) = code else { return Err(BackendError::Protocol("malformed reply")) };
        let body = String::from_utf8_lossy(&line[4..]).trim_end_matches(['\r', '\n']).to_string();
        text.push(body);
        match line[3] {
            b' ' | b'\r' | b'\n' => return Ok((code, text)),
            b'-' => continue,
            _ => return Err(BackendError::Protocol("malformed reply")),
        }
    }
}

pub(crate) fn has(exts: &[String], keyword: &str) -> bool {
    exts.iter().any(|e| e.split(' ').next().is_some_and(|k| k.eq_ignore_ascii_case(keyword)))
}

/// The arguments of an extension line if its keyword matches.
fn keyword_args<'a>(line: &'a str, keyword: &str) -> Option<&'a str> {
    let (k, rest) = line.split_once(' ').unwrap_or((line, ""));
    k.eq_ignore_ascii_case(keyword).then_some(rest)
}

/// Whether `text` has `ip` as a word of its own: not part of a longer address or name
/// (`10.1.2.3` is not in `10.1.2.30` nor in `110.1.2.3`).
fn names_address(text: &str, ip: std::net::IpAddr) -> bool {
    // An IPv4-mapped address (a PROXY header's TCP6 source) is written by Postfix as IPv4.
    if let std::net::IpAddr::V6(v6) = ip
        && let Some(v4) = v6.to_ipv4_mapped()
        && names_address(text, std::net::IpAddr::V4(v4))
    {
        return true;
    }
    let ip = ip.to_string();
    let part_of_address = |c: u8| c.is_ascii_alphanumeric() || c == b':' || c == b'.';
    let b = text.as_bytes();
    text.match_indices(&ip).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| b[i]);
        let after = b.get(at + ip.len()).copied();
        // A full stop that ends a sentence is no part of the address; one before more of it is.
        let after_dot_more = after == Some(b'.') && b.get(at + ip.len() + 1).is_some_and(|c| part_of_address(*c));
        !before.is_some_and(part_of_address)
            && (!after.is_some_and(|c| part_of_address(c) && c != b'.') && !after_dot_more)
    })
}

/// RFC 3461 xtext: printable ASCII except `+` and `=` as is, everything else as `+XX`; and
/// also `+XX` for what Postfix's command tokenizer reads as quoting (`\` escapes the next byte,
/// a space included; `"` and `<` run to their closing match across spaces), which xtext allows
/// as is: a client's `EHLO x\` would otherwise swallow the ` LOGIN=` after its `HELO=`.
pub fn xtext(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value {
        if (b'!'..=b'~').contains(&b) && !b"+=\\\"<>()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_named_only_as_a_word_of_its_own() {
        let v4: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        for yes in [
            "Client host rejected: cannot find your hostname, [10.1.2.3]",
            "<unknown[10.1.2.3]>: Client host rejected",
            "too many connections from 10.1.2.3",
            "too many connections from 10.1.2.3.",
        ] {
            assert!(names_address(yes, v4), "{yes}");
        }
        for no in ["from 10.1.2.30", "from 110.1.2.3", "Bad ADDR syntax: 10.1.2.3.4", "host 10.1.2.3a", "x"] {
            assert!(!names_address(no, v4), "{no}");
        }
        let v6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        assert!(names_address("<unknown[2001:db8::1]>: Client host rejected", v6));
        assert!(!names_address("from 2001:db8::10", v6));
        let mapped: std::net::IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(names_address("cannot find your hostname, [10.1.2.3]", mapped));
    }

    #[test]
    fn xtext_encodes_specials() {
        assert_eq!(xtext(b"client.example"), "client.example");
        assert_eq!(xtext(b"a+b=c d\r\n\xc3\xa9"), "a+2Bb+3Dc+20d+0D+0A+C3+A9");
        // What Postfix's tokenizer reads as quoting, whatever xtext allows.
        assert_eq!(xtext(b"x\\ a\"b<c>(d)"), "x+5C+20a+22b+3Cc+3E+28d+29");
        assert_eq!(xtext(b"[UNAVAILABLE]"), "[UNAVAILABLE]");
    }

    #[test]
    fn auth_replies_a_client_can_bring_about_are_not_the_backends_fault() {
        assert!(auth_verdict(235).is_ok());
        for code in [535, 534, 501, 500] {
            assert!(matches!(auth_verdict(code), Err(BackendError::Rejected)), "{code}");
        }
        for code in [432, 454, 451] {
            assert!(matches!(auth_verdict(code), Err(BackendError::LoginRefused)), "{code}");
        }
        assert!(matches!(auth_verdict(421), Err(BackendError::Refused)));
        for code in [503, 504, 530, 538, 250] {
            assert!(matches!(auth_verdict(code), Err(BackendError::Protocol(_))), "{code}");
        }
    }

    #[test]
    fn auth_mechanisms_in_either_form() {
        let exts: Vec<String> = ["SIZE 1000", "AUTH NTLM LOGIN", "AUTH=LOGIN GSSAPI", "AUTHX PLAIN"]
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(auth_mechanisms(&exts), ["NTLM", "LOGIN", "LOGIN", "GSSAPI"]);
        assert!(auth_mechanisms(&["XCLIENT NAME".to_string()]).is_empty());
    }

    #[tokio::test]
    async fn multi_line_replies() {
        let mut lines = Lines::default();
        let mut input: &[u8] = b"250-mx.example\r\n250-SIZE 1000\r\n250 XCLIENT NAME ADDR\r\n220 next\r\n";
        let (code, text) = read_reply(&mut input, &mut lines).await.unwrap();
        assert_eq!(code, 250);
        assert_eq!(text, vec!["mx.example", "SIZE 1000", "XCLIENT NAME ADDR"]);
        assert_eq!(keyword_args(&text[2], "xclient"), Some("NAME ADDR"));
        assert!(has(&text, "size"));
        let (code, _) = read_reply(&mut input, &mut lines).await.unwrap();
        assert_eq!(code, 220);
        let mut bad: &[u8] = b"25x oops\r\n";
        assert!(read_reply(&mut bad, &mut Lines::default()).await.is_err());
    }
}
