//! Hot reload in place: listeners added, removed and re-bound without touching sessions on the
//! others; relayed sessions keep their backend, logins go by the running config; a bad config
//! keeps the running one.

mod common;

use common::*;

fn config(backend: std::net::SocketAddr, listeners: &[(&str, u16)]) -> String {
    let mut c = plain_config(backend, "");
    for (name, port) in listeners {
        c.push_str(&format!(
            "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"imap\"\ntls = \"none\"\nallow_plaintext_auth = true\n"
        ));
    }
    c
}

async fn login(addr: std::net::SocketAddr) -> Client<tokio::net::TcpStream> {
    let mut c = Client::connect(addr).await;
    assert!(c.line().await.starts_with("* OK"));
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    assert!(c.until_tagged("a").await.last().unwrap().starts_with("a OK"));
    c
}

async fn still_works(c: &mut Client<tokio::net::TcpStream>, tag: &str) {
    c.send(format!("{tag} NOOP\r\n").as_bytes()).await;
    assert_eq!(c.line().await, format!("{tag} OK done\r\n"));
}

fn refused(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test]
async fn listeners_are_added_removed_and_rebound_without_touching_sessions() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let proxy = Proxy::start(&config(backend.addr, &[("a", pa), ("b", pb)]), USERS).await;
    let addr = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    let mut on_a = login(addr(pa)).await;
    let mut on_b = login(addr(pb)).await;
    let mut on_plain = login(proxy.addr("plain")).await;

    // Reliability case 75: add c, remove b, keep a.
    write_file(&proxy.config_path(), &config(backend.addr, &[("a", pa), ("c", pc)]));
    assert_eq!(proxy.app.reload(false).await.unwrap(), portcullis::app::Reloaded::Applied);
    login(addr(pc)).await;
    login(addr(pa)).await;
    assert!(refused(pb), "removed listener still accepts");
    // Sessions on every listener, the removed one included, go on.
    still_works(&mut on_a, "x1").await;
    still_works(&mut on_b, "x2").await;
    still_works(&mut on_plain, "x3").await;

    // Re-bind a to a new port.
    let pa2 = free_port();
    write_file(&proxy.config_path(), &config(backend.addr, &[("a", pa2), ("c", pc)]));
    proxy.app.reload(false).await.unwrap();
    login(addr(pa2)).await;
    assert!(refused(pa));
    still_works(&mut on_a, "x4").await;

    // Unchanged files: nothing to do.
    assert_eq!(proxy.app.reload(false).await.unwrap(), portcullis::app::Reloaded::Unchanged);
}

/// Reliability case 75 under load: a client connecting all the while to a listener that every
/// reload keeps is never refused nor left without a greeting, while twenty reloads add and
/// remove another listener beside it.
#[tokio::test]
async fn a_kept_listener_refuses_no_connection_during_reloads() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let (pa, pc) = (free_port(), free_port());
    let proxy = Proxy::start(&config(backend.addr, &[("a", pa)]), USERS).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let load = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            match tokio::net::TcpStream::connect(("127.0.0.1", pa)).await {
                Ok(tcp) => {
                    let mut c = Client::new(tcp);
                    let greeting =
                        tokio::time::timeout(std::time::Duration::from_secs(2), c.line()).await.unwrap_or_default();
                    if greeting.starts_with("* OK") { ok += 1 } else { failed.push(greeting) }
                }
                Err(e) => failed.push(e.to_string()),
            }
        }
        (ok, failed)
    });
    for i in 0..20 {
        let listeners: &[(&str, u16)] = if i % 2 == 0 { &[("a", pa), ("c", pc)] } else { &[("a", pa)] };
        write_file(&proxy.config_path(), &config(backend.addr, listeners));
        assert_eq!(proxy.app.reload(false).await.unwrap(), portcullis::app::Reloaded::Applied);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = load.await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok >= 20, "{ok}");
}

