//! Pools: users stay on their rendezvous backend, fail over before the client sees an error,
//! avoid draining and full backends, and follow the pool's failover setting.

mod common;

use std::net::SocketAddr;

use common::*;
use portcullis::config::Protocol;

fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn pool_config(backends: &[(&str, SocketAddr, &str)], failover: bool) -> String {
    let mut c = String::from(
        "[limits]\nauth_failure_delay = \"10ms\"\nbackend_connect_timeout = \"500ms\"\nbackend_login_timeout = \"1s\"\n\n[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nprotocol = \"imap\"\ntls = \"none\"\nallow_plaintext_auth = true\n\n[auth]\npasswd_file = \"users\"\n",
    );
    for (name, addr, extra) in backends {
        c.push_str(&format!(
            "\n[[backend]]\nname = \"{name}\"\naddress = \"{addr}\"\nhealth = {{ enabled = false }}\n{extra}\n"
        ));
    }
    let names: Vec<String> = backends.iter().map(|(n, _, _)| format!("\"{n}\"")).collect();
    c.push_str(&format!(
        "\n[[pool]]\nname = \"p\"\nbackends = [{}]\nfailover = {failover}\n\n[routing]\ndefault = \"p\"\n",
        names.join(", ")
    ));
    c
}

fn users(n: usize) -> String {
    (0..n).map(|i| format!("u{i}@example.test:{{PLAIN}}pw\n")).collect()
}

/// The backend name each user's login reached, from the fakes' records.
fn landed(fakes: &[(&str, &FakeBackend)], user: &str) -> Vec<String> {
    let needle = format!("LOGIN \"{user}\"");
    fakes
        .iter()
        .filter(|(_, f)| (0..f.connections()).any(|i| f.lines(i).iter().any(|l| l.contains(&needle))))
        .map(|(n, _)| n.to_string())
        .collect()
}

async fn login(proxy: &Proxy, user: &str) -> (Client<tokio::net::TcpStream>, String) {
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(format!("a LOGIN {user} pw\r\n").as_bytes()).await;
    let reply = c.until_tagged("a").await.pop().unwrap();
    (c, reply)
}

fn expected(proxy: &Proxy, user: &str) -> Vec<String> {
    let rt = proxy.app.runtime();
    let pool = &rt.config.pools["p"];
    portcullis::route::rendezvous(&pool.backends, user).iter().map(|b| b.name.clone()).collect()
}

#[tokio::test]
async fn users_land_on_their_rendezvous_backend() {
    let (a, b, c) = (
        FakeBackend::start(Behaviour::Normal).await,
        FakeBackend::start(Behaviour::Normal).await,
        FakeBackend::start(Behaviour::Normal).await,
    );
    let cfg = pool_config(&[("a", a.addr, ""), ("b", b.addr, ""), ("c", c.addr, "")], true);
    let proxy = Proxy::start(&cfg, &users(30)).await;
    let fakes = [("a", &a), ("b", &b), ("c", &c)];
    let mut seen = std::collections::HashSet::new();
    for i in 0..30 {
        let user = format!("u{i}@example.test");
        for _ in 0..2 {
            let (_, reply) = login(&proxy, &user).await;
            assert!(reply.starts_with("a OK"), "{reply}");
        }
        let want = expected(&proxy, &user)[0].clone();
        // Both logins of the user went to the same backend: its rendezvous first choice.
        assert_eq!(landed(&fakes, &user), vec![want.clone()]);
        seen.insert(want);
    }
    assert_eq!(seen.len(), 3, "30 users spread over all three backends");
}

#[tokio::test]
async fn failover_moves_the_session_before_the_client_sees_an_error() {
    let live = FakeBackend::start(Behaviour::Normal).await;
    let dead = closed_port();
    let cfg = pool_config(&[("dead", dead, ""), ("live", live.addr, "")], true);
    let proxy = Proxy::start(&cfg, &users(40)).await;
    // Users whose first choice is the dead backend.
    let victims: Vec<String> =
        (0..40).map(|i| format!("u{i}@example.test")).filter(|u| expected(&proxy, u)[0] == "dead").collect();
    assert!(victims.len() > 5);
    for user in &victims {
        let (_, reply) = login(&proxy, user).await;
        assert!(reply.starts_with("a OK"), "{user}: {reply}");
        assert_eq!(landed(&[("live", &live)], user), vec!["live".to_string()]);
    }
    // Reliability case 65: after `fall` failed connects the dead backend is marked down.
    assert!(!proxy.app.health().is_up("dead"));

    // Without failover, the user's mailbox lives only there: a temporary error.
    let cfg = pool_config(&[("dead", dead, ""), ("live", live.addr, "")], false);
    let proxy = Proxy::start(&cfg, &users(40)).await;
    let (_, reply) = login(&proxy, &victims[0]).await;
    assert_eq!(reply, "a NO [UNAVAILABLE] Server unavailable, try again later.\r\n");
}

