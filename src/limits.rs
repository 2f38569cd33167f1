//! Abuse protection at the edge: login throttling and connection caps.
//!
//! **Throttling** counts failed logins per client address (IPv6 aggregated to a prefix, /64 by
//! default) and per canonical user, across connections and protocols. Past `penalty_after`
//! failures, each new attempt waits a growing penalty (2 s, 4 s, 8 s, capped at 15 s, as
//! Dovecot's auth penalty does); past `block_after` the address or user is refused outright with
//! the protocol's temporary error until `cooldown` has passed. Repeating the same wrong password
//! does not escalate (clients retry stored passwords); a correct password within the limits
//! logs in and takes back the failures that were its own: from the user's counter those from
//! its address, from the address's those for that user (a valid account of one's own must not
//! reset a password spray against others, nor a user's own login a distributed guesser's count);
//! auth-service outages never count; trusted networks are exempt. Counters forget after `window` without failures and are pruned on a timer, and the
//! tables are capped, so memory stays bounded.
//!
//! `governor` (GCRA rate limiting) was considered and not used: the penalty needs to read a
//! counter without consuming it and to ignore repeated passwords, which a token bucket cannot
//! express.
//!
//! **Connection caps**: global, per listener and per client address, checked at accept.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Cidr, ThrottleSettings};

/// Descriptors kept back from sessions for everything else the process opens: listening
/// sockets, the admin server, health checks, the auth service, files read at a reload (an
/// eighth of the limit where that is less).
const RESERVED_DESCRIPTORS: usize = 256;

/// Raise this process's soft open-file limit to its hard limit, before anything reads it (the
/// descriptor cap below is read once). The soft limit stays low by default (1024 under systemd
/// and most shells) only for programs that use select(); the hard limit is what the system
/// lets the process have, so a proxy started outside the shipped unit (by hand, under another
/// supervisor) is not held to about 450 sessions. Returns the soft limit before and after, or
/// None when it could not be read or raised (the limit then stays as it was).
pub fn raise_descriptor_limit() -> Option<(u64, u64)> {
    let (soft, _) = rlimit::Resource::NOFILE.get().ok()?;
    let raised = rlimit::increase_nofile_limit(u64::MAX).ok()?;
    Some((soft, raised))
}

/// The most sessions this process's descriptor limit allows (each holds two: the client's
/// connection and the backend's), from `/proc/self/limits`; None when unlimited or unknown.
pub fn descriptor_cap() -> Option<usize> {
    static CAP: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        parse_descriptor_cap(&limits)
    })
}

fn parse_descriptor_cap(limits: &str) -> Option<usize> {
    let line = limits.lines().find_map(|l| l.strip_prefix("Max open files"))?;
    let soft: usize = line.split_whitespace().next()?.parse().ok()?;
    Some((soft.saturating_sub(RESERVED_DESCRIPTORS.min(soft / 8)) / 2).max(1))
}

/// `max_connections` as applied: the configured cap, or with none (0) the descriptor cap, so a
/// connection flood is refused at accept (counted, with the protocol's reply) instead of
/// running the process out of descriptors, where its logins could reach no backend.
pub fn effective_max_connections(configured: usize) -> usize {
    match (configured, descriptor_cap()) {
        (0, Some(cap)) => cap,
        (n, _) => n,
    }
}

/// Passwords remembered per key to recognise a client retrying the same wrong one: as many as
/// the default `block_after`, so the stale clients behind one address (phones with an old
/// password, polling in turn) count once each up to the point where their number alone blocks,
/// instead of pushing each other out of a shorter memory and counting at every poll. A repeat
/// moves to the back, so the ones still retrying are the ones kept.
const RECENT_PASSWORDS: usize = 20;

/// Failures per address remembered with the user they were for, so a success can take back
/// only its own user's. Older failures stay counted (`block_after` is 20 by default).
const ATTRIBUTED_FAILURES: usize = 64;

/// What to do with a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead after `delay` (zero below the penalty threshold).
    Allow { delay: Duration },
    /// Refuse with a temporary error; the block lifts at the given time.
    Blocked,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
enum Key {
    Ip(IpAddr),
    User(String),
}

#[derive(Debug)]
struct Entry {
    failures: u32,
    last: Instant,
    blocked_until: Option<Instant>,
    recent: VecDeque<u64>,
    /// Whom each recent counted failure is charged to: for an address entry a hash of the user
    /// it was for, for a user entry a hash of the address key it came from.
    users: VecDeque<u64>,
}

impl Entry {
    fn reset(&mut self) {
        self.failures = 0;
        self.recent.clear();
        self.users.clear();
    }
}