#[tokio::test]
async fn a_broken_config_keeps_the_running_one() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let pa = free_port();
    let good = config(backend.addr, &[("a", pa)]);
    let proxy = Proxy::start(&good, USERS).await;
    let mut session = login(proxy.addr("plain")).await;
    // Reliability case 76.
    write_file(&proxy.config_path(), "[[listener]\nname = ");
    let err = proxy.app.reload(false).await.unwrap_err().to_string();
    assert!(err.contains("portcullis.toml:1:"), "{err}");
    write_file(
        &proxy.config_path(),
        &good.replace(
            "protocol = \"imap\"\ntls = \"none\"\nallow_plaintext_auth = true\n\n[auth]",
            "protocol = \"lmtp\"\ntls = \"none\"\nallow_plaintext_auth = true\n\n[auth]",
        ),
    );
    let err = proxy.app.reload(false).await.unwrap_err().to_string();
    assert!(err.contains("listener[0].protocol"), "{err}");
    // A port that cannot be bound rejects the whole reload.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    write_file(&proxy.config_path(), &config(backend.addr, &[("a", pa), ("z", busy_port)]));
    let err = proxy.app.reload(false).await.unwrap_err().to_string();
    assert!(err.contains("cannot bind"), "{err}");
    login(std::net::SocketAddr::from(([127, 0, 0, 1], pa))).await;
    login(proxy.addr("plain")).await;
    still_works(&mut session, "x").await;
}

#[tokio::test]
async fn sessions_keep_their_backend_and_logins_after_a_reload_use_the_new_config() {
    let old = FakeBackend::start(Behaviour::Normal).await;
    let new = FakeBackend::start(Behaviour::Normal).await;
    let pa = free_port();
    let proxy = Proxy::start(&config(old.addr, &[("a", pa)]), USERS).await;
    let a = std::net::SocketAddr::from(([127, 0, 0, 1], pa));
    let mut relayed = login(a).await;
    // Greeted before the reload, logs in after it: judged and routed by the config running
    // then, as a client greeted after it is (a backend moved, a user removed, is so for all).
    let mut early = Client::connect(a).await;
    assert!(early.line().await.starts_with("* OK"));
    write_file(&proxy.config_path(), &config(new.addr, &[("a", pa)]));
    write_file(&proxy.path("users"), "alice@example.test:{PLAIN}changed\n");
    proxy.app.reload(false).await.unwrap();
    early.send(b"a LOGIN alice@example.test secret\r\n").await;
    assert!(early.line().await.starts_with("a NO [AUTHENTICATIONFAILED]"));
    early.send(b"b LOGIN alice@example.test changed\r\n").await;
    assert!(early.until_tagged("b").await.last().unwrap().starts_with("b OK"));
    assert_eq!((old.connections(), new.connections()), (1, 1));
    // The session relayed before the reload goes on where it is.
    still_works(&mut relayed, "x").await;
    assert_eq!(old.connections(), 1);
}

/// A relayed session holds no config: one accepted before a reload does not keep the config it
/// was accepted under (its users database, an auth cache) in memory for as long as it lasts.
#[tokio::test]
async fn relayed_sessions_do_not_keep_the_config_they_were_accepted_under() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(&config(backend.addr, &[]), USERS).await;
    let mut relayed = login(proxy.addr("plain")).await;
    let accepted_under = std::sync::Arc::downgrade(&proxy.app.runtime());
    write_file(&proxy.path("users"), "alice@example.test:{PLAIN}changed\n");
    assert_eq!(proxy.app.reload(false).await.unwrap(), portcullis::app::Reloaded::Applied);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while accepted_under.upgrade().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the config replaced by the reload is still held");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    still_works(&mut relayed, "x").await;
}

#[tokio::test]
async fn a_backend_disabled_by_a_reload_is_not_used_by_sessions_greeted_before_it() {
    // "Set it and reload" must hold at once: the snapshot a session was greeted under still
    // routes it, but never to a backend the running config has taken out.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let pa = free_port();
    let cfg = config(backend.addr, &[("a", pa)]);
    let proxy = Proxy::start(&cfg, USERS).await;
    let a = std::net::SocketAddr::from(([127, 0, 0, 1], pa));
    let mut early = Client::connect(a).await;
    assert!(early.line().await.starts_with("* OK"));
    let disabled = cfg.replace("health = { enabled = false }", "health = { enabled = false }\nstate = \"disabled\"");
    write_file(&proxy.config_path(), &disabled);
    proxy.app.reload(false).await.unwrap();
    early.send(b"a LOGIN alice@example.test secret\r\n").await;
    assert_eq!(early.line().await, "a NO [UNAVAILABLE] Server unavailable, try again later.\r\n");
    assert_eq!(backend.connections(), 0);
    // Enabled again: the same early session now gets it.
    write_file(&proxy.config_path(), &cfg);
    proxy.app.reload(false).await.unwrap();
    early.send(b"b LOGIN alice@example.test secret\r\n").await;
    assert!(early.until_tagged("b").await.last().unwrap().starts_with("b OK"));
    assert_eq!(backend.connections(), 1);
}

