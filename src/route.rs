//! Which backends serve a user, in which order.
//!
//! Rules, first match wins: a pool or backend named by the user's entry (passwd-file pins or
//! the auth service), then the protocol's own table, then the shared table; within a table the
//! exact user, then the domain, then `*.parent` domains, then the default.
//!
//! Within a pool the order is **weighted rendezvous hashing** of the canonical user name. The
//! hash is part of the product's contract and never changes between versions: SipHash-2-4 with
//! the key `k0 = 0x706f727463756c6c` ("portcull"), `k1 = 0x6872772d76310000` ("hrw-v1\0\0") over
//! the bytes `host_key || 0x00 || user`; the top 53 bits map to `u` in (0, 1) as
//! `((h >> 11) + 0.5) / 2^53`, and the score is `weight / -ln(u)`. Highest score first. Every
//! instance computes the same order with no shared state, adding or removing a backend moves only
//! the users whose top choice it is or becomes, and the order is also the failover order.

use std::sync::Arc;

use siphasher::sip::SipHasher24;

use crate::config::{Backend, BackendState, Config, Protocol, RouteTable, Target};
use crate::health::HealthTable;

const HRW_K0: u64 = 0x706f_7274_6375_6c6c;
const HRW_K1: u64 = 0x6872_772d_7631_0000;

/// The rendezvous score of `host_key` for `user`.
pub fn score(host_key: &str, user: &str, weight: f64) -> f64 {
    let mut buf = Vec::with_capacity(host_key.len() + user.len() + 1);
    buf.extend_from_slice(host_key.as_bytes());
    buf.push(0);
    buf.extend_from_slice(user.as_bytes());
    let h = SipHasher24::new_with_keys(HRW_K0, HRW_K1).hash(&buf);
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight / -u.ln()
}

/// `backends` in rendezvous order for `user`, highest score first.
pub fn rendezvous<'a>(backends: impl IntoIterator<Item = &'a Arc<Backend>>, user: &str) -> Vec<Arc<Backend>> {
    let mut scored: Vec<(f64, &Arc<Backend>)> =
        backends.into_iter().map(|b| (score(&b.host_key, user, b.weight), b)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    scored.into_iter().map(|(_, b)| b.clone()).collect()
}

/// Where a session should go: backends to try, in order.
#[derive(Debug, Clone)]
pub struct Route {
    /// The pool or backend the rule named.
    pub target: String,
    pub candidates: Vec<Arc<Backend>>,
}

/// The routing rule that applies to `user` for `protocol`.
pub fn target(config: &Config, protocol: Protocol, user: &str, pinned: &[String]) -> Option<Target> {
    for name in pinned {
        let t = match (config.pools.get(name), config.backends.get(name)) {
            (Some(p), _) => Target::Pool(p.clone()),
            (None, Some(b)) => Target::Backend(b.clone()),
            (None, None) => continue,
        };
        if t.serves(protocol) {
            return Some(t);
        }
    }
    let tables = config.routing.tables.get(&protocol).into_iter().chain([&config.routing.shared]);
    // With `strip_default_domain`, the default domain's users have no domain left in their
    // canonical name; their domain's rules still apply to them.
    let default_domain = config.users.default_domain.as_deref().filter(|_| !user.contains('@'));
    for table in tables {
        if let Some(t) = lookup(table, user, default_domain, protocol) {
            return Some(t.clone());
        }
    }
    None
}

/// The most specific rule in `table` for `user` (in `domain`, if the name carries none) whose
/// target serves `protocol`: a rule for another protocol (in the shared table) is passed over,
/// not a dead end.
fn lookup<'a>(table: &'a RouteTable, user: &str, domain: Option<&str>, protocol: Protocol) -> Option<&'a Target> {
    let serves = |t: &&Target| t.serves(protocol);
    if let Some(t) = table.users.get(user).filter(serves) {
        return Some(t);
    }
    if let Some(domain) = user.rsplit_once('@').map(|(_, d)| d).or(domain) {
        // Canonical already, unless `[users] lowercase = "none"` kept it as typed.
        let domain = crate::config::canonical_domain(domain).unwrap_or_else(|| domain.to_ascii_lowercase());
        if let Some(t) = table.domains.get(&domain).filter(serves) {
            return Some(t);
        }
        // `*.example.org` matches any subdomain depth, most specific parent first.
        let mut rest = domain.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(t) = table.wildcards.get(parent).filter(serves) {
                return Some(t);
            }
            rest = parent;
        }
    }
    table.default.as_ref().filter(serves)
}

/// A backend's state for a login: the stricter of the login's config's and the running one's.
/// (Backends the auth service names by address are in no config.)
fn state(b: &Backend, health: &HealthTable) -> BackendState {
    if b.dynamic { b.state } else { b.state.max(health.configured_state(&b.name)) }
}

/// Whether a candidate `plan` gave a login is one still to try again, after a round in which it
/// refused the connection: not if its checks have marked it down since (`was_up`: when it
/// refused), nor if a reload has taken it out (disabled; draining, where the pool has failover).
/// Other logins' refusals marking it down do not end this one's wait: they are the same restart
/// this login is waiting out, only counted sooner.
pub fn still_eligible(target: &Target, b: &Backend, was_up: bool, health: &HealthTable) -> bool {
    let state = state(b, health);
    let allowed = if target.failover() { state == BackendState::Up } else { state != BackendState::Disabled };
    allowed && !(b.health.enabled && was_up && health.down_by_checks(&b.name))
}