/// A backend that refuses a login for now (its own auth down, shutting down, a limit on one
/// user's connections) has the next one tried, also where the backend is what checks the
/// password, and is not counted against its health: one user could mark it down for everyone.
#[tokio::test]
async fn a_temporary_refusal_fails_over_and_is_not_the_backends_failure() {
    let busy = FakeBackend::start(Behaviour::LoginUnavailable).await;
    let live = FakeBackend::start(Behaviour::Normal).await;
    let cfg = pool_config(&[("busy", busy.addr, ""), ("live", live.addr, "")], true);
    let verified = Proxy::start(&cfg, &users(40)).await;
    let by_backend = Proxy::start(&cfg.replace("passwd_file = \"users\"", "source = \"backend\""), "").await;
    let user = (0..40).map(|i| format!("u{i}@example.test")).find(|u| expected(&verified, u)[0] == "busy").unwrap();
    for (n, proxy) in [&verified, &by_backend, &by_backend, &by_backend].into_iter().enumerate() {
        let (_, reply) = login(proxy, &user).await;
        assert!(reply.starts_with("a OK"), "{reply}");
        assert_eq!((busy.connections(), live.connections()), (n + 1, n + 1));
    }
    assert!(by_backend.app.health().is_up("busy"), "past `fall` (3), still up");
}

/// A pool's last resort, a backend its checks have just marked down, that refuses the
/// connection is tried again within backend_connect_timeout like any other (case 64): only one
/// marked down while the login waited is not.
#[tokio::test]
async fn a_last_resort_that_refuses_is_tried_again() {
    let port = closed_port();
    let cfg = pool_config(&[("a", port, "")], true)
        .replace("backend_connect_timeout = \"500ms\"", "backend_connect_timeout = \"6s\"")
        .replace(
            "health = { enabled = false }",
            "health = { enabled = true, interval = \"60s\", timeout = \"1s\", fall = 1 }",
        );
    let proxy = Proxy::start(&cfg, &users(1)).await;
    for _ in 0..100 {
        if !proxy.app.health().is_up("a") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!proxy.app.health().is_up("a"), "the first check marks it down");
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN u0@example.test pw\r\n").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let back = FakeBackend::start_on(port, Behaviour::Normal).await;
    let reply = c.until_tagged("a").await;
    assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
    assert_eq!(back.connections(), 1);
}

/// A login waiting out a backend that refuses connections (restarting) does not try it again
/// once a reload has drained it: "set it and reload" holds for logins under way too.
#[tokio::test]
async fn a_backend_drained_while_a_login_waits_for_it_is_not_tried_again() {
    let port = closed_port();
    let cfg = pool_config(&[("a", port, "")], true)
        .replace("backend_connect_timeout = \"500ms\"", "backend_connect_timeout = \"6s\"");
    let proxy = Proxy::start(&cfg, &users(1)).await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN u0@example.test pw\r\n").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    write_file(
        &proxy.config_path(),
        &cfg.replace("health = { enabled = false }\n", "health = { enabled = false }\nstate = \"draining\"\n"),
    );
    proxy.app.reload(false).await.unwrap();
    // Back on its port before the next try, a second after the first.
    let back = FakeBackend::start_on(port, Behaviour::Normal).await;
    assert_eq!(c.line().await, "a NO [UNAVAILABLE] Server unavailable, try again later.\r\n");
    assert_eq!(back.connections(), 0);
}