#[tokio::test]
async fn users_file_changes_are_reloaded() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(&plain_config(backend.addr, ""), USERS).await;
    write_file(&proxy.path("users"), "alice@example.test:{PLAIN}changed\n");
    proxy.app.reload(false).await.unwrap();
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    assert!(c.line().await.starts_with("a NO [AUTHENTICATIONFAILED]"));
    c.send(b"b LOGIN alice@example.test changed\r\n").await;
    assert!(c.until_tagged("b").await.last().unwrap().starts_with("b OK"));
    // A broken users file is a config error naming the users file and line.
    write_file(&proxy.path("users"), "ok:{PLAIN}x\nbad:{NOPE}x\n");
    let err = proxy.app.reload(false).await.unwrap_err().to_string();
    assert!(err.contains("users:2:1: field `password`"), "{err}");
}

#[tokio::test]
async fn kubernetes_configmap_symlink_swap_is_noticed() {
    // A ConfigMap volume: portcullis.toml -> ..data/portcullis.toml, ..data -> ..v1; an update
    // writes ..v2, points ..data_tmp at it and renames ..data_tmp over ..data.
    portcullis::tls::init_crypto();
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pa = free_port();
    let pb = free_port();
    for (v, cfg) in [("..v1", config(backend.addr, &[("a", pa)])), ("..v2", config(backend.addr, &[("b", pb)]))] {
        std::fs::create_dir(d.join(v)).unwrap();
        std::fs::write(d.join(v).join("portcullis.toml"), cfg).unwrap();
        std::fs::write(d.join(v).join("users"), USERS).unwrap();
    }
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/portcullis.toml", d.join("portcullis.toml")).unwrap();
    std::os::unix::fs::symlink("..data/users", d.join("users")).unwrap();
    let app = portcullis::app::App::start(&d.join("portcullis.toml")).await.unwrap();
    portcullis::config::watch::spawn(app.clone(), hangup());
    login(std::net::SocketAddr::from(([127, 0, 0, 1], pa))).await;

    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", pb)).is_err() {
        assert!(tokio::time::Instant::now() < deadline, "symlink swap not picked up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    login(std::net::SocketAddr::from(([127, 0, 0, 1], pb))).await;
    assert!(refused(pa));
}

#[tokio::test]
async fn shutdown_says_bye_to_clients_still_logging_in() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(&plain_config(backend.addr, "shutdown_grace = \"2s\""), USERS).await;
    let mut waiting = Client::connect(proxy.addr("plain")).await;
    assert!(waiting.line().await.starts_with("* OK"));
    let mut relayed = login(proxy.addr("plain")).await;
    let port = proxy.addr("plain").port();
    let app = proxy.app.clone();
    let done = tokio::spawn(async move { app.shutdown().await });
    // Reliability case 80.
    assert_eq!(waiting.line().await, "* BYE Server shutting down.\r\n");
    assert!(waiting.closed().await);
    // A relayed session goes on during the grace period and its end lets shutdown finish.
    still_works(&mut relayed, "r").await;
    relayed.send(b"z LOGOUT\r\n").await;
    assert!(relayed.closed().await);
    drop(relayed);
    tokio::time::timeout(std::time::Duration::from_millis(1500), done).await.unwrap().unwrap();
    assert!(refused(port));
}

/// Reliability case 80 for POP3 and SMTP: a client still logging in is told in its protocol's
/// words before the connection closes.
#[tokio::test]
async fn shutdown_says_goodbye_in_pop3_and_smtp() {
    for (protocol, behaviour, greeting, goodbye) in [
        ("pop3", Behaviour::Pop3, "+OK", "-ERR [SYS/TEMP] Server shutting down.\r\n"),
        ("smtp", Behaviour::Smtp, "220 ", "421 4.3.2 Service shutting down, closing connection\r\n"),
    ] {
        let backend = FakeBackend::start(behaviour).await;
        let proxy = Proxy::start(&protocol_config(protocol, backend.addr, "shutdown_grace = \"2s\""), USERS).await;
        let mut waiting = Client::connect(proxy.addr("plain")).await;
        assert!(waiting.line().await.starts_with(greeting), "{protocol}");
        let app = proxy.app.clone();
        let done = tokio::spawn(async move { app.shutdown().await });
        assert_eq!(waiting.line().await, goodbye, "{protocol}");
        assert!(waiting.closed().await, "{protocol}");
        tokio::time::timeout(std::time::Duration::from_millis(1500), done).await.unwrap().unwrap();
    }
}