/// A process-local hash of a user name, as address entries remember them.
fn user_hash(user: &str) -> u64 {
    password_fingerprint(&[b"throttle user", user.as_bytes()])
}

/// A process-local hash of an address key, as user entries remember them.
fn address_hash(address: IpAddr) -> u64 {
    match address {
        IpAddr::V4(a) => password_fingerprint(&[b"throttle address", &a.octets()]),
        IpAddr::V6(a) => password_fingerprint(&[b"throttle address", &a.octets()]),
    }
}

#[derive(Debug, Default)]
pub struct Throttle {
    table: Mutex<HashMap<Key, Entry>>,
    /// Where each user has logged in from lately: (address key, user hash) → when. The per-user
    /// limit does not apply there, so failures sent from elsewhere (anyone can type a user's
    /// name) cannot lock a user out of the addresses they use; the address's own limit does.
    known: Mutex<HashMap<(IpAddr, u64), Instant>>,
    /// Login attempts in flight, per address key and per user: each holds a permit from before
    /// its check until its outcome is counted.
    in_flight: Mutex<HashMap<Key, Arc<tokio::sync::Semaphore>>>,
}

/// Attempts one client address may have in flight at once. Guesses sent in parallel over many
/// connections would otherwise all pass the check against the same count before any failed
/// (reliability case 55): with this many at a time, the block comes at most this many - 1
/// attempts late. Correct logins are not penalised, only queued for the moment the ones before
/// them take (an office's morning behind one NAT address).
pub const IN_FLIGHT_PER_ADDRESS: usize = 8;
/// The same for one user, from anywhere (case 56: a botnet's parallel guesses at one user).
pub const IN_FLIGHT_PER_USER: usize = 4;

/// Permits for one login attempt (none when throttling does not apply to it).
#[derive(Debug)]
pub struct Attempt {
    _permits: Vec<tokio::sync::OwnedSemaphorePermit>,
}

/// How long a successful login makes its address known for its user.
const KNOWN_FOR: Duration = Duration::from_secs(30 * 86400);

/// The address key: IPv4 as is, IPv6 masked to `prefix` bits. An IPv4 address carried in IPv6
/// is keyed as that IPv4 address: v4-mapped, and the well-known NAT64 prefix `64:ff9b::/96`
/// (RFC 6052) where a translator (SIIT-DC, NAT46) hands the proxy its IPv4 clients, all of whom
/// would otherwise share the prefix's one key.
pub fn ip_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    const NAT64_WELL_KNOWN: u128 = 0x0064_ff9b_u128 << 96;
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            if u128::from(v6) >> 32 == NAT64_WELL_KNOWN >> 32 {
                return IpAddr::V4((u128::from(v6) as u32).into());
            }
            let bits = u128::from(v6);
            let prefix = u32::from(v6_prefix.min(128));
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
            IpAddr::V6((bits & mask).into())
        }
    }
}

fn trusted(trusted: &[Cidr], ip: IpAddr) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

impl Throttle {
    /// Whether `user` logged in from `address` (a key) in the last `KNOWN_FOR`.
    fn known_for(&self, address: IpAddr, user: &str) -> bool {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.get(&(address, user_hash(user))).is_some_and(|t| t.elapsed() < KNOWN_FOR)
    }