/// Order a target's backends for `user`, applying states, health and session limits.
///
/// With failover: disabled and draining backends are left out, healthy ones come first in
/// rendezvous order, full ones (max_sessions) after them, backends marked down last (a last
/// resort if health is stale), except those their active checks have said down for
/// `FAIL_FAST_AFTER`: with every backend long down, a login fails at once. Without failover the user's mailbox lives on exactly one backend:
/// the first non-disabled one in rendezvous order, draining or not, and nothing else.
pub fn plan(target: &Target, protocol: Protocol, user: &str, health: &HealthTable) -> Route {
    // The stricter of the login's config and the running one: a login under way when a reload
    // that drained or disabled a backend lands goes on under the new state.
    // (Backends the auth service names by address are in no config.)
    let state = |b: &Backend| state(b, health);
    let eligible = target.backends().iter().filter(|b| b.protocol == protocol && state(b) != BackendState::Disabled);
    let ordered = rendezvous(eligible, user);
    let candidates = if !target.failover() {
        ordered.into_iter().take(1).collect()
    } else {
        let (mut good, mut full, mut down) = (Vec::new(), Vec::new(), Vec::new());
        for b in ordered.into_iter().filter(|b| state(b) == BackendState::Up) {
            if !health.usable(&b) {
                if !health.long_down(&b) {
                    down.push(b);
                }
            } else if b.max_sessions > 0 && health.current_sessions(&b.name) >= b.max_sessions as usize {
                full.push(b);
            } else {
                good.push(b);
            }
        }
        good.append(&mut full);
        good.append(&mut down);
        good
    };
    Route { target: target.name().to_string(), candidates }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    /// The rendezvous order of m1..m3 for alice@example.org, fixed forever.
    const FIXED_ORDER: [&str; 3] = ["m3", "m1", "m2"];

    fn backend(name: &str, weight: f64) -> Arc<Backend> {
        let text = format!(
            "[auth]\nsource = \"backend\"\n[[backend]]\nname = \"{name}\"\naddress = \"127.0.0.1:1\"\nweight = {weight}\n[routing.imap]\ndefault = \"{name}\"\n"
        );
        Config::parse(Path::new("/t.toml"), &text).unwrap().backends[name].clone()
    }

    /// A login waiting out a backend's refused connections stops trying it once its checks say
    /// it is down, not when other logins' refusals marked it down.
    #[test]
    fn a_backend_stays_eligible_until_its_checks_mark_it_down() {
        use crate::health::Source;
        let (table, b) = (HealthTable::default(), backend("m1", 1.0));
        let target = Target::Backend(b.clone());
        assert!(still_eligible(&target, &b, true, &table));
        table.failure(&b, Source::Session, 1, "connect");
        assert!(!table.is_up("m1"));
        assert!(still_eligible(&target, &b, true, &table), "marked down by sessions only");
        table.failure(&b, Source::Check, 1, "connect");
        assert!(!still_eligible(&target, &b, true, &table), "its checks marked it down");
    }

    #[test]
    fn score_is_a_fixed_function() {
        // Part of the routing contract: instances of every version must agree on these.
        assert_eq!(SipHasher24::new_with_keys(HRW_K0, HRW_K1).hash(b"mail1\0alice@example.org"), 10609496919661760432);
        let s = score("mail1", "alice@example.org", 1.0);
        assert_eq!(s, score("mail1", "alice@example.org", 1.0));
        assert!((score("mail1", "alice@example.org", 2.0) - 2.0 * s).abs() < 1e-12);
        let order: Vec<String> =
            rendezvous(&[backend("m1", 1.0), backend("m2", 1.0), backend("m3", 1.0)], "alice@example.org")
                .iter()
                .map(|b| b.name.clone())
                .collect();
        assert_eq!(order, FIXED_ORDER);
    }

    #[test]
    fn distribution_follows_weights_within_five_percent() {
        let pool = vec![backend("a", 1.0), backend("b", 2.0), backend("c", 1.0)];
        let mut counts: HashMap<String, usize> = HashMap::new();
        let n = 100_000;
        for i in 0..n {
            let top = rendezvous(&pool, &format!("user{i}@example.org")).remove(0);
            *counts.entry(top.name.clone()).or_default() += 1;
        }
        for (name, share) in [("a", 0.25), ("b", 0.5), ("c", 0.25)] {
            let got = counts[name] as f64 / n as f64;
            assert!((got - share).abs() / share < 0.05, "{name}: {got} vs {share}");
        }
    }

    #[test]
    fn adding_or_removing_a_backend_moves_only_the_users_that_must_move() {
        let three = vec![backend("a", 1.0), backend("b", 1.0), backend("c", 1.0)];
        let four = vec![backend("a", 1.0), backend("b", 1.0), backend("c", 1.0), backend("d", 1.0)];
        let n = 20_000;
        let mut moved = 0;
        for i in 0..n {
            let u = format!("u{i}");
            let before = rendezvous(&three, &u)[0].name.clone();
            let after = rendezvous(&four, &u)[0].name.clone();
            if before != after {
                // Only to the new backend, never between old ones.
                assert_eq!(after, "d");
                moved += 1;
            }
            // Removing a backend moves only its own users, to their second choice.
            let without_b: Vec<_> = three.iter().filter(|b| b.name != "b").cloned().collect();
            let order = rendezvous(&three, &u);
            let now = rendezvous(&without_b, &u)[0].name.clone();
            if order[0].name == "b" {
                assert_eq!(now, order[1].name);
            } else {
                assert_eq!(now, order[0].name);
            }
        }
        let share = moved as f64 / n as f64;
        assert!((share - 0.25).abs() < 0.02, "{share}");
    }
}