/// A client waiting out the failure delay (or an auth service's Auth-Wait) hears the goodbye
/// at shutdown, not its verdict, and not nothing once shutdown has stopped waiting for it.
#[tokio::test]
async fn shutdown_says_goodbye_during_the_failure_delay() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let config = plain_config(backend.addr, "shutdown_grace = \"100ms\"")
        .replace("auth_failure_delay = \"10ms\"", "auth_failure_delay = \"20s\"");
    assert!(config.contains("auth_failure_delay = \"20s\""));
    let proxy = Proxy::start(&config, USERS).await;
    let mut waiting = Client::connect(proxy.addr("plain")).await;
    assert!(waiting.line().await.starts_with("* OK"));
    waiting.send(b"a LOGIN alice@example.test wrong\r\n").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let app = proxy.app.clone();
    let started = tokio::time::Instant::now();
    let done = tokio::spawn(async move { app.shutdown().await });
    assert_eq!(waiting.line().await, "* BYE Server shutting down.\r\n");
    assert!(waiting.closed().await);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    tokio::time::timeout(std::time::Duration::from_secs(5), done).await.unwrap().unwrap();
}

/// Each session keeps the grace of the config it was accepted under; shutdown waits for the
/// longest of them, not just the current config's (a reload that lowered it used to let the
/// process end, and cut off a session that still had grace left, without its goodbye; case 80).
#[tokio::test]
async fn shutdown_waits_out_the_grace_of_sessions_from_before_a_reload() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let proxy = Proxy::start(&plain_config(backend.addr, "shutdown_grace = \"3s\""), USERS).await;
    let mut relayed = login(proxy.addr("plain")).await;
    write_file(&proxy.config_path(), &plain_config(backend.addr, "shutdown_grace = \"100ms\""));
    assert_eq!(proxy.app.reload(false).await.unwrap(), portcullis::app::Reloaded::Applied);
    let app = proxy.app.clone();
    let started = tokio::time::Instant::now();
    let done = tokio::spawn(async move { app.shutdown().await });
    // The old session works on through its own 3 s, then hears the goodbye, and only then
    // does shutdown finish.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    still_works(&mut relayed, "r").await;
    assert!(!done.is_finished(), "shutdown returned after {:?}", started.elapsed());
    assert_eq!(relayed.line().await, "* BYE Server shutting down.\r\n");
    tokio::time::timeout(std::time::Duration::from_secs(3), done).await.unwrap().unwrap();
}

/// A reload that changes `[acme]` restarts the ACME manager on the same HTTP-01 port: the old
/// responder lets go of it before the new one binds (before, the bind failed and ACME stayed
/// off until a restart).
#[tokio::test]
async fn a_reload_that_changes_acme_keeps_the_responder() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let acme = |contact: &str| {
        format!(
            "{}\n[acme]\ndirectory = \"https://127.0.0.1:1/dir\"\nterms_agreed = true\ncontact = [\"mailto:{contact}\"]\nstate_dir = \"{}\"\nhttp01_bind = \"127.0.0.1:{port}\"\nretry_min = \"1h\"\n[[acme.certificate]]\nnames = [\"mail.example.test\"]\n",
            plain_config(backend.addr, ""),
            state.path().display()
        )
    };
    let answers = || async move {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return false };
        let _ =
            s.write_all(b"GET /.well-known/acme-challenge/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out.starts_with("HTTP/1.1 404")
    };
    let proxy = Proxy::start(&acme("a@example.test"), USERS).await;
    assert!(answers().await);
    write_file(&proxy.config_path(), &acme("b@example.test"));
    assert_eq!(proxy.app.reload(false).await.unwrap(), portcullis::app::Reloaded::Applied);
    assert!(answers().await, "no HTTP-01 responder after the reload");
}

/// A replaced `acme.ca_file` (the ACME server's CA, renewed) restarts ACME with it: the file is
/// watched, and its bytes count as a change of the ACME settings.
#[tokio::test]
async fn a_replaced_acme_ca_file_restarts_acme() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let state = tempfile::tempdir().unwrap();
    let ca_file = state.path().join("acme-ca.pem");
    let ca = || rcgen::generate_simple_self_signed(vec!["acme.test".to_string()]).unwrap().cert.pem();
    std::fs::write(&ca_file, ca()).unwrap();
    let config = format!(
        "{}\n[acme]\ndirectory = \"https://127.0.0.1:1/dir\"\nterms_agreed = true\nca_file = \"{}\"\nstate_dir = \"{}\"\nchallenge = \"tls-alpn-01\"\nretry_min = \"1h\"\n[[acme.certificate]]\nnames = [\"mail.example.test\"]\n",
        plain_config(backend.addr, "").replace("tls = \"none\"", "tls = \"implicit\""),
        ca_file.display(),
        state.path().join("state").display()
    );
    let proxy = Proxy::start(&config, USERS).await;
    assert!(proxy.app.runtime().config.watched_files().contains(&ca_file));
    let before = proxy.app.acme_ca_file_digest().await.expect("ACME runs");
    std::fs::write(&ca_file, ca()).unwrap();
    assert_eq!(proxy.app.reload(false).await.unwrap(), portcullis::app::Reloaded::Applied);
    let after = proxy.app.acme_ca_file_digest().await.expect("ACME runs");
    assert_ne!(before, after, "ACME still runs with the old CA file");
}