    /// Wait for a turn for a login attempt from `ip` as `user`; keep it until the attempt's
    /// outcome is counted (`success`/`failure`), then drop it. Bounded by the caller's login
    /// deadline.
    pub async fn attempt(&self, s: &ThrottleSettings, ip: IpAddr, user: Option<&str>) -> Attempt {
        if !s.enabled || trusted(&s.trusted, ip) {
            return Attempt { _permits: Vec::new() };
        }
        let address = ip_key(ip, s.ipv6_prefix);
        // From an address the user logged in from lately, no turn among the user's attempts:
        // as the user's limit, they must not queue the user behind guesses from elsewhere.
        let user = user.filter(|u| !self.known_for(address, u));
        let keys = [
            Some((Key::Ip(address), IN_FLIGHT_PER_ADDRESS)),
            user.map(|u| (Key::User(u.to_string()), IN_FLIGHT_PER_USER)),
        ];
        let mut permits = Vec::with_capacity(2);
        // Address first, then user, in every attempt: no two wait on each other in a circle.
        for (key, n) in keys.into_iter().flatten() {
            let semaphore = {
                let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                if map.len() >= s.max_entries {
                    prune_idle(&mut map);
                }
                map.entry(key).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(n))).clone()
            };
            if let Ok(p) = semaphore.acquire_owned().await {
                permits.push(p);
            }
        }
        Attempt { _permits: permits }
    }

    /// Decide on an attempt before the credentials are checked.
    pub fn check(&self, s: &ThrottleSettings, ip: IpAddr, user: Option<&str>) -> Decision {
        if !s.enabled || trusted(&s.trusted, ip) {
            return Decision::Allow { delay: Duration::ZERO };
        }
        let now = Instant::now();
        let address = ip_key(ip, s.ipv6_prefix);
        let known = user.is_some_and(|u| self.known_for(address, u));
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut worst = 0u32;
        // From an address the user logged in from lately, the address's limit alone.
        let keys = [Some(Key::Ip(address)), user.filter(|_| !known).map(|u| Key::User(u.to_string()))];
        for (i, key) in keys.into_iter().enumerate() {
            let Some(key) = key else { continue };
            let Some(e) = table.get_mut(&key) else { continue };
            if e.blocked_until.is_some_and(|b| b <= now) {
                // The block has run its course: counting starts again, so it lasted `cooldown`
                // (the counter would otherwise block again at once until `window` had passed).
                e.blocked_until = None;
                e.reset();
            }
            if now.duration_since(e.last) > s.window && e.blocked_until.is_none_or(|b| b <= now) {
                table.remove(&key);
                continue;
            }
            if e.blocked_until.is_some_and(|b| b > now) {
                return Decision::Blocked;
            }
            let limit = if i == 0 { s.block_after } else { s.user_block_after };
            if e.failures >= limit {
                e.blocked_until = Some(now + s.cooldown);
                return Decision::Blocked;
            }
            worst = worst.max(e.failures);
        }
        Decision::Allow { delay: penalty(s, worst) }
    }

    /// Count a failed login (`password` is a process-local hash of the attempted password).
    pub fn failure(&self, s: &ThrottleSettings, ip: IpAddr, user: Option<&str>, password: u64) {
        if !s.enabled || trusted(&s.trusted, ip) {
            return;
        }
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= s.max_entries {
            prune_locked(&mut table, s, now);
            // Still nearly full of live entries: drop the stalest down to nine tenths rather
            // than grow, blocked ones last (a flood of fresh keys, say from one IPv6 /48, must
            // not lift blocks). Down to nine tenths, not just below full, so the next scan of
            // the whole table is a tenth of it later, not at the next failure, when entries
            // expire about as fast as a flood adds them.
            let keep = s.max_entries - s.max_entries / 10;
            if table.len() > keep {
                let mut ages: Vec<(bool, Instant, Key)> =
                    table.iter().map(|(k, e)| (e.blocked_until.is_some_and(|b| b > now), e.last, k.clone())).collect();
                ages.sort_by_key(|(blocked, t, _)| (*blocked, *t));
                for (_, _, k) in ages.into_iter().take(table.len() - keep) {
                    table.remove(&k);
                }
            }
        }
        let keys = [Some(Key::Ip(ip_key(ip, s.ipv6_prefix))), user.map(|u| Key::User(u.to_string()))];
        let for_user = user.map(user_hash);
        let from_address = address_hash(ip_key(ip, s.ipv6_prefix));
        for key in keys.into_iter().flatten() {
            let attributed = match key {
                Key::Ip(_) => for_user,
                Key::User(_) => Some(from_address),
            };
            let e = table.entry(key).or_insert_with(|| Entry {
                failures: 0,
                last: now,
                blocked_until: None,
                recent: VecDeque::new(),
                users: VecDeque::new(),
            });
            if e.blocked_until.is_some_and(|b| b <= now) {
                // A block that has run its course (as `check` would find it first).
                e.blocked_until = None;
                e.reset();
            }
            if now.duration_since(e.last) > s.window {
                e.reset();
            }
            e.last = now;
            if let Some(i) = e.recent.iter().position(|p| *p == password) {
                e.recent.remove(i);
                e.recent.push_back(password);
                continue;
            }
            e.recent.push_back(password);
            if e.recent.len() > RECENT_PASSWORDS {
                e.recent.pop_front();
            }
            e.failures += 1;
            if let Some(u) = attributed {
                e.users.push_back(u);
                if e.users.len() > ATTRIBUTED_FAILURES {
                    e.users.pop_front();
                }
            }
        }
    }

    /// A successful login takes back from the user's counter the failures from this address,
    /// and from the address's those that were for this user (a mistyped password, now right).
    /// The rest stay: logging in to an account of one's own between guesses at others' must not
    /// lift the address's limit, nor the user's own login a block guesses from elsewhere caused.
    pub fn success(&self, s: &ThrottleSettings, ip: IpAddr, user: &str) {
        if s.enabled {
            let now = Instant::now();
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if known.len() >= s.max_entries {
                known.retain(|_, t| now.duration_since(*t) < KNOWN_FOR);
                // Still nearly full: forget the oldest down to nine tenths (as `failure`).
                let keep = s.max_entries - s.max_entries / 10;
                if known.len() > keep {
                    let mut ages: Vec<(Instant, (IpAddr, u64))> = known.iter().map(|(k, t)| (*t, *k)).collect();
                    ages.sort_unstable_by_key(|(t, _)| *t);
                    for (_, k) in ages.into_iter().take(known.len() - keep) {
                        known.remove(&k);
                    }
                }
            }
            // Not for trusted networks (a webmail server's thousands of users would crowd
            // out everyone else's entries): they are never throttled anyway.
            if !trusted(&s.trusted, ip) {
                known.insert((ip_key(ip, s.ipv6_prefix), user_hash(user)), now);
            }
        }
        let address = ip_key(ip, s.ipv6_prefix);
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        // The user's failures from this address are taken back (a mistyped password, now
        // right; a block they alone caused lifts); failures from elsewhere stay, or the user's
        // own logins would reset a distributed guesser's count and lift its block.
        let user_key = Key::User(user.to_string());
        if let Some(e) = table.get_mut(&user_key) {
            let here = address_hash(address);
            let before = e.users.len();
            e.users.retain(|x| *x != here);
            e.failures = e.failures.saturating_sub((before - e.users.len()) as u32);
            if e.failures == 0 {
                table.remove(&user_key);
            }
        }
        let key = Key::Ip(address);
        if let Some(e) = table.get_mut(&key) {
            let u = user_hash(user);
            let before = e.users.len();
            e.users.retain(|x| *x != u);
            e.failures = e.failures.saturating_sub((before - e.users.len()) as u32);
            if e.failures == 0 && e.blocked_until.is_none() {
                table.remove(&key);
            }
        }
    }

    /// Forget idle, unblocked entries.
    pub fn prune(&self, s: &ThrottleSettings) {
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        prune_locked(&mut table, s, now);
        drop(table);
        self.known.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, t| now.duration_since(*t) < KNOWN_FOR);
        prune_idle(&mut self.in_flight.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Forget the turn-keepers no attempt holds or waits on (the map's is the only reference).
fn prune_idle(map: &mut HashMap<Key, Arc<tokio::sync::Semaphore>>) {
    map.retain(|_, s| Arc::strong_count(s) > 1);
}

fn prune_locked(table: &mut HashMap<Key, Entry>, s: &ThrottleSettings, now: Instant) {
    table.retain(|_, e| now.duration_since(e.last) <= s.window || e.blocked_until.is_some_and(|b| b > now));
}

/// 0 below the threshold, then base, 2·base, 4·base ..., capped.
fn penalty(s: &ThrottleSettings, failures: u32) -> Duration {
    if failures < s.penalty_after {
        return Duration::ZERO;
    }
    let steps = (failures - s.penalty_after).min(16);
    s.penalty_base.saturating_mul(1u32 << steps).min(s.penalty_max)
}

/// A process-local hash of an attempt (its parts: user, password...), to recognise repeats
/// without keeping the password.
pub fn password_fingerprint(parts: &[&[u8]]) -> u64 {
    use std::sync::OnceLock;
    static KEY: OnceLock<(u64, u64)> = OnceLock::new();
    let (k0, k1) = *KEY.get_or_init(|| {
        let mut b = [0u8; 16];
        let _ = rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(&mut b);
        let (a, c) = b.split_at(8);
        (u64::from_le_bytes(a.try_into().unwrap_or_default()), u64::from_le_bytes(c.try_into().unwrap_or_default()))
    });
    // Each part length-prefixed, so no split of the same bytes reads as another; hashed in
    // place, so no copy of a password is made.
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(k0, k1);
    for part in parts {
        h.write_u64(part.len() as u64);
        h.write(part);
    }
    h.finish()
}

/// Connection counts for the caps.
#[derive(Debug, Default)]
pub struct Connections {
    total: AtomicUsize,
    per_listener: Mutex<HashMap<String, usize>>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    per_user: Mutex<HashMap<String, usize>>,
}

/// A relayed session counted against its user; released when dropped.
pub struct UserSlot(std::sync::Arc<Connections>, String);

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut u = self.0.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = u.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                u.remove(&self.1);
            }
        }
    }
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapExceeded {
    Global,
    Listener,
    ClientAddress,
}