#[tokio::test]
async fn draining_backends_get_no_new_sessions_but_keep_theirs() {
    let (a, b) = (FakeBackend::start(Behaviour::Normal).await, FakeBackend::start(Behaviour::Normal).await);
    let cfg = pool_config(&[("a", a.addr, ""), ("b", b.addr, "")], true);
    let proxy = Proxy::start(&cfg, &users(20)).await;
    let on_a: Vec<String> =
        (0..20).map(|i| format!("u{i}@example.test")).filter(|u| expected(&proxy, u)[0] == "a").collect();
    let (mut early, reply) = login(&proxy, &on_a[0]).await;
    assert!(reply.starts_with("a OK"));
    write_file(&proxy.config_path(), &pool_config(&[("a", a.addr, "state = \"draining\""), ("b", b.addr, "")], true));
    proxy.app.reload(false).await.unwrap();
    // New sessions of a's users go to b.
    let (_, reply) = login(&proxy, &on_a[1]).await;
    assert!(reply.starts_with("a OK"));
    assert_eq!(landed(&[("a", &a), ("b", &b)], &on_a[1]), vec!["b".to_string()]);
    // The session already on a goes on.
    early.send(b"x NOOP\r\n").await;
    assert_eq!(early.line().await, "x OK done\r\n");
}

#[tokio::test]
async fn a_full_backend_spills_to_the_next_in_order() {
    let (a, b) = (FakeBackend::start(Behaviour::Normal).await, FakeBackend::start(Behaviour::Normal).await);
    let cfg = pool_config(&[("a", a.addr, "max_sessions = 1"), ("b", b.addr, "")], true);
    let proxy = Proxy::start(&cfg, &users(20)).await;
    let on_a: Vec<String> =
        (0..20).map(|i| format!("u{i}@example.test")).filter(|u| expected(&proxy, u)[0] == "a").collect();
    let (_first, reply) = login(&proxy, &on_a[0]).await;
    assert!(reply.starts_with("a OK"));
    let (_second, reply) = login(&proxy, &on_a[1]).await;
    assert!(reply.starts_with("a OK"));
    assert_eq!(landed(&[("a", &a), ("b", &b)], &on_a[1]), vec!["b".to_string()]);
    assert_eq!(proxy.app.health().sessions("a"), 1);
}

#[tokio::test]
async fn shared_pool_keeps_a_users_protocols_on_one_host() {
    // Two hosts, each with an IMAP and a POP3 backend sharing a host_key.
    let cfg = r#"
[auth]
source = "backend"
[[backend]]
name = "h1-imap"
address = "127.0.0.1:1"
host_key = "h1"
[[backend]]
name = "h1-pop3"
protocol = "pop3"
address = "127.0.0.1:2"
host_key = "h1"
[[backend]]
name = "h2-imap"
address = "127.0.0.1:3"
host_key = "h2"
[[backend]]
name = "h2-pop3"
protocol = "pop3"
address = "127.0.0.1:4"
host_key = "h2"
[[pool]]
name = "hosts"
backends = ["h1-imap", "h1-pop3", "h2-imap", "h2-pop3"]
[routing]
default = "hosts"
"#;
    let config = portcullis::config::Config::parse(std::path::Path::new("/t.toml"), cfg).unwrap();
    let health = portcullis::health::HealthTable::default();
    for i in 0..50 {
        let user = format!("user{i}@example.test");
        let t = portcullis::route::target(&config, Protocol::Imap, &user, &[]).unwrap();
        let imap = portcullis::route::plan(&t, Protocol::Imap, &user, &health).candidates[0].host_key.clone();
        let t = portcullis::route::target(&config, Protocol::Pop3, &user, &[]).unwrap();
        let pop3 = portcullis::route::plan(&t, Protocol::Pop3, &user, &health).candidates[0].host_key.clone();
        assert_eq!(imap, pop3);
    }
}

/// A shared-table rule whose target does not speak the session's protocol is passed over for
/// the next rule in the same table (here the default), not a dead end.
#[test]
fn a_shared_rule_for_another_protocol_falls_through_to_the_default() {
    let cfg = r#"
[auth]
source = "backend"
[[backend]]
name = "legacy-imap"
address = "127.0.0.1:1"
[[backend]]
name = "h1-imap"
address = "127.0.0.1:2"
[[backend]]
name = "h1-pop3"
protocol = "pop3"
address = "127.0.0.1:3"
[[pool]]
name = "hosts"
backends = ["h1-imap", "h1-pop3"]
[routing]
default = "hosts"
domains = { "legacy.example.org" = "legacy-imap" }
"#;
    let config = portcullis::config::Config::parse(std::path::Path::new("/t.toml"), cfg).unwrap();
    let user = "ann@legacy.example.org";
    let imap = portcullis::route::target(&config, Protocol::Imap, user, &[]).unwrap();
    assert_eq!(imap.name(), "legacy-imap");
    let pop3 = portcullis::route::target(&config, Protocol::Pop3, user, &[]).expect("no POP3 route");
    assert_eq!(pop3.name(), "hosts");
}