/// The HTTP-01 responder serves at most 256 connections at once (8 from one address): a flood
/// on port 80 cannot take the descriptors the mail listeners share. Others are closed at
/// accept; a freed place is served again.
#[tokio::test]
async fn the_http01_responder_has_a_connection_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}\n[acme]\ndirectory = \"https://127.0.0.1:1/dir\"\nterms_agreed = true\nstate_dir = \"{}\"\nhttp01_bind = \"127.0.0.1:{port}\"\nretry_min = \"1h\"\n[[acme.certificate]]\nnames = [\"mail.example.test\"]\n",
        plain_config(backend.addr, ""),
        state.path().display()
    );
    let _proxy = Proxy::start(&cfg, USERS).await;
    let status = |mut s: tokio::net::TcpStream| async move {
        let _ =
            s.write_all(b"GET /.well-known/acme-challenge/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(out.get(9..12).unwrap_or_default()).to_string()
    };
    // From 127.0.0.N: 32 addresses with 8 connections each.
    let connect = |n: u8| async move {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(std::net::SocketAddr::from(([127, 0, 0, n], 0))).unwrap();
        s.connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap()
    };
    let mut held = Vec::new();
    for i in 0..256 {
        held.push(connect(1 + (i / 8) as u8).await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(status(connect(100).await).await, "", "a connection over the cap was served");
    drop(held.pop());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(status(connect(100).await).await, "404");
    drop(held);
}

/// A reload whose ACME settings cannot start (the HTTP-01 port taken) applies the rest but says
/// so, and is tried again by the next reload even though no file changed; once the port is
/// free, ACME runs.
#[tokio::test]
async fn a_reload_whose_acme_cannot_start_says_so_and_is_retried() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let (port, pa) = (free_port(), free_port());
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&plain_config(backend.addr, ""), USERS).await;
    let taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let with_acme = format!(
        "{}\n[acme]\ndirectory = \"https://127.0.0.1:1/dir\"\nterms_agreed = true\nstate_dir = \"{}\"\nhttp01_bind = \"127.0.0.1:{port}\"\nretry_min = \"1h\"\n[[acme.certificate]]\nnames = [\"mail.example.test\"]\n",
        config(backend.addr, &[("a", pa)]),
        state.path().display()
    );
    write_file(&proxy.config_path(), &with_acme);
    let reloaded = proxy.app.reload(false).await.unwrap();
    assert!(matches!(reloaded, portcullis::app::Reloaded::AcmeFailed(_)), "{reloaded:?}");
    // The rest of the config runs.
    login(std::net::SocketAddr::from(([127, 0, 0, 1], pa))).await;
    let again = proxy.app.reload(false).await.unwrap();
    assert!(matches!(again, portcullis::app::Reloaded::AcmeFailed(_)), "not retried: {again:?}");
    drop(taken);
    assert_eq!(proxy.app.reload(false).await.unwrap(), portcullis::app::Reloaded::Applied);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "no HTTP-01 responder");
}

/// After shutdown has begun, a reload (say from the file watcher) binds nothing again.
#[tokio::test]
async fn no_reload_after_shutdown() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let (pa, pb) = (free_port(), free_port());
    let proxy = Proxy::start(&config(backend.addr, &[("a", pa)]), USERS).await;
    proxy.app.shutdown().await;
    // The accept loops let go of their sockets as they see the cancellation.
    let closed = || async {
        for _ in 0..100 {
            if refused(pa) && refused(pb) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    };
    assert!(closed().await);
    write_file(&proxy.config_path(), &config(backend.addr, &[("a", pa), ("b", pb)]));
    assert_eq!(proxy.app.reload(true).await.unwrap(), portcullis::app::Reloaded::Unchanged);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(refused(pa) && refused(pb));
}