impl CapExceeded {
    pub fn as_str(self) -> &'static str {
        match self {
            CapExceeded::Global => "limit_global",
            CapExceeded::Listener => "limit_listener",
            CapExceeded::ClientAddress => "limit_client",
        }
    }
}

/// Releases a connection's slots when dropped.
pub struct ConnectionSlot<'a> {
    conns: &'a Connections,
    listener: String,
    ip: IpAddr,
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.conns.total.fetch_sub(1, Ordering::Relaxed);
        let mut l = self.conns.per_listener.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = l.get_mut(&self.listener) {
            *n = n.saturating_sub(1);
        }
        drop(l);
        let mut p = self.conns.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = p.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.ip);
            }
        }
    }
}

/// Owned form of `ConnectionSlot` for sessions that outlive a borrow.
pub struct OwnedSlot(std::sync::Arc<Connections>, String, IpAddr);

impl Drop for OwnedSlot {
    fn drop(&mut self) {
        drop(ConnectionSlot { conns: &self.0, listener: std::mem::take(&mut self.1), ip: self.2 });
    }
}

impl Connections {
    /// Whether `user` has `max` sessions already (0 = unlimited), without taking a slot.
    pub fn user_full(&self, user: &str, max: usize) -> bool {
        max > 0 && self.per_user.lock().unwrap_or_else(|e| e.into_inner()).get(user).is_some_and(|n| *n >= max)
    }

