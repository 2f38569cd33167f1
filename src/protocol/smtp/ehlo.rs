//! Honest EHLO: the extensions the proxy advertises beyond its own (STARTTLS, AUTH) are the ones
//! each backend really announces, learned from its EHLO reply (at every backend login and by a
//! periodic probe) and cached per backend. Only extensions that survive a byte-for-byte relay are
//! passed on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{BackendError, ClientInfo};
use crate::config::Backend;
use crate::protocol::smtp::back::open;

/// Extensions that mean the same through a byte pipe as on the backend itself. AUTH, STARTTLS
/// and XCLIENT are the proxy's business and never copied.
const PASSED_ON: [&str; 6] = ["SIZE", "8BITMIME", "PIPELINING", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"];

/// A backend's filtered extensions, and, for one an auth service named by address
/// (`Auth-Server`), which no config lists, when it was last logged in to.
type Learned = (Arc<[String]>, Option<tokio::time::Instant>);

/// How long a backend an auth service named by address counts in what is advertised after its
/// last login: one the service no longer names (decommissioned, renumbered) must not limit
/// every client's EHLO, nor stay in memory, until a restart.
const DYNAMIC_KEPT: Duration = Duration::from_secs(24 * 3600);

fn current(learned: &Learned) -> bool {
    learned.1.is_none_or(|seen| seen.elapsed() < DYNAMIC_KEPT)
}

#[derive(Default)]
pub struct EhloCache {
    by_backend: Mutex<HashMap<String, Learned>>,
}

impl EhloCache {
    /// The filtered extensions of `backend`, if known.
    pub fn get(&self, backend: &str) -> Option<Arc<[String]>> {
        self.by_backend.lock().unwrap_or_else(|e| e.into_inner()).get(backend).map(|(e, _)| e.clone())
    }

    /// What every one of `backends` announced (those not learned yet are left out), and every
    /// backend an auth service has named by address: the extensions they all have, SIZE at the
    /// smallest limit. A client may be routed to any of them (by domain, a users-file pin, the
    /// auth service), and must not be shown what its backend lacks (an SMTPUTF8 or DSN it would
    /// then be refused, a SIZE it would overrun).
    pub fn common<'a>(&self, backends: impl IntoIterator<Item = &'a str>) -> Arc<[String]> {
        let map = self.by_backend.lock().unwrap_or_else(|e| e.into_inner());
        let named = backends.into_iter().filter_map(|b| map.get(b).filter(|(_, seen)| seen.is_none()));
        let dynamic = map.values().filter(|l| l.1.is_some() && current(l));
        let lists: Vec<&Arc<[String]>> = named.chain(dynamic).map(|(e, _)| e).collect();
        let Some((first, rest)) = lists.split_first() else { return Arc::from(Vec::new()) };
        if rest.is_empty() {
            return Arc::clone(first);
        }
        let keyword = |e: &str| e.split(' ').next().unwrap_or("").to_ascii_uppercase();
        // RFC 1870: no number, or 0, is no fixed limit.
        let limit = |e: &str| e.split(' ').nth(1).and_then(|n| n.parse::<u64>().ok()).filter(|n| *n > 0);
        first
            .iter()
            .filter(|e| rest.iter().all(|l| l.iter().any(|x| keyword(x) == keyword(e))))
            .map(|e| {
                if keyword(e) != "SIZE" {
                    return e.clone();
                }
                let smallest =
                    lists.iter().filter_map(|l| l.iter().find(|x| keyword(x) == "SIZE")).filter_map(|x| limit(x)).min();
                smallest.map_or_else(|| "SIZE".to_string(), |n| format!("SIZE {n}"))
            })
            .collect::<Vec<_>>()
            .into()
    }

    /// Record what `backend` announced in its EHLO reply; `dynamic` for a backend an auth
    /// service named by address.
    pub fn update(&self, backend: &str, announced: &[String], dynamic: bool) {
        let filtered: Arc<[String]> = filter(announced).into();
        let seen = dynamic.then(tokio::time::Instant::now);
        let mut map = self.by_backend.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(backend) {
            // The common case, at every SMTP login: a timestamp, no walk over the map.
            Some(old) if old.0 == filtered => old.1 = seen,
            _ => {
                // Stale backends named by address go when another is learned: the map holds
                // at most those named within the last day.
                map.retain(|_, l| current(l));
                tracing::info!(backend, extensions = ?filtered, "backend SMTP extensions learned");
                map.insert(backend.to_string(), (filtered, seen));
            }
        }
    }
}