async fn logs_in(addr: std::net::SocketAddr, password: &str) -> bool {
    let mut c = Client::connect(addr).await;
    c.line().await;
    c.send(format!("a LOGIN alice@example.test {password}\r\n").as_bytes()).await;
    c.until_tagged("a").await.last().is_some_and(|l| l.starts_with("a OK"))
}

async fn eventually_logs_in(addr: std::net::SocketAddr, password: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !logs_in(addr, password).await {
        assert!(tokio::time::Instant::now() < deadline, "{what} not picked up");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// alice's users-file line with `password`.
fn alice_with(password: &str) -> String {
    format!("alice@example.test:{{PLAIN}}{password}\n")
}

/// A proxy whose config lives in `d/conf` and reads its users file from `d/users_file` (a
/// directory other than the config's), with the watcher running; the app and its listener.
async fn watched_proxy(
    backend: std::net::SocketAddr,
    d: &std::path::Path,
    users_file: &str,
) -> (std::sync::Arc<portcullis::app::App>, std::net::SocketAddr) {
    portcullis::tls::init_crypto();
    std::fs::create_dir(d.join("conf")).unwrap();
    let cfg = plain_config(backend, "")
        .replace("passwd_file = \"users\"", &format!("passwd_file = \"{}/{users_file}\"", d.display()));
    std::fs::write(d.join("conf/portcullis.toml"), cfg).unwrap();
    let app = portcullis::app::App::start(&d.join("conf/portcullis.toml")).await.unwrap();
    portcullis::config::watch::spawn(app.clone(), hangup());
    let addr = app.local_addrs("plain")[0];
    (app, addr)
}

/// A reload that failed because another process held a port it binds is tried again on a
/// timer (10 s, then doubling): the port may be let go without any file changing.
#[tokio::test]
async fn a_reload_that_could_not_bind_is_tried_again() {
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("users"), alice_with("pw")).unwrap();
    let (app, _addr) = watched_proxy(backend.addr, d, "users").await;
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let path = d.join("conf/portcullis.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    write_file(
        &path,
        &format!(
            "{text}\n[[listener]]\nname = \"late\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"imap\"\ntls = \"none\"\nallow_plaintext_auth = true\n"
        ),
    );
    // The watcher's reload (a moment after the file event) fails on the held port.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(app.runtime().config.listener("late").is_none());
    drop(held);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..150 {
        if app.runtime().config.listener("late").is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(app.runtime().config.listener("late").is_some(), "not tried again within 15 s");
    assert!(logs_in(addr, "pw").await);
}

#[tokio::test]
async fn a_replaced_or_recreated_directory_is_watched_again() {
    // The users file lives outside the config file's directory, in a directory that a deploy
    // tool replaces by renaming a new one into place; the watch must follow the path, not the
    // old inode.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let users = alice_with;
    std::fs::create_dir(d.join("secrets")).unwrap();
    std::fs::write(d.join("secrets/users"), users("first")).unwrap();
    let (_app, addr) = watched_proxy(backend.addr, d, "secrets/users").await;
    assert!(logs_in(addr, "first").await);

    // Replaced: a new directory renamed over the path.
    std::fs::create_dir(d.join("secrets.new")).unwrap();
    std::fs::write(d.join("secrets.new/users"), users("second")).unwrap();
    std::fs::rename(d.join("secrets"), d.join("secrets.old")).unwrap();
    std::fs::rename(d.join("secrets.new"), d.join("secrets")).unwrap();
    eventually_logs_in(addr, "second", "replaced directory").await;
    // An edit inside the new directory is seen (the watch is on the new inode).
    write_file(&d.join("secrets/users"), &users("third"));
    eventually_logs_in(addr, "third", "edit inside the replaced directory").await;

    // Gone for a while, then back: looked for again on a timer.
    std::fs::rename(d.join("secrets"), d.join("secrets.gone")).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert!(logs_in(addr, "third").await, "the running config stays while the directory is gone");
    std::fs::create_dir(d.join("secrets.v4")).unwrap();
    std::fs::write(d.join("secrets.v4/users"), users("fourth")).unwrap();
    std::fs::rename(d.join("secrets.v4"), d.join("secrets")).unwrap();
    eventually_logs_in(addr, "fourth", "recreated directory").await;
    write_file(&d.join("secrets/users"), &users("fifth"));
    eventually_logs_in(addr, "fifth", "edit inside the recreated directory").await;
}

#[tokio::test]
async fn a_switched_release_symlink_is_noticed() {
    // A deploy that keeps releases side by side and switches `current` to the new one: the old
    // release is not touched, so no event reaches the watch on it.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let users = alice_with;
    for (release, password) in [("r1", "first"), ("r2", "second")] {
        std::fs::create_dir_all(d.join("releases").join(release)).unwrap();
        std::fs::write(d.join("releases").join(release).join("users"), users(password)).unwrap();
    }
    std::os::unix::fs::symlink("releases/r1", d.join("current")).unwrap();
    let (_app, addr) = watched_proxy(backend.addr, d, "current/users").await;
    assert!(logs_in(addr, "first").await);

    std::os::unix::fs::symlink("releases/r2", d.join("current.new")).unwrap();
    std::fs::rename(d.join("current.new"), d.join("current")).unwrap();
    eventually_logs_in(addr, "second", "switched symlink").await;
    write_file(&d.join("current/users"), &users("third"));
    eventually_logs_in(addr, "third", "edit inside the new release").await;
}

#[tokio::test]
async fn a_renewal_behind_a_chain_of_symlinks_is_noticed() {
    // certbot's layout: the configured path links to live/NAME/..., which links into
    // archive/NAME/. A renewal writes a new file in archive/ and switches the link in live/;
    // neither directory is the configured path's own.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["etc", "live", "archive"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    std::fs::write(d.join("archive/users1"), alice_with("first")).unwrap();
    std::os::unix::fs::symlink("../archive/users1", d.join("live/users")).unwrap();
    std::os::unix::fs::symlink(d.join("live/users"), d.join("etc/users")).unwrap();
    let (_app, addr) = watched_proxy(backend.addr, d, "etc/users").await;
    assert!(logs_in(addr, "first").await);

    std::fs::write(d.join("archive/users2"), alice_with("second")).unwrap();
    std::os::unix::fs::symlink("../archive/users2", d.join("live/users.new")).unwrap();
    std::fs::rename(d.join("live/users.new"), d.join("live/users")).unwrap();
    eventually_logs_in(addr, "second", "a link switched two links away").await;
}

#[tokio::test]
async fn a_directory_named_only_by_a_config_that_failed_is_looked_at_again() {
    // The new config names a users file in a directory that does not exist yet, so its reload
    // fails and no watch can cover that directory; creating the file must still be picked up.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("secrets")).unwrap();
    std::fs::write(d.join("secrets/users"), alice_with("first")).unwrap();
    let (app, addr) = watched_proxy(backend.addr, d, "secrets/users").await;
    let cfg_path = d.join("conf/portcullis.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap().replace("secrets/users", "later/users");
    write_file(&cfg_path, &cfg);
    // Time for the event, the failed reload and a few of the watcher's checks.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert!(logs_in(addr, "first").await, "the running config stays");
    std::fs::create_dir(d.join("later")).unwrap();
    std::fs::write(d.join("later/users"), alice_with("second")).unwrap();
    eventually_logs_in(addr, "second", "users file in a directory only the failed config named").await;
    drop(app);
}

/// Kills the spawned proxy (by its own handle) when the test ends, pass or fail.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_relative_config_path_follows_its_replaced_directory() {
    // `portcullis run -c portcullis.toml` started inside /etc/portcullis, which a deploy then
    // replaces by renaming a new one into place: reloads must read the new directory's files,
    // not the old one the process's working directory still points at.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let cfg = plain_config(backend.addr, "").replace("bind = \"127.0.0.1:0\"", &format!("bind = \"127.0.0.1:{port}\""));
    std::fs::create_dir(d.join("conf")).unwrap();
    std::fs::write(d.join("conf/portcullis.toml"), &cfg).unwrap();
    std::fs::write(d.join("conf/users"), alice_with("first")).unwrap();
    let _proxy = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "-c", "portcullis.toml"])
            .current_dir(d.join("conf"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while refused(port) {
        assert!(tokio::time::Instant::now() < deadline, "the proxy did not start");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(logs_in(addr, "first").await);

    std::fs::create_dir(d.join("conf.new")).unwrap();
    std::fs::write(d.join("conf.new/portcullis.toml"), &cfg).unwrap();
    std::fs::write(d.join("conf.new/users"), alice_with("second")).unwrap();
    std::fs::rename(d.join("conf"), d.join("conf.old")).unwrap();
    std::fs::rename(d.join("conf.new"), d.join("conf")).unwrap();
    eventually_logs_in(addr, "second", "replaced config directory").await;
}

#[tokio::test]
async fn a_port_moved_to_the_wildcard_address_asks_for_a_restart() {
    // 127.0.0.1:P to 0.0.0.0:P (and the admin port likewise): the new socket cannot be bound
    // while the old one listens, and the old one is let go only once the reload has bound
    // everything. The error says it is the proxy's own socket, and the running config stays.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let (port, admin) = (free_port(), free_port());
    let with = |host: &str, admin_host: &str| {
        plain_config(backend.addr, "")
            .replace("bind = \"127.0.0.1:0\"", &format!("bind = \"{host}:{port}\""))
            .replace("[limits]", &format!("[admin]\nbind = \"{admin_host}:{admin}\"\n\n[limits]"))
    };
    let proxy = Proxy::start(&with("127.0.0.1", "127.0.0.1"), USERS).await;
    for (host, admin_host, what) in [("0.0.0.0", "127.0.0.1", "listener"), ("127.0.0.1", "0.0.0.0", "admin")] {
        write_file(&proxy.config_path(), &with(host, admin_host));
        let e = proxy.app.reload(false).await.unwrap_err().to_string();
        assert!(e.contains("held by this proxy's own socket") && e.contains("restart"), "{what}: {e}");
        let mut c = Client::connect(([127, 0, 0, 1], port).into()).await;
        assert!(c.line().await.starts_with("* OK"), "{what}: the running listener stays");
    }
    // A port moved from the admin server to a listener, and one from a listener to the admin
    // server: held by the proxy's own other socket, the same address.
    let swapped = plain_config(backend.addr, "")
        .replace("bind = \"127.0.0.1:0\"", &format!("bind = \"127.0.0.1:{admin}\""))
        .replace("[limits]", &format!("[admin]\nbind = \"127.0.0.1:{port}\"\n\n[limits]"));
    write_file(&proxy.config_path(), &swapped);
    let e = proxy.app.reload(false).await.unwrap_err().to_string();
    assert!(e.contains("held by this proxy's own socket") && e.contains("restart"), "swapped: {e}");
}

#[tokio::test]
async fn a_reload_that_adds_or_removes_the_ipv4_half_of_a_wildcard_pair_asks_for_a_restart() {
    // `[::]:P` beside `0.0.0.0:P` is bound IPv6-only, alone dual-stack; a listening socket
    // cannot change that, so such a reload fails (the running config stays) rather than leave
    // IPv4 clients refused.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let with = |bind: &str| plain_config(backend.addr, "").replace("bind = \"127.0.0.1:0\"", &format!("bind = {bind}"));
    let pair = |port: u16| with(&format!("[\"0.0.0.0:{port}\", \"[::]:{port}\"]"));
    let alone = |port: u16| with(&format!("\"[::]:{port}\""));
    let port = free_port();
    let proxy = Proxy::start(&pair(port), USERS).await;
    write_file(&proxy.config_path(), &alone(port));
    let e = proxy.app.reload(false).await.unwrap_err().to_string();
    assert!(e.contains("restart"), "{e}");
    assert_eq!(proxy.app.local_addrs("plain").len(), 2, "the running config stays");
    let port = free_port();
    let proxy = Proxy::start(&alone(port), USERS).await;
    let mut c = Client::connect(([127, 0, 0, 1], port).into()).await;
    assert!(c.line().await.starts_with("* OK"), "alone, [::] takes IPv4 too");
    write_file(&proxy.config_path(), &pair(port));
    let e = proxy.app.reload(false).await.unwrap_err().to_string();
    assert!(e.contains("restart"), "{e}");
}

#[tokio::test]
async fn sessions_on_a_backend_a_reload_removed_are_shown_under_its_name() {
    // Removing a backend from the config is a way to take it out: its sessions go on, and the
    // operator watches them end under its own name, not the auth service's `dynamic` label.
    let backend = FakeBackend::start(Behaviour::Normal).await;
    let pa = free_port();
    let cfg = config(backend.addr, &[("a", pa)]);
    let proxy = Proxy::start(&cfg, USERS).await;
    let mut c = login(([127, 0, 0, 1], pa).into()).await;
    let renamed =
        cfg.replace("name = \"fake\"", "name = \"renamed\"").replace("default = \"fake\"", "default = \"renamed\"");
    write_file(&proxy.config_path(), &renamed);
    proxy.app.reload(false).await.unwrap();
    let page = String::from_utf8(proxy.app.render_metrics().1).unwrap();
    assert!(page.contains("portcullis_backend_sessions{backend=\"fake\"} 1"), "{page}");
    assert!(!page.contains("portcullis_backend_sessions{backend=\"dynamic\"}"), "{page}");
    still_works(&mut c, "b").await;
}