    /// Count a session for `user`; `None` when the user already has `max` (0 = unlimited).
    pub fn acquire_user(self: &std::sync::Arc<Self>, user: &str, max: usize) -> Option<UserSlot> {
        let mut u = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let n = u.entry(user.to_string()).or_default();
        if max > 0 && *n >= max {
            if *n == 0 {
                u.remove(user);
            }
            return None;
        }
        *n += 1;
        Some(UserSlot(self.clone(), user.to_string()))
    }

    /// Take a slot, or say which cap is full (0 = unlimited). `ip` is the key for the per-client
    /// cap (already aggregated).
    pub fn acquire(
        self: &std::sync::Arc<Self>,
        listener: &str,
        ip: IpAddr,
        max_total: usize,
        max_listener: usize,
        max_ip: usize,
    ) -> Result<OwnedSlot, CapExceeded> {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = OwnedSlot(self.clone(), listener.to_string(), ip);
        {
            let mut l = self.per_listener.lock().unwrap_or_else(|e| e.into_inner());
            *l.entry(listener.to_string()).or_default() += 1;
        }
        let per_ip = {
            let mut p = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = p.entry(ip).or_default();
            *n += 1;
            *n
        };
        let per_listener = *self.per_listener.lock().unwrap_or_else(|e| e.into_inner()).get(listener).unwrap_or(&0);
        if max_total > 0 && total > max_total {
            return Err(CapExceeded::Global);
        }
        if max_listener > 0 && per_listener > max_listener {
            return Err(CapExceeded::Listener);
        }
        if max_ip > 0 && per_ip > max_ip {
            return Err(CapExceeded::ClientAddress);
        }
        Ok(slot)
    }
}