/// With `strip_default_domain`, `bob@example.org` is the user `bob`; a rule for `example.org`
/// (exact or wildcard) still routes him, where it used to be skipped for the default.
#[test]
fn a_stripped_default_domain_still_has_its_domain_rules() {
    let cfg = |rule: &str| {
        format!(
            r#"
[users]
default_domain = "example.org"
strip_default_domain = true
[auth]
source = "backend"
[[backend]]
name = "legacy"
address = "127.0.0.1:1"
[[backend]]
name = "new"
address = "127.0.0.1:2"
[routing.imap]
default = "new"
{rule}
"#
        )
    };
    for rule in [r#"domains = { "example.org" = "legacy" }"#, r#"domains = { "*.org" = "legacy" }"#] {
        let config = portcullis::config::Config::parse(std::path::Path::new("/t.toml"), &cfg(rule)).unwrap();
        for typed in ["bob@example.org", "Bob@Example.ORG", "bob"] {
            let user = config.users.canonical(typed).unwrap();
            assert_eq!(user, "bob");
            let t = portcullis::route::target(&config, Protocol::Imap, &user, &[]).unwrap();
            assert_eq!(t.name(), "legacy", "{rule}: {typed}");
        }
        // Other domains are untouched.
        let t = portcullis::route::target(&config, Protocol::Imap, "ann@example.net", &[]).unwrap();
        assert_eq!(t.name(), "new", "{rule}");
    }
}

/// Reliability case 65: a pool's backend that its checks have said down for 30 s is no longer
/// a last resort, so with every backend long down a login fails at once instead of waiting out
/// each one's connect timeout. One down for less than that is still tried, last.
#[tokio::test(start_paused = true)]
async fn backends_long_down_are_not_tried() {
    use portcullis::health::{FAIL_FAST_AFTER, HealthTable, Source};
    let cfg = r#"
[auth]
source = "backend"
[[backend]]
name = "a"
address = "127.0.0.1:1"
[[backend]]
name = "b"
address = "127.0.0.1:2"
[[backend]]
name = "c"
address = "127.0.0.1:3"
health = { enabled = false }
[[backend]]
name = "d"
address = "127.0.0.1:4"
[[pool]]
name = "p"
backends = ["a", "b", "c"]
[[pool]]
name = "q"
backends = ["a", "b"]
[[pool]]
name = "r"
backends = ["d"]
[routing]
default = "p"
users = { "q@example.test" = "q", "r@example.test" = "r" }
"#;
    let config = portcullis::config::Config::parse(std::path::Path::new("/t.toml"), cfg).unwrap();
    let health = HealthTable::default();
    let names = |user: &str, health: &HealthTable| {
        let t = portcullis::route::target(&config, Protocol::Imap, user, &[]).unwrap();
        let mut n: Vec<String> = portcullis::route::plan(&t, Protocol::Imap, user, health)
            .candidates
            .iter()
            .map(|b| b.name.clone())
            .collect();
        n.sort();
        n
    };
    let (a, b, c, d) = (&config.backends["a"], &config.backends["b"], &config.backends["c"], &config.backends["d"]);
    for backend in [a, b, c] {
        health.failure(backend, Source::Check, 1, "connect");
    }
    // d is marked down by failed logins only (a blip), its checks have not failed.
    health.failure(d, Source::Session, 1, "connect");
    assert_eq!(names("u@example.test", &health), ["a", "b", "c"], "down, but still the last resort");
    assert_eq!(names("q@example.test", &health), ["a", "b"]);
    tokio::time::advance(FAIL_FAST_AFTER).await;
    assert!(names("q@example.test", &health).is_empty(), "every backend long down: nothing to wait for");
    assert_eq!(names("r@example.test", &health), ["d"], "down by sessions only: still a last resort");
    // c has no active checks (only a login can mark it up): it stays in the plan.
    health.failure(c, Source::Session, 1, "connect");
    assert_eq!(names("u@example.test", &health), ["c"]);
    // One passing check (rise is 2): not up yet, but a last resort again.
    health.success(b, Source::Check, 2);
    assert_eq!(names("q@example.test", &health), ["b"]);
    // Up again by its checks: first in the plan.
    health.success(a, Source::Check, 1);
    assert_eq!(names("q@example.test", &health), ["a", "b"]);
}