/// Keep the pass-through extensions in the only shapes their RFCs give them: the keyword alone,
/// or `SIZE` with a number (`SIZE 10240000`). Anything else a backend appends is dropped with the
/// line, so nothing but these fixed words reaches a client (before TLS too).
pub fn filter(announced: &[String]) -> Vec<String> {
    announced
        .iter()
        .filter(|line| {
            let (keyword, param) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            PASSED_ON.iter().any(|p| p.eq_ignore_ascii_case(keyword))
                && (param.is_empty()
                    || keyword.eq_ignore_ascii_case("SIZE")
                        && param.len() <= 20
                        && param.bytes().all(|b| b.is_ascii_digit()))
        })
        .cloned()
        .collect()
}

/// Connect, EHLO (after STARTTLS if configured), QUIT: what does this backend announce?
pub async fn probe(
    backend: &Backend,
    tls: Option<&Arc<rustls::ClientConfig>>,
    hostname: &str,
    timeout: Duration,
) -> Result<Vec<String>, BackendError> {
    let client = ClientInfo::local();
    let work = async {
        let (mut stream, _, exts) = open(backend, tls, &client, timeout, hostname).await?;
        use tokio::io::AsyncWriteExt;
        let _ = stream.write_all(b"QUIT\r\n").await;
        Ok(exts)
    };
    tokio::time::timeout(timeout * 2, work).await.map_err(|_| BackendError::Protocol("probe timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reliability cases 9 and 48: only known, printable extensions pass; never CHUNKING, whose
    /// BDAT the post-login guard refuses (`guard.rs`: a chunk's count could hide a command).
    #[test]
    fn only_pass_through_extensions_survive() {
        let announced: Vec<String> = [
            "PIPELINING",
            "SIZE 10240000",
            "VRFY",
            "ETRN",
            "STARTTLS",
            "AUTH PLAIN LOGIN",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "DSN",
            "SMTPUTF8",
            "CHUNKING",
            "XCLIENT NAME ADDR PROTO HELO LOGIN",
            "SIZE [ALERT] visit example.com",
            "8BITMIME now",
            "PIPELINING\u{1b}[31m",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            filter(&announced),
            vec!["PIPELINING", "SIZE 10240000", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]
        );
        // Several backends: what they all have, SIZE at the smallest limit.
        let c = EhloCache::default();
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        c.update("a", &set(&["PIPELINING", "SIZE 10240000", "SMTPUTF8", "DSN", "8BITMIME"]), false);
        c.update("b", &set(&["PIPELINING", "SIZE 5000000", "8BITMIME", "DSN"]), false);
        c.update("c", &set(&["pipelining", "SIZE", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES"]), false);
        assert_eq!(&*c.common(["a", "b", "c", "unknown"]), ["PIPELINING", "SIZE 5000000", "DSN", "8BITMIME"]);
        assert_eq!(&*c.common(["a"]), ["PIPELINING", "SIZE 10240000", "SMTPUTF8", "DSN", "8BITMIME"]);
        assert_eq!(&*c.common(["c", "a"]), ["pipelining", "SIZE 10240000", "8BITMIME", "DSN"]);
        assert!(c.common(["unknown"]).is_empty());
        // A backend an auth service named by address counts whatever the config lists, alone
        // (no SMTP backend configured) or beside the configured ones.
        c.update("192.0.2.7:25", &set(&["PIPELINING", "SIZE 20000000", "8BITMIME"]), true);
        assert_eq!(&*c.common([]), ["PIPELINING", "SIZE 20000000", "8BITMIME"]);
        assert_eq!(&*c.common(["a"]), ["PIPELINING", "SIZE 10240000", "8BITMIME"]);
        let cache = EhloCache::default();
        assert!(cache.get("b").is_none());
        cache.update("b", &announced, false);
        assert_eq!(cache.get("b").unwrap().len(), 6);
    }

    /// A backend an auth service named by address counts for a day after its last login, then
    /// is forgotten: one no longer named must not limit every client's EHLO until a restart.
    #[tokio::test(start_paused = true)]
    async fn backends_named_by_address_are_forgotten_a_day_after_their_last_login() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = EhloCache::default();
        c.update("a", &set(&["PIPELINING", "SMTPUTF8", "SIZE 1000"]), false);
        c.update("192.0.2.7:25", &set(&["PIPELINING", "SIZE 500"]), true);
        c.update("192.0.2.8:25", &set(&["PIPELINING", "SMTPUTF8", "SIZE 800"]), true);
        assert_eq!(&*c.common(["a"]), ["PIPELINING", "SIZE 500"]);
        tokio::time::advance(DYNAMIC_KEPT / 2).await;
        c.update("192.0.2.8:25", &set(&["PIPELINING", "SMTPUTF8", "SIZE 800"]), true);
        tokio::time::advance(DYNAMIC_KEPT / 2).await;
        assert_eq!(&*c.common(["a"]), ["PIPELINING", "SMTPUTF8", "SIZE 800"]);
        c.update("192.0.2.9:25", &set(&["PIPELINING"]), true);
        assert!(c.get("192.0.2.7:25").is_none(), "forgotten");
        assert!(c.get("a").is_some(), "a configured backend stays");
    }
}