/// A uniform random number in [0, 1), for jitter and spreading (not for secrets): SipHash of a
/// counter under the standard library's randomly keyed, per-thread hasher. No allocation.
pub fn random_unit() -> f64 {
    use std::hash::BuildHasher;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let h = std::collections::hash_map::RandomState::new().hash_one(n);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ThrottleSettings {
        ThrottleSettings { penalty_after: 3, block_after: 6, user_block_after: 4, ..ThrottleSettings::default() }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn penalty_grows_then_blocks_then_cools_down() {
        let (t, s) = (Throttle::default(), settings());
        let a = ip("192.0.2.1");
        let mut delays = Vec::new();
        for i in 0..6u64 {
            match t.check(&s, a, None) {
                Decision::Allow { delay } => delays.push(delay.as_secs()),
                Decision::Blocked => panic!("blocked too early"),
            }
            t.failure(&s, a, None, i);
        }
        // Reliability case 55: 0, 0, 0, then 2, 4, 8 ... capped at 15.
        assert_eq!(delays, vec![0, 0, 0, 2, 4, 8]);
        assert_eq!(t.check(&s, a, None), Decision::Blocked);
        tokio::time::advance(s.cooldown - Duration::from_secs(1)).await;
        assert_eq!(t.check(&s, a, None), Decision::Blocked);
        tokio::time::advance(Duration::from_secs(2)).await;
        // Cooled down: the block lasts `cooldown`, not `cooldown + window`, and counting starts
        // again from zero.
        assert_eq!(t.check(&s, a, None), Decision::Allow { delay: Duration::ZERO });
        for i in 0..6u64 {
            assert!(matches!(t.check(&s, a, None), Decision::Allow { .. }));
            t.failure(&s, a, None, 100 + i);
        }
        assert_eq!(t.check(&s, a, None), Decision::Blocked);
    }

    #[tokio::test(start_paused = true)]
    async fn same_wrong_password_does_not_escalate() {
        let (t, s) = (Throttle::default(), settings());
        let a = ip("192.0.2.2");
        for _ in 0..50 {
            t.failure(&s, a, Some("alice"), 42);
        }
        assert_eq!(t.check(&s, a, Some("alice")), Decision::Allow { delay: Duration::ZERO });
    }

    /// Up to `block_after` stale clients behind one address (phones with an old password,
    /// each polling in turn) count once each, however long they go on.
    #[tokio::test(start_paused = true)]
    async fn stale_clients_behind_one_address_count_once_each() {
        let (t, s) = (Throttle::default(), ThrottleSettings::default());
        let a = ip("192.0.2.3");
        let stale = u64::from(s.block_after) - 1;
        for _ in 0..20 {
            for i in 0..stale {
                t.failure(&s, a, Some(&format!("user{i}@example.org")), i);
            }
            tokio::time::advance(Duration::from_secs(60)).await;
        }
        assert!(matches!(t.check(&s, a, Some("fresh@example.org")), Decision::Allow { .. }));
    }

    #[test]
    fn ipv4_clients_through_a_nat64_prefix_are_keyed_apart() {
        assert_eq!(ip_key(ip("64:ff9b::c000:201"), 64), ip("192.0.2.1"));
        assert_ne!(ip_key(ip("64:ff9b::c000:201"), 64), ip_key(ip("64:ff9b::c633:6407"), 64));
        // Other addresses of the prefix's /64 stay IPv6, aggregated as ever.
        assert_eq!(ip_key(ip("64:ff9b::1:c000:201"), 64), ip("64:ff9b::"));
        assert_eq!(ip_key(ip("::ffff:192.0.2.9"), 64), ip("192.0.2.9"));
    }

    #[test]
    fn random_unit_is_in_range_and_varies() {
        let xs: Vec<f64> = (0..1000).map(|_| super::random_unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let low = xs.iter().filter(|x| **x < 0.5).count();
        assert!((400..600).contains(&low), "{low} of 1000 below 0.5");
    }

    #[tokio::test(start_paused = true)]
    async fn per_user_limit_across_many_addresses() {
        let (t, s) = (Throttle::default(), settings());
        // Reliability case 56: distributed stuffing against one user.
        for i in 0..4u64 {
            t.failure(&s, ip(&format!("198.51.100.{i}")), Some("victim@example.org"), i);
        }
        assert_eq!(t.check(&s, ip("203.0.113.9"), Some("victim@example.org")), Decision::Blocked);
        assert_eq!(
            t.check(&s, ip("203.0.113.9"), Some("other@example.org")),
            Decision::Allow { delay: Duration::ZERO }
        );
    }

    /// Failures for a user sent from elsewhere do not lock the user out of an address they have
    /// logged in from: there only the address's own limit applies. Anywhere else the user's
    /// limit holds, and a known address's own failures still count against it.
    #[tokio::test(start_paused = true)]
    async fn the_user_limit_does_not_lock_a_user_out_of_a_known_address() {
        let (t, s) = (Throttle::default(), settings());
        let (home, office) = (ip("192.0.2.50"), ip("2001:db8:5:6::1"));
        t.success(&s, home, "victim@example.org");
        t.success(&s, office, "victim@example.org");
        for i in 0..8u64 {
            t.failure(&s, ip(&format!("198.51.100.{i}")), Some("victim@example.org"), i);
        }
        assert_eq!(t.check(&s, ip("203.0.113.9"), Some("victim@example.org")), Decision::Blocked);
        assert_eq!(t.check(&s, home, Some("victim@example.org")), Decision::Allow { delay: Duration::ZERO });
        // Another address in the office's /64 is the office.
        assert_eq!(
            t.check(&s, ip("2001:db8:5:6::2"), Some("victim@example.org")),
            Decision::Allow { delay: Duration::ZERO }
        );
        // Known for this user only.
        t.failure(&s, ip("198.51.100.77"), Some("other@example.org"), 1);
        for i in 0..8u64 {
            t.failure(&s, ip(&format!("198.51.100.{i}")), Some("other@example.org"), 100 + i);
        }
        assert_eq!(t.check(&s, home, Some("other@example.org")), Decision::Blocked);
        // A login from the known address takes back only its own failures: the block the
        // guesses from elsewhere caused stays for everywhere else.
        t.success(&s, home, "victim@example.org");
        assert_eq!(t.check(&s, ip("203.0.113.9"), Some("victim@example.org")), Decision::Blocked);
        // No turn among the user's attempts from there either: guesses elsewhere holding all of
        // them do not queue the user at home.
        let mut held = Vec::new();
        for i in 0..IN_FLIGHT_PER_USER {
            held.push(t.attempt(&s, ip(&format!("198.51.100.{}", 100 + i)), Some("victim@example.org")).await);
        }
        let at_home = tokio::time::timeout(Duration::from_secs(1), t.attempt(&s, home, Some("victim@example.org")));
        assert!(at_home.await.is_ok(), "the user at a known address waited for a turn");
        drop(held);
        // Known for a while, not for ever.
        tokio::time::advance(KNOWN_FOR).await;
        for i in 0..8u64 {
            t.failure(&s, ip(&format!("198.51.100.{i}")), Some("victim@example.org"), 200 + i);
        }
        assert_eq!(t.check(&s, home, Some("victim@example.org")), Decision::Blocked);
    }

    /// Reliability case 55, parallel attempts counted: guesses sent at once over many
    /// connections take turns (IN_FLIGHT_PER_ADDRESS at a time), each checked against the
    /// failures before it, so the block comes at most that many - 1 attempts late; without
    /// turns, all of them would pass the check against the same count.
    #[tokio::test(start_paused = true)]
    async fn parallel_attempts_see_each_others_failures() {
        let (t, s) = (Arc::new(Throttle::default()), settings());
        let a = ip("192.0.2.99");
        let mut tasks = Vec::new();
        for i in 0..40u64 {
            let (t, s) = (t.clone(), s.clone());
            tasks.push(tokio::spawn(async move {
                // As a session's login does: a first look and its penalty, then a turn and a
                // second look, then the password check (50 ms) and its verdict counted.
                let user = format!("user{i}");
                match t.check(&s, a, Some(&user)) {
                    Decision::Blocked => return false,
                    Decision::Allow { delay } => tokio::time::sleep(delay).await,
                }
                let _turn = t.attempt(&s, a, Some(&user)).await;
                if t.check(&s, a, Some(&user)) == Decision::Blocked {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                t.failure(&s, a, Some(&user), i);
                true
            }));
        }
        let mut allowed = 0;
        for task in tasks {
            allowed += usize::from(task.await.unwrap());
        }
        let most = s.block_after as usize + IN_FLIGHT_PER_ADDRESS - 1;
        assert!(allowed >= s.block_after as usize && allowed <= most, "{allowed} guesses checked, at most {most}");
        // The turns are let go: nothing is kept once no attempt holds one.
        t.prune(&s);
        assert!(t.in_flight.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn per_address_limit_across_many_users_and_ipv6_prefix() {
        let (t, s) = (Throttle::default(), settings());
        for i in 0..6u64 {
            // Different addresses in one /64 count as one client.
            let a = ip(&format!("2001:db8:1:2::{:x}", i + 1));
            t.failure(&s, a, Some(&format!("user{i}")), i);
        }
        assert_eq!(t.check(&s, ip("2001:db8:1:2::ffff"), Some("fresh")), Decision::Blocked);
        assert_eq!(t.check(&s, ip("2001:db8:1:3::1"), Some("fresh")), Decision::Allow { delay: Duration::ZERO });
    }

    #[tokio::test(start_paused = true)]
    async fn trusted_networks_are_exempt_and_success_clears() {
        let mut s = settings();
        s.trusted = vec![Cidr::parse("10.0.0.0/8").unwrap()];
        let t = Throttle::default();
        for i in 0..20u64 {
            t.failure(&s, ip("10.1.1.1"), Some("u"), i);
        }
        assert!(t.is_empty());
        for i in 0..3u64 {
            t.failure(&s, ip("192.0.2.7"), Some("bob"), i);
        }
        assert!(
            matches!(t.check(&s, ip("192.0.2.7"), Some("bob")), Decision::Allow { delay } if delay > Duration::ZERO)
        );
        t.success(&s, ip("192.0.2.7"), "bob");
        assert_eq!(t.check(&s, ip("192.0.2.7"), Some("bob")), Decision::Allow { delay: Duration::ZERO });
    }

    /// A password spray from one address, with a login to an account of the attacker's own
    /// between guesses: the success takes back only its own user's failures, so the address
    /// is still blocked after `block_after` guesses at others (reliability case 55), while the
    /// user's own mistyped passwords, once right, are forgiven (case 44).
    #[tokio::test(start_paused = true)]
    async fn a_success_of_ones_own_does_not_lift_the_address_limit() {
        let s = settings();
        let t = Throttle::default();
        let attacker = ip("198.51.100.9");
        // Mallory mistypes her own password twice, then gets it right: those two are forgiven.
        t.failure(&s, attacker, Some("mallory"), 1);
        t.failure(&s, attacker, Some("mallory"), 2);
        for n in 0..s.block_after - 1 {
            assert!(matches!(t.check(&s, attacker, Some("mallory")), Decision::Allow { .. }));
            t.success(&s, attacker, "mallory");
            let victim = format!("victim{n}");
            assert!(matches!(t.check(&s, attacker, Some(&victim)), Decision::Allow { .. }), "{victim}");
            // (Fingerprints are of user and password: each guess is a new one.)
            t.failure(&s, attacker, Some(&victim), 100 + u64::from(n));
        }
        t.success(&s, attacker, "mallory");
        t.failure(&s, attacker, Some("victim-last"), 99);
        assert_eq!(t.check(&s, attacker, Some("someone-else")), Decision::Blocked);
        // Another address is untouched, and the victims' own counters hold one failure each.
        assert_eq!(t.check(&s, ip("198.51.100.10"), Some("victim0")), Decision::Allow { delay: Duration::ZERO });
    }

    /// Reliability case 57: with no `max_connections` set, the open-file limit sets it (two
    /// descriptors a session, some kept back), so a flood is refused at accept rather than
    /// leaving logins without a descriptor for their backend connection.
    #[test]
    fn the_descriptor_limit_caps_connections_when_nothing_else_does() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_descriptor_cap(limits), Some((20000 - 256) / 2));
        assert_eq!(parse_descriptor_cap(&limits.replace("20000  ", "unlimited")), None);
        assert_eq!(parse_descriptor_cap("Max open files 1024 4096 files"), Some((1024 - 128) / 2));
        assert_eq!(parse_descriptor_cap("Max open files 1 1 files"), Some(1));
        // This process: whatever its limit, a configured cap is kept as it is.
        assert_eq!(effective_max_connections(5), 5);
        assert_eq!(effective_max_connections(0), descriptor_cap().unwrap_or(0));
    }

    #[tokio::test(start_paused = true)]
    async fn counters_are_pruned_and_bounded() {
        let mut s = settings();
        s.max_entries = 100;
        let t = Throttle::default();
        for i in 0..1000u32 {
            t.failure(&s, IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), None, 1);
        }
        assert!(t.len() <= 100, "{}", t.len());
        tokio::time::advance(s.window + Duration::from_secs(1)).await;
        t.prune(&s);
        assert!(t.is_empty());
    }

    /// A full table where entries expire about as fast as a flood adds them is trimmed to nine
    /// tenths, not to one below full: the next failure does not scan the whole table again.
    #[tokio::test(start_paused = true)]
    async fn a_full_table_is_trimmed_with_room_to_spare() {
        let mut s = settings();
        s.max_entries = 100;
        let t = Throttle::default();
        for i in 0..100u32 {
            t.failure(&s, IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), None, 1);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        // The first entry has just expired; the others have not.
        tokio::time::advance(s.window - Duration::from_millis(995)).await;
        t.failure(&s, ip("192.0.2.200"), None, 1);
        assert!(t.len() <= 91, "{}", t.len());
    }

    /// A full table drops idle counters before blocks: a flood of fresh keys does not unblock.
    #[tokio::test(start_paused = true)]
    async fn a_flood_of_keys_does_not_lift_a_block() {
        let mut s = settings();
        s.max_entries = 100;
        let t = Throttle::default();
        let attacker = ip("192.0.2.66");
        for i in 0..u64::from(s.block_after) {
            t.failure(&s, attacker, None, i);
        }
        assert_eq!(t.check(&s, attacker, None), Decision::Blocked);
        for i in 0..1000u32 {
            tokio::time::advance(Duration::from_millis(1)).await;
            t.failure(&s, IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), None, 1);
        }
        assert!(t.len() <= 100, "{}", t.len());
        assert_eq!(t.check(&s, attacker, None), Decision::Blocked);
    }

    #[test]
    fn connection_caps() {
        let c = std::sync::Arc::new(Connections::default());
        let a = ip("192.0.2.1");
        let s1 = c.acquire("imaps", a, 0, 0, 2).unwrap();
        let _s2 = c.acquire("imaps", a, 0, 0, 2).unwrap();
        assert_eq!(c.acquire("imaps", a, 0, 0, 2).err(), Some(CapExceeded::ClientAddress));
        drop(s1);
        let _s3 = c.acquire("imaps", a, 0, 0, 2).unwrap();
        assert_eq!(c.acquire("pop3s", ip("192.0.2.9"), 2, 0, 0).err(), Some(CapExceeded::Global));
        assert_eq!(c.acquire("imaps", ip("192.0.2.9"), 0, 2, 0).err(), Some(CapExceeded::Listener));
        let u1 = c.acquire_user("alice", 1).unwrap();
        assert!(c.acquire_user("alice", 1).is_none());
        drop(u1);
        assert!(c.acquire_user("alice", 1).is_some());
    }
}
