//! One client connection, start to end: [implicit TLS] → front end (STARTTLS, pre-auth dialogue)
//! → auth → route → backend login → relay. The config snapshot taken at accept for the listener,
//! TLS and front end, the running one for each login; one access-log line at its end. Written once for all protocols: the protocol differences live
//! in `protocol::Front` and the backend login clients.
//!
//! Phases and their deadlines: TLS handshake (`tls_handshake_timeout`), everything before a
//! successful login (`login_timeout`, counted from accept, plus `preauth_idle_timeout` per
//! read), the backend login (`backend_login_timeout`), and the relay (`idle_timeout`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::Runtime;
use crate::auth::{self, Credentials, Verdict};
use crate::backend::{BackendError, ClientInfo, LoggedIn};
use crate::config::{Backend, ListenerConfig, Protocol, TlsMode};
use crate::health::{HealthTable, SessionGuard, Source};
use crate::logging;
use crate::metrics::{ActiveConnection, metrics};
use crate::protocol::smtp::ehlo::EhloCache;
use crate::protocol::smtp::guard::CommandGuard;
use crate::protocol::{CloseReason, Event, Front, FrontSettings, Goodbye, LoginFailure};
use crate::relay::{self, Transferred};
use crate::tls::client_cert::{CertCheck, ClientAuth, ClientCertFacts};
use crate::tls::{ClientStream, MaybeTls, TlsInfo};

/// Time past the login deadline in which a session still gets to say goodbye.
const LOGIN_TIMEOUT_SLACK: Duration = Duration::from_secs(1);
/// How long a relayed session that ends gets to write its goodbye and close.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything a session needs, fixed at accept (`running` follows reloads).
pub struct SessionCtx {
    /// The config the session was accepted under: its listener's settings, TLS and front end.
    pub runtime: Arc<Runtime>,
    /// The running config: a login is judged and routed by the one running when it is made
    /// (a user removed or a backend moved by a reload is so for a client greeted before it).
    pub running: Arc<arc_swap::ArcSwap<Runtime>>,
    pub listener: Arc<ListenerConfig>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The socket address the connection was accepted on (`local` may come from a PROXY header).
    pub accepted_on: SocketAddr,
    pub id: String,
    pub shutdown: CancellationToken,
    pub ehlo: Arc<EhloCache>,
    pub health: Arc<HealthTable>,
    /// How long relayed sessions may go on after shutdown starts.
    pub shutdown_grace: Duration,
    pub throttle: Arc<crate::limits::Throttle>,
    pub connections: Arc<crate::limits::Connections>,
}

/// How a session ended, for the access log.
#[derive(Debug)]
enum Outcome {
    PreAuth(&'static str),
    Relayed(&'static str),
}

struct Authenticated {
    client: ClientStream,
    backend: LoggedIn,
    /// Login reply for the client, then what the backend sent after it.
    to_client: Vec<u8>,
    user: String,
    backend_name: String,
    pipelined: Vec<u8>,
    /// Count this session against its backend's `max_sessions` and its user's
    /// `max_sessions_per_user` while it lives; taken by the backend close hold, which gives them
    /// back when the backend goes.
    slots: Option<(SessionGuard, crate::limits::UserSlot)>,
    /// The protocol's goodbye, for a shutdown that outlasts the grace period.
    goodbye: &'static [u8],
    /// For the access log: how the client logged in, and its TLS version and cipher suite.
    login: LoginFacts,
}

/// How a relayed session's client logged in (a few bytes: the session's future holds it for its
/// whole, mostly idle, life).
#[derive(Clone, Copy)]
struct LoginFacts {
    mechanism: crate::protocol::Mechanism,
    tls: Option<(rustls::ProtocolVersion, rustls::CipherSuite)>,
}

impl LoginFacts {
    fn of(stream: &ClientStream, mechanism: crate::protocol::Mechanism) -> LoginFacts {
        let tls = match stream {
            MaybeTls::Tls(t) => {
                let conn = t.get_ref().1;
                conn.protocol_version().zip(conn.negotiated_cipher_suite().map(|c| c.suite()))
            }
            MaybeTls::Plain(_) => None,
        };
        LoginFacts { mechanism, tls }
    }

    /// (mechanism, TLS version, cipher suite) as the access log shows them.
    fn fields(login: Option<LoginFacts>) -> (&'static str, &'static str, &'static str) {
        let Some(l) = login else { return ("-", "-", "-") };
        match l.tls {
            Some((version, suite)) => {
                (l.mechanism.as_str(), version.as_str().unwrap_or("other"), suite.as_str().unwrap_or("other"))
            }
            None => (l.mechanism.as_str(), "none", "none"),
        }
    }
}

pub async fn run(mut ctx: SessionCtx, mut tcp: TcpStream) {
    let start = Instant::now();
    // TCP_NODELAY and keepalive came with the socket from its listener (`app::listen`).
    let protocol = ctx.listener.protocol.as_str();
    let _active = ActiveConnection::new(protocol, &ctx.listener.name);
    // Borrowed from the snapshot (kept alive by ctx), not cloned into the session's future.
    let runtime = ctx.runtime.clone();
    let limits = &runtime.config.limits;
    if !ctx.listener.trusted_proxies.is_empty() {
        // Boxed, like every phase before the relay: the session task's future must stay small
        // for the long idle life of a relayed session.
        match Box::pin(read_proxy_header(&ctx, &mut tcp, limits.tls_handshake_timeout)).await {
            Ok((peer, local)) => {
                ctx.peer = peer;
                ctx.local = local;
            }
            Err(why) => {
                metrics().connections_rejected.with_label_values(&[protocol, &ctx.listener.name, "proxy_header"]).inc();
                tracing::info!(session = %ctx.id, peer = %ctx.peer, reason = why, "PROXY header refused");
                return;
            }
        }
    }
    // Connection caps (reliability case 57), on the real client address. Trusted networks (a
    // webmail server's, its users' sessions all from one address) have no per-address cap, and
    // are counted under their own address: not under the IPv6 prefix they share with others,
    // whose cap they would fill.
    let throttle = &ctx.runtime.config.throttle;
    let trusted = throttle.trusted.iter().any(|c| c.contains(ctx.peer.ip()));
    let client_key = if trusted { ctx.peer.ip() } else { crate::limits::ip_key(ctx.peer.ip(), throttle.ipv6_prefix) };
    let _slot = match ctx.connections.acquire(
        &ctx.listener.name,
        client_key,
        crate::limits::effective_max_connections(limits.max_connections),
        limits.max_connections_per_listener,
        if trusted { 0 } else { limits.max_connections_per_ip },
    ) {
        Ok(slot) => slot,
        Err(cap) => {
            metrics().connections_rejected.with_label_values(&[protocol, &ctx.listener.name, cap.as_str()]).inc();
            tracing::info!(session = %ctx.id, client = %ctx.peer, cap = cap.as_str(), "connection refused: too many connections");
            // A plaintext reply where the protocol starts in plaintext; an implicit-TLS port is
            // just closed (a handshake is what the cap protects).
            if ctx.listener.tls != TlsMode::Implicit {
                let goodbye = crate::protocol::goodbye(ctx.listener.protocol, Goodbye::TooManyConnections);
                Box::pin(async move {
                    let _ = tcp.write_all(goodbye).await;
                    let _ = tcp.shutdown().await;
                })
                .await;
            }
            return;
        }
    };
    // The login deadline is enforced inside (so the client hears why); this outer bound only
    // catches a phase that cannot answer, such as a TLS handshake in progress. Boxed so its
    // buffers are freed after login: the session task's own future stays small for the (long,
    // mostly idle) relay phase.
    let deadline = start + limits.login_timeout;
    // Set while a login cut off at the deadline is followed (the client told): that has a bound
    // of its own, LOGIN_TAIL.
    let following = std::sync::atomic::AtomicBool::new(false);
    let pre = {
        let mut pre = Box::pin(preauth(&ctx, tcp, deadline, &following));
        match tokio::time::timeout_at(deadline + LOGIN_TIMEOUT_SLACK, &mut pre).await {
            Ok(r) => r,
            Err(_) if following.load(std::sync::atomic::Ordering::Relaxed) => {
                let end = deadline + LOGIN_TIMEOUT_SLACK + LOGIN_TAIL;
                tokio::time::timeout_at(end, pre).await.unwrap_or(Err(Outcome::PreAuth("login_timeout")))
            }
            Err(_) => Err(Outcome::PreAuth("login_timeout")),
        }
    };
    let (outcome, user, backend, bytes, login) = match pre {
        Err(outcome) => (outcome, None, None, Transferred::default(), None),
        Ok(mut a) => {
            // Reliability case 80: after the grace period, a relayed session is closed with the
            // protocol's goodbye; so is one that reaches max_session_duration.
            let deadlines = relay::Deadlines {
                idle: limits.idle_timeout,
                max_end: limits.max_session_duration.map(|d| start + d),
                shutdown: Some((ctx.shutdown.clone(), ctx.shutdown_grace)),
                backend_close_hold: (!limits.backend_disconnect_spread.is_zero())
                    .then(|| a.slots.take())
                    .flatten()
                    .map(|(guard, user)| guard.close_hold(limits.backend_disconnect_spread, user)),
            };
            // XCLIENT and XFORWARD are the proxy's to send (reliability case 50, after login), and
            // a STARTTLS to the backend would hide what follows from the guard.
            let guard = (ctx.listener.protocol == Protocol::Smtp).then(CommandGuard::default);
            // The config the session was accepted under is not the relay's: let it go, or a
            // session that lasts days would keep every config it outlived (a users database
            // each, an auth cache) in memory.
            drop(runtime);
            drop(ctx.runtime);
            let (end, bytes) = relay_session(&mut a, ctx.listener.protocol, deadlines, guard).await;
            let goodbye = match end {
                // Not inside a reply the client is still reading (it would become part of a
                // literal): then the connection just closes.
                "shutdown" | "max_duration" if bytes.mid_reply => None,
                "shutdown" => Some(a.goodbye),
                "max_duration" => Some(crate::protocol::goodbye(ctx.listener.protocol, Goodbye::MaxDuration)),
                "idle_timeout" if !bytes.mid_reply => {
                    Some(crate::protocol::goodbye(ctx.listener.protocol, Goodbye::Idle))
                }
                "refused_command" => {
                    tracing::warn!(session = %ctx.id, client = %ctx.peer, user = %logging::safe_user(Some(&a.user)),
                        "client sent XCLIENT, XFORWARD, BDAT or STARTTLS after login (or a line the guard could not tell from one); session closed");
                    (!bytes.mid_reply).then(|| crate::protocol::goodbye(ctx.listener.protocol, Goodbye::RefusedCommand))
                }
                _ => None,
            };
            // Briefly: a client that has stopped reading must not hold the session (and its
            // backend connection and slots) open past its end. Without a goodbye the client's
            // side is still closed properly (TLS close_notify) after what the backend sent,
            // unless the relay did (an ordinary close), the client is what failed, or the
            // client is part-way through a reply: that one is cut off, and a clean TLS close
            // would hide the truncation from it.
            if goodbye.is_some() || !(bytes.mid_reply || matches!(end, "closed" | "client_error")) {
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
                    if let Some(goodbye) = goodbye {
                        let _ = a.client.write_all(goodbye).await;
                    }
                    let _ = a.client.shutdown().await;
                })
                .await;
            }
            (Outcome::Relayed(end), Some(a.user), Some(a.backend_name), bytes, Some(a.login))
        }
    };
    let (phase, result) = match outcome {
        Outcome::PreAuth(r) => ("preauth", r),
        Outcome::Relayed(r) => ("relay", r),
    };
    metrics().session_duration.with_label_values(&[protocol, phase]).observe(start.elapsed().as_secs_f64());
    let (mechanism, tls_version, tls_cipher) = LoginFacts::fields(login);
    tracing::info!(
        target: "portcullis::access",
        session = %ctx.id,
        listener = %ctx.listener.name,
        protocol,
        client = %ctx.peer,
        user = %logging::safe_user(user.as_deref()),
        backend = backend.as_deref().unwrap_or("-"),
        phase,
        result,
        mechanism,
        tls_version,
        tls_cipher,
        bytes_in = bytes.client_to_backend,
        bytes_out = bytes.backend_to_client,
        duration_ms = start.elapsed().as_millis() as u64,
        "session end"
    );
}

/// Read a PROXY v1/v2 header from a trusted load balancer (reliability case 53); anything
/// malformed, untrusted or late closes. Only the header's own bytes are taken off the socket,
/// so what follows it (a ClientHello) is left for the next stage: each read is peeked first,
/// and taken only as far as the parser says it belongs to the header. While the header is
/// incomplete, every byte seen is the header's (a v1 line ends at its CRLF, a v2 header at its
/// length), so those are taken too and the next peek waits for more (no polling).
async fn read_proxy_header(
    ctx: &SessionCtx,
    tcp: &mut TcpStream,
    timeout: Duration,
) -> Result<(SocketAddr, SocketAddr), &'static str> {
    use tokio::io::AsyncReadExt;
    if !ctx.listener.trusted_proxies.iter().any(|c| c.contains(ctx.peer.ip())) {
        return Err("untrusted peer");
    }
    let deadline = Instant::now() + timeout;
    // A v1 header fits in 107 bytes and a v2 header without TLVs in 232; one with TLVs (a
    // balancer's unique ID, TLS facts) can be up to 16 + 65,535, which the parser bounds.
    let mut chunk = [0u8; 536];
    let mut header = Vec::new();
    loop {
        let n =
            tokio::time::timeout_at(deadline, tcp.peek(&mut chunk)).await.map_err(|_| "timeout")?.map_err(|_| "io")?;
        if n == 0 {
            return Err("closed");
        }
        let taken = header.len();
        header.extend_from_slice(&chunk[..n]);
        let take = match proxy_header::ProxyHeader::parse(&header, proxy_header::ParseConfig::default()) {
            Ok((parsed, len)) => {
                if !header_checks_out(&parsed) {
                    return Err("malformed");
                }
                // LOCAL/UNKNOWN: the connection is the balancer's own; keep the peer address.
                let (peer, local) =
                    parsed.proxied_address().map_or((ctx.peer, ctx.local), |a| (a.source, a.destination));
                // `peek` saw these bytes, so this read returns at once. (An incomplete header
                // never holds a complete one, so `len` is past what was taken.)
                let rest = len.checked_sub(taken).ok_or("malformed")?;
                tcp.read_exact(&mut chunk[..rest]).await.map_err(|_| "io")?;
                return Ok(crate::app::canonical_pair(peer, local));
            }
            Err(proxy_header::Error::BufferTooShort) => n,
            Err(_) => return Err("malformed"),
        };
        tcp.read_exact(&mut chunk[..take]).await.map_err(|_| "io")?;
    }
}

/// What the parser leaves unchecked in a v2 header (reliability case 53, after HAProxy's
/// validation): every TLV within the header and well formed, the SSL TLV's own TLVs included; no
/// NUL inside a text value; and a stream (TCP) address, not a datagram one.
fn header_checks_out(header: &proxy_header::ProxyHeader<'_>) -> bool {
    use proxy_header::Tlv;
    fn sound(tlv: &Tlv<'_>) -> bool {
        match tlv {
            Tlv::Authority(t)
            | Tlv::SslVersion(t)
            | Tlv::SslCn(t)
            | Tlv::SslCipher(t)
            | Tlv::SslSigAlg(t)
            | Tlv::SslKeyAlg(t)
            | Tlv::Netns(t) => !t.contains('\0'),
            Tlv::Ssl(ssl) => ssl.tlvs().all(|t| t.is_ok_and(|t| sound(&t))),
            _ => true,
        }
    }
    header.proxied_address().is_none_or(|a| a.protocol == proxy_header::Protocol::Stream)
        && header.tlvs().all(|t| t.is_ok_and(|t| sound(&t)))
}

async fn relay_session(
    a: &mut Authenticated,
    spoken: Protocol,
    deadlines: relay::Deadlines,
    mut guard: Option<CommandGuard>,
) -> (&'static str, Transferred) {
    let protocol = spoken.as_str();
    // The login reply goes to the client, and what it pipelined after its login command to the
    // backend, inside the relay: bounded by its deadlines (a client that reads nothing, a
    // shutdown) and counted like the rest.
    let to_client = std::mem::take(&mut a.to_client);
    let to_backend = std::mem::take(&mut a.pipelined);
    // What the client pipelined is checked like the rest of its stream. Refused there, the
    // client still gets its login reply, briefly (like a goodbye), and the session ends; nothing
    // it pipelined goes to the backend, as no reply to it would reach the client.
    if guard.as_mut().and_then(|g| g.scan(&to_backend)).is_some() {
        let written = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            a.client.write_all(&to_client).await?;
            a.client.flush().await
        })
        .await;
        // Counted like relayed bytes; a reply cut off part-way gets no goodbye after it.
        let whole = matches!(written, Ok(Ok(())));
        let sent = if whole { to_client.len() as u64 } else { 0 };
        metrics().relayed_bytes.with_label_values(&[protocol, "backend_to_client"]).inc_by(sent);
        let t = Transferred { backend_to_client: sent, mid_reply: !whole, ..Transferred::default() };
        return (relay::RelayEnd::Refused.as_str(), t);
    }
    let start = relay::Start { to_client, to_backend, protocol: Some(spoken) };
    // Bytes reach relayed_bytes_total as they move, so long sessions (IDLE, big FETCHes) show
    // in throughput graphs while they last rather than all at once when they end.
    let relayed = &metrics().relayed_bytes;
    let meters = relay::Meters {
        client_to_backend: Some(relayed.with_label_values(&[protocol, "client_to_backend"])),
        backend_to_client: Some(relayed.with_label_values(&[protocol, "backend_to_client"])),
    };
    let (end, t) = relay::relay_from(&mut a.client, &mut a.backend.stream, deadlines, meters, guard, start).await;
    (end.as_str(), t)
}

/// The front end's settings for this connection; `client_cert` is what the TLS handshake's
/// certificate check accepted, if the listener asks for one.
fn front_settings(ctx: &SessionCtx, tls_active: bool, client_cert: Option<&ClientCertFacts>) -> FrontSettings {
    let config = &ctx.runtime.config;
    let lc = &ctx.listener;
    // Honest EHLO: what every SMTP backend announces, as the client may be routed to any of them
    // (the user is not known before AUTH).
    let extensions = match lc.protocol {
        Protocol::Smtp => {
            ctx.ehlo.common(config.backends.values().filter(|b| b.protocol == Protocol::Smtp).map(|b| b.name.as_str()))
        }
        _ => Arc::from(Vec::new()),
    };
    FrontSettings {
        tls_active,
        starttls_offered: lc.tls == TlsMode::StartTls,
        auth_allowed: tls_active || lc.allow_plaintext_auth,
        // Only the auth service can say what a certificate is worth.
        external: tls_active && ctx.runtime.auth_http.is_some() && client_cert.is_some_and(|c| c.cert.is_some()),
        max_line: config.limits.max_line_length,
        max_errors: config.limits.max_errors,
        idle_timeout: config.limits.preauth_idle_timeout,
        command_timeout: config.limits.command_timeout,
        hostname: config.hostname.clone(),
        extensions,
        greeting_delay: config.limits.smtp_greeting_delay,
    }
}

async fn preauth(
    ctx: &SessionCtx,
    tcp: TcpStream,
    deadline: Instant,
    following: &std::sync::atomic::AtomicBool,
) -> Result<Authenticated, Outcome> {
    let rt = &ctx.runtime;
    let limits = &rt.config.limits;
    let lc = &ctx.listener;
    let mut greeted = false;
    // With implicit TLS the first front end is made before the handshake: its greeting goes with
    // the handshake (one write and one client round trip less), and it serves the session after.
    // Not where the listener wants a client certificate: nothing is sent before it is checked,
    // and the front end, made after, knows whether it may offer SASL EXTERNAL.
    let mut first_front = None;
    let mut client_cert = None;
    // Looked up once per connection; None on listeners without verify_client.
    let client_auth = rt.client_auth.get(&lc.name);
    let mut stream: ClientStream = match lc.tls {
        TlsMode::Implicit if client_auth.is_some() => {
            let (tls, cert) = tls_accept(ctx, tcp, None, client_auth).await?;
            client_cert = cert;
            MaybeTls::Tls(Box::new(tls))
        }
        TlsMode::Implicit => {
            let front = Front::new(lc.protocol, front_settings(ctx, true, None));
            let early = front.immediate_greeting();
            greeted = early.is_some();
            first_front = Some(front);
            MaybeTls::Tls(Box::new(tls_accept(ctx, tcp, early, None).await?.0))
        }
        TlsMode::StartTls | TlsMode::None => MaybeTls::Plain(tcp),
    };
    let mut failures = 0u32;
    // Login requests on this connection, whatever became of them: the service's
    // Auth-Login-Attempt (nginx counts every attempt; `failures` leaves out outages and
    // temporary refusals, which would send the same number twice).
    let mut attempts = 0u32;
    // Protocol errors before a STARTTLS count after it too (reliability case 54).
    let mut errors = 0u32;
    loop {
        let mut front = first_front
            .take()
            .unwrap_or_else(|| Front::new(lc.protocol, front_settings(ctx, stream.is_tls(), client_cert.as_ref())));
        front.carry_errors(errors);
        if !greeted {
            let early = front.greet(&mut stream).await.map_err(|_| Outcome::PreAuth("client_error"))?;
            if let Some(reason) = early {
                let _ = stream.shutdown().await;
                return Err(Outcome::PreAuth(reason.as_str()));
            }
            greeted = true;
        }
        loop {
            let event = tokio::select! {
                e = front.next_event(&mut stream) => e.map_err(|_| Outcome::PreAuth("client_error"))?,
                // Reliability case 80: tell clients still logging in why they are dropped.
                _ = ctx.shutdown.cancelled() => {
                    return Err(close(&mut stream, &front, Goodbye::Shutdown, "shutdown").await)
                }
                // Reliability case 58: activity does not extend the login deadline.
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(close(&mut stream, &front, Goodbye::LoginTimeout, "login_timeout").await)
                }
            };
            let req = match event {
                Event::Closed(reason) => {
                    let _ = stream.shutdown().await;
                    return Err(Outcome::PreAuth(reason.as_str()));
                }
                Event::StartTls => {
                    errors = front.errors();
                    break;
                }
                Event::Login(req) => req,
            };
            // Never past the deadline: the failure delay and an Auth-Wait end at it (the next
            // turn of the loop then says goodbye).
            let fail_at = (Instant::now() + limits.auth_failure_delay).min(deadline);
            let attempt = match req.credentials {
                None => Err(LoginError::Bad { user: None, reason: "malformed" }),
                Some(creds) => {
                    // The login itself (auth service, backends one after another) is bounded
                    // by the deadline and shutdown too, and the client hears which.
                    let tls = tls_info(&stream, &client_cert);
                    attempts += 1;
                    let judging = std::sync::atomic::AtomicBool::new(false);
                    let attempt = login(ctx, &front, req.mechanism, creds, attempts, tls, &judging);
                    tokio::pin!(attempt);
                    tokio::select! {
                        a = &mut attempt => a,
                        _ = ctx.shutdown.cancelled() => {
                            return Err(close(&mut stream, &front, Goodbye::Shutdown, "shutdown").await)
                        }
                        _ = tokio::time::sleep_until(deadline) => {
                            // Cut off while under way (a throttle penalty, the users file, the
                            // auth service or the backends): the slowest attempts, which would
                            // otherwise be in no count.
                            count_login(lc, req.mechanism, "timeout");
                            let end = close(&mut stream, &front, Goodbye::LoginTimeout, "login_timeout").await;
                            // The client is told now, but a guess under way still counts: a judge
                            // that answers a wrong password later than a right one (Dovecot's
                            // auth_failure_delay, behind `source = "backend"` or a routing-only
                            // auth service) would otherwise let guesses timed to end past the
                            // deadline go unthrottled and unlogged. Its own timeouts bound it;
                            // so does LOGIN_TAIL, and shutdown. Not one still waiting out a
                            // throttle penalty: nothing was judged, and nothing will be.
                            if !judging.load(std::sync::atomic::Ordering::Relaxed) {
                                return Err(end);
                            }
                            following.store(true, std::sync::atomic::Ordering::Relaxed);
                            let tail = tokio::select! {
                                r = tokio::time::timeout(LOGIN_TAIL, &mut attempt) => r.ok(),
                                _ = ctx.shutdown.cancelled() => None,
                            };
                            let guess = match tail {
                                Some(Err(LoginError::Bad { user, reason })) => Some((user, reason)),
                                Some(Err(LoginError::Denied { user, .. })) => Some((user, "denied")),
                                _ => None,
                            };
                            if let Some((user, reason)) = guess {
                                logging::login_failed(ctx.peer.ip(), user.as_deref(), lc.protocol.as_str(), &lc.name, reason);
                            }
                            return Err(end);
                        }
                    }
                }
            };
            let (mut logged_in, user, backend_name, guard, user_slot) = match attempt {
                Ok(logged_in) => logged_in,
                Err(e) => {
                    // What to answer; whether it counts toward max_auth_attempts; until when to
                    // wait first; whether it ends the connection whatever the count.
                    // The fail2ban line, for the refusals that are the client's own doing.
                    let login_failed = |user: Option<&str>, reason: &str| {
                        logging::login_failed(ctx.peer.ip(), user, lc.protocol.as_str(), &lc.name, reason)
                    };
                    let (failure, counted, until, closes) = match e {
                        LoginError::Unavailable(why) => {
                            count_login(lc, req.mechanism, why);
                            // Not the user's failure (not counted, not throttled), but paced
                            // like one: a client looping on LOGIN during an outage would
                            // otherwise send the auth service or the backends a request per
                            // round trip for the whole login window (reliability cases 54, 61).
                            (LoginFailure::Unavailable, false, Some(fail_at), false)
                        }
                        LoginError::InUse => {
                            count_login(lc, req.mechanism, "mailbox_in_use");
                            // Not the user's credentials (not logged for fail2ban, not
                            // throttled), but each try costs a backend login: paced and counted.
                            (LoginFailure::InUse, true, Some(fail_at), false)
                        }
                        LoginError::Bad { user, reason } => {
                            count_login(lc, req.mechanism, "bad_credentials");
                            login_failed(user.as_deref(), reason);
                            (LoginFailure::BadCredentials, true, Some(fail_at), false)
                        }
                        LoginError::BackendRejected { user } => {
                            count_login(lc, req.mechanism, "backend_rejected");
                            tracing::error!(session = %ctx.id, client = %ctx.peer, user = %logging::safe_user(Some(&user)),
                                "the backend refused credentials the proxy had verified (users file or auth service out of step with it, or a wrong master password?)");
                            // Answered and paced as a refusal: the user cannot log in.
                            (LoginFailure::BadCredentials, true, Some(fail_at), false)
                        }
                        LoginError::Throttled { user } => {
                            count_login(lc, req.mechanism, "throttled");
                            login_failed(user.as_deref(), "throttled");
                            // The throttle's own wait was the pace.
                            (LoginFailure::Throttled, true, None, false)
                        }
                        LoginError::ClientRefused { temporary, address } => {
                            count_login(lc, req.mechanism, "client_refused");
                            // Not the user's credentials, but each try costs a backend login.
                            let (text, code) = match (address, temporary) {
                                (false, true) => {
                                    ("The mail server cannot take your EHLO name now, try again later.", "454 4.7.0")
                                }
                                (false, false) => ("The mail server refused your EHLO name.", "550 5.7.1"),
                                (true, true) => {
                                    ("The mail server cannot take your connection now, try again later.", "454 4.7.0")
                                }
                                (true, false) => ("The mail server refused your address.", "550 5.7.1"),
                            };
                            let failure =
                                LoginFailure::Message { text: text.into(), smtp_code: Some(code.into()), temporary };
                            (failure, true, Some(fail_at), false)
                        }
                        LoginError::TooManySessions { user } => {
                            count_login(lc, req.mechanism, "too_many_sessions");
                            tracing::info!(session = %ctx.id, user = %logging::safe_user(Some(&user)), "too many sessions for user");
                            let failure = LoginFailure::Message {
                                text: "Too many sessions for this user, try again later.".into(),
                                smtp_code: Some("454 4.7.0".into()),
                                temporary: true,
                            };
                            // Each try cost a password check.
                            (failure, true, Some(fail_at), false)
                        }
                        LoginError::DeniedForNow { text, wait, code } => {
                            count_login(lc, req.mechanism, "denied_temporary");
                            // Reliability case 61: not counted, not throttled, not for fail2ban;
                            // paced like a failure (or by the service's Auth-Wait).
                            let failure = LoginFailure::Message { text, smtp_code: code, temporary: true };
                            let until = wait.map(|w| (Instant::now() + w).min(deadline)).unwrap_or(fail_at);
                            (failure, false, Some(until), false)
                        }
                        LoginError::Denied { user, text, wait, code } => {
                            count_login(lc, req.mechanism, "denied");
                            login_failed(user.as_deref(), "denied");
                            // nginx semantics: with Auth-Wait, wait and let the client retry;
                            // without, answer and close.
                            // Not temporary for a wait: nginx documents "Invalid login or
                            // password" with Auth-Wait, and a client told [UNAVAILABLE] or
                            // [SYS/TEMP] retries the same password instead of asking the user.
                            let failure = LoginFailure::Message { text, smtp_code: code, temporary: false };
                            (failure, true, wait.map(|w| (Instant::now() + w).min(deadline)), wait.is_none())
                        }
                    };
                    if counted {
                        failures += 1;
                    }
                    if let Some(until) = until {
                        // The verdict is not given early: shutdown ends the wait with a goodbye.
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => {}
                            _ = ctx.shutdown.cancelled() => {
                                return Err(close(&mut stream, &front, Goodbye::Shutdown, "shutdown").await)
                            }
                        }
                    }
                    let (count, max) = match (counted, closes) {
                        (false, _) => (0, u32::MAX),
                        (true, true) => (failures, failures),
                        (true, false) => (failures, limits.max_auth_attempts),
                    };
                    fail(&mut front, &mut stream, failure, count, max).await?;
                    continue;
                }
            };
            count_login(lc, req.mechanism, "success");
            // Taken, not cloned: nothing of the login dialogue stays in memory for the
            // (long, idle) life of the session.
            let untagged = std::mem::take(&mut logged_in.untagged);
            let reply = std::mem::take(&mut logged_in.reply);
            let mut to_client = front.success_reply(untagged, reply);
            to_client.append(&mut logged_in.leftover);
            let too_long = front.goodbye(Goodbye::LineTooLong);
            let goodbye = front.goodbye(Goodbye::Shutdown);
            let Some(pipelined) = front.into_pipelined() else {
                let _ = stream.write_all(too_long).await;
                return Err(Outcome::PreAuth(CloseReason::LineTooLong.as_str()));
            };
            // Not from a server a reload has moved the name away from meanwhile.
            if let Some(exts) = logged_in.extensions.take()
                && guard.is_current(&ctx.health, &backend_name)
            {
                ctx.ehlo.update(&backend_name, &exts, guard.dynamic());
            }
            tracing::debug!(session = %ctx.id, backend = %backend_name, mechanism = req.mechanism.as_str(), "login ok");
            let backend = logged_in;
            let login = LoginFacts::of(&stream, req.mechanism);
            return Ok(Authenticated {
                client: stream,
                backend,
                to_client,
                user,
                backend_name,
                pipelined,
                slots: Some((guard, user_slot)),
                goodbye,
                login,
            });
        }
        // STARTTLS: the front end checked that no plaintext is buffered; upgrade and start over
        // with a fresh front end (pre-TLS state is forgotten).
        let MaybeTls::Plain(tcp) = stream else {
            return Err(Outcome::PreAuth("starttls_on_tls"));
        };
        let (tls, cert) = tls_accept(ctx, tcp, None, client_auth).await?;
        client_cert = cert;
        stream = MaybeTls::Tls(Box::new(tls));
        metrics().starttls_upgrades.with_label_values(&[lc.protocol.as_str(), &lc.name]).inc();
    }
}

/// Why a login did not lead to a relayed session.
enum LoginError {
    /// Wrong or malformed credentials (counted, delayed, logged for fail2ban).
    Bad { user: Option<String>, reason: &'static str },
    /// No backend could take the session (`backend_unavailable`), or the auth service is out
    /// (`auth_service_error`): the client may retry.
    Unavailable(&'static str),
    /// The backend says another session holds the user's mailbox.
    InUse,
    /// The auth service refused with its own text (nginx `Auth-Status`), maybe with a wait.
    Denied { user: Option<String>, text: String, wait: Option<Duration>, code: Option<String> },
    /// The auth service refused with a 4xx `Auth-Error-Code` (its own trouble, "try again
    /// later"): answered with its text, but not the user's failure, as an outage is not.
    DeniedForNow { text: String, wait: Option<Duration>, code: Option<String> },
    /// Too many failures from the address or for the user (reliability cases 55, 56).
    Throttled { user: Option<String> },
    /// The user already has the most sessions allowed.
    TooManySessions { user: String },
    /// The backend refused the client's own EHLO name, for now or for good: not the user's
    /// credentials nor the backend's health.
    ClientRefused { temporary: bool, address: bool },
    /// The backend refused credentials the proxy had verified (its users file, an auth service
    /// that sent the password to use, or a master or XCLIENT login, where the client's password
    /// never reaches the backend): the two disagree (a stale users file, a wrong master password). Not a guess,
    /// so neither logged for fail2ban nor throttled, which would ban a whole office behind one
    /// address for the proxy's configuration; nor counted against the backend, since one user
    /// out of step could then mark it down for everyone.
    BackendRejected { user: String },
}

/// The connection's TLS parameters as nginx names them for `Auth-SSL-*`.
fn tls_info(stream: &ClientStream, client_cert: &Option<ClientCertFacts>) -> Option<TlsInfo> {
    let MaybeTls::Tls(t) = stream else { return None };
    let conn = t.get_ref().1;
    let version = match conn.protocol_version()? {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
        v => format!("{v:?}"),
    };
    let cipher = conn.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default();
    Some(TlsInfo { version, cipher, client_cert: client_cert.clone() })
}

/// What a login attempt tried, for the throttle (a retry of the same one counts once): the user
/// and password, or for EXTERNAL, which has none, the user it names and the certificate it came
/// with. The user is part of it so that one password tried against many users (spraying) counts
/// once per user against the address, not once in all.
fn attempt_fingerprint(mechanism: crate::protocol::Mechanism, creds: &Credentials, tls: Option<&TlsInfo>) -> u64 {
    if mechanism != crate::protocol::Mechanism::External {
        return crate::limits::password_fingerprint(&[creds.user.as_bytes(), creds.password.expose()]);
    }
    let cert = tls.and_then(|t| t.client_cert.as_ref()).and_then(|c| c.cert.as_ref());
    let fingerprint = cert.map_or("", |c| c.fingerprint.as_str());
    crate::limits::password_fingerprint(&[b"external", creds.user.as_bytes(), fingerprint.as_bytes()])
}

/// Verify, route and log in to a backend, failing over along the rendezvous order.
#[allow(clippy::type_complexity)]
/// `judging` is set once the credentials go to be judged (after the throttle's wait).
async fn login(
    ctx: &SessionCtx,
    front: &Front,
    mechanism: crate::protocol::Mechanism,
    creds: Credentials,
    attempt: u32,
    tls: Option<TlsInfo>,
    judging: &std::sync::atomic::AtomicBool,
) -> Result<(LoggedIn, String, String, SessionGuard, crate::limits::UserSlot), LoginError> {
    let rt = &ctx.running.load_full();
    let hints = front.hints();
    let throttle_user = rt.config.users.canonical(&creds.user);
    let ip = ctx.peer.ip();
    // The penalty is waited out holding no turn; then a turn among the attempts in flight from
    // this address and for this user, held while the password is checked and until the outcome
    // is counted below, and another look: guesses sent in parallel each see the failures of
    // those that went before, and wait out the penalty those brought (turn let go meanwhile).
    let s = &rt.config.throttle;
    let mut waited = Duration::ZERO;
    let mut turn = None;
    let _turn = loop {
        match ctx.throttle.check(s, ip, throttle_user.as_deref()) {
            crate::limits::Decision::Blocked => return Err(LoginError::Throttled { user: throttle_user }),
            crate::limits::Decision::Allow { delay } if delay > waited => {
                drop(turn.take());
                tracing::debug!(session = %ctx.id, delay = ?delay, "login penalty");
                tokio::time::sleep(delay - waited).await;
                waited = delay;
            }
            crate::limits::Decision::Allow { .. } => match turn.take() {
                Some(t) => break t,
                None => turn = Some(ctx.throttle.attempt(s, ip, throttle_user.as_deref()).await),
            },
        }
    };
    let fingerprint = attempt_fingerprint(mechanism, &creds, tls.as_ref());
    // Judged by the config running now: a reload during the wait above holds for this login.
    judging.store(true, std::sync::atomic::Ordering::Relaxed);
    let result = login_inner(ctx, &ctx.running.load_full(), mechanism, creds, attempt, tls, hints).await;
    match &result {
        Ok((_, user, _, _, _)) => {
            ctx.throttle.success(s, ip, user);
            // Failures were counted under the name the client gave; an auth service may have
            // answered with another (Auth-User).
            if let Some(typed) = throttle_user.as_deref().filter(|t| t != user) {
                ctx.throttle.success(s, ip, typed);
            }
        }
        // Under the name the client gave, which is what `check` looks up (an auth service's
        // Auth-User may have named another).
        Err(LoginError::Bad { user, .. } | LoginError::Denied { user, .. }) => {
            ctx.throttle.failure(s, ip, throttle_user.as_deref().or(user.as_deref()), fingerprint)
        }
        Err(_) => {}
    }
    result
}

#[allow(clippy::type_complexity)]
async fn login_inner(
    ctx: &SessionCtx,
    rt: &Runtime,
    mechanism: crate::protocol::Mechanism,
    creds: Credentials,
    attempt: u32,
    tls: Option<TlsInfo>,
    hints: crate::protocol::ClientHints,
) -> Result<(LoggedIn, String, String, SessionGuard, crate::limits::UserSlot), LoginError> {
    let Authorized { user, login_name, target, judged, creds } =
        authorize(ctx, rt, mechanism, creds, attempt, tls, hints.helo.as_deref()).await?;
    // Where the backend has yet to verify the password, the slot is taken only once it has:
    // wrong-password attempts in flight must not fill the user's cap and lock the user out. A
    // cap already full is answered before the backend is asked (no backend login for a user
    // who could not have a session anyway), so there a client without the password learns
    // that the user is at the cap; the answer is paced like a failure. A routing-only auth
    // service's OK is no check of the password either (whether a backend replays it is known
    // only per backend, so the slot waits for the login there too).
    let max_sessions = rt.config.limits.max_sessions_per_user;
    let user_slot = if matches!(judged, Judged::ByBackend | Judged::ServiceRouted) {
        if ctx.connections.user_full(&user, max_sessions) {
            return Err(LoginError::TooManySessions { user });
        }
        None
    } else {
        match ctx.connections.acquire_user(&user, max_sessions) {
            Some(slot) => Some(slot),
            None => return Err(LoginError::TooManySessions { user }),
        }
    };
    let plan = crate::route::plan(&target, ctx.listener.protocol, &user, &ctx.health);
    let info = ClientInfo {
        peer: ctx.peer,
        local: ctx.local,
        accepted_on: ctx.accepted_on,
        session_id: ctx.id.clone(),
        id_fields: hints.id_fields,
        helo: hints.helo,
        esmtp: hints.esmtp,
        probe: false,
        keepalive: rt.config.limits.tcp_keepalive(),
    };
    let login = BackendLoginOf {
        ctx,
        rt,
        info: &info,
        user: &user,
        login_name: &login_name,
        creds: &creds,
        judged,
        route: &plan.target,
    };
    // Reliability case 64: a backend that refuses the connection (RST: restarting, say) is
    // tried again every second until backend_connect_timeout has passed since the first try,
    // as Dovecot's proxy does, instead of failing the login at once; counted against its
    // health once, when the retries end. Other failures are not retried.
    let retry_until = Instant::now() + rt.config.limits.backend_connect_timeout;
    let mut candidates: Vec<&Arc<Backend>> = plan.candidates.iter().collect();
    let mut first_round = true;
    loop {
        // With whether it was up when it refused: one its checks mark down meanwhile is not
        // tried again; one already down (a pool's last resort) is, as before.
        let mut refused: Vec<(&Arc<Backend>, bool)> = Vec::new();
        for backend in candidates {
            if first_round && !target.failover() && backend.health.enabled && !ctx.health.is_up(&backend.name) {
                // The user's mailbox lives only there and it is down: fail fast. Only where active
                // checks will see it come back: a backend without them (one the auth service names
                // by address, or with checks off) is marked up again only by a session that logs in,
                // so it is always tried. Only before the first try: a login already waiting out a
                // restart goes on until its checks mark it down (`still_eligible`), not when other
                // logins' refusals of the same restart do.
                tracing::warn!(session = %ctx.id, backend = %backend.name, "backend down and its pool has no failover");
                break;
            }
            if creds.password.expose().is_empty() && backend.login == crate::config::BackendLogin::Replay {
                // SASL EXTERNAL with no Auth-Pass from the service: nothing to replay (nginx needs
                // Auth-Pass here too). A master-user or XCLIENT backend needs none.
                tracing::warn!(session = %ctx.id, backend = %backend.name, "EXTERNAL login: the auth service sent no Auth-Pass to replay");
                return Err(LoginError::Unavailable("auth_service_error"));
            }
            match login.on(backend).await {
                Tried::In(logged_in) => {
                    // Others refused while this one took the session: no restart to wait out
                    // there, they count against their health now (reliability case 65).
                    for (other, _) in &refused {
                        let other: &Backend = other;
                        ctx.health.failure(other, Source::Session, other.health.fall, "connect");
                    }
                    ctx.health.success(backend, Source::Session, backend.health.rise);
                    let guard = ctx.health.session(backend);
                    let user_slot = match user_slot {
                        Some(slot) => slot,
                        // Verified now; another session may have taken the last slot meanwhile
                        // (dropping `logged_in` closes the backend connection).
                        None => match ctx.connections.acquire_user(&user, max_sessions) {
                            Some(slot) => slot,
                            None => return Err(LoginError::TooManySessions { user }),
                        },
                    };
                    return Ok((logged_in, user, backend.name.clone(), guard, user_slot));
                }
                Tried::Over(e) => return Err(e),
                Tried::Refused => refused.push((backend, ctx.health.is_up(&backend.name))),
                Tried::Next => {}
            }
        }
        if refused.is_empty() || Instant::now() + BACKEND_RETRY > retry_until {
            for (backend, _) in refused {
                ctx.health.failure(backend, Source::Session, backend.health.fall, "connect");
                tracing::warn!(session = %ctx.id, backend = %backend.name, route = %plan.target, "backend login failed: connection refused");
            }
            break;
        }
        tokio::time::sleep(BACKEND_RETRY).await;
        first_round = false;
        // Not again: one its checks have marked down, or a reload drained or disabled, meanwhile.
        let again =
            |(b, was_up): &(&Arc<Backend>, bool)| crate::route::still_eligible(&target, b, *was_up, &ctx.health);
        candidates = refused.into_iter().filter(again).map(|(b, _)| b).collect();
    }
    Err(LoginError::Unavailable("backend_unavailable"))
}

/// Who checks the password the client gave.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Judged {
    /// The proxy did (its users file), or an auth service that answered with the password to
    /// use; or the backend never sees the client's (a master or XCLIENT login).
    Proxy,
    /// Only the backend, as `[auth] source = "backend"` says: its refusal is a wrong password.
    ByBackend,
    /// An auth service answered OK without an Auth-Pass of its own, so the client's password
    /// goes to the backend, and the service may only route (nginx and Angie document that
    /// use): a replayed login's refusal may be a guess like any other.
    ServiceRouted,
}

/// A login whose credentials have been judged (or left to the backend), and where it goes.
struct Authorized {
    /// The canonical name: routing, limits, the log.
    user: String,
    /// The name a master-user or XCLIENT login gives the backend: the one that was judged. The
    /// canonical name where the proxy judged it (a passwd-file is looked up by it); where an
    /// auth service did, the name it was asked about (as the client sent it, as nginx does) or
    /// its Auth-User. Never a name the service did not see: with a case-sensitive service,
    /// `Alice` with Alice's password must not log in to the backend as `alice`.
    login_name: String,
    target: crate::config::Target,
    judged: Judged,
    /// What the backend login sends: the client's, or the auth service's Auth-User/Auth-Pass.
    creds: Credentials,
}

/// Ask the auth service, or else the configured source, about the client's credentials.
async fn authorize(
    ctx: &SessionCtx,
    rt: &Runtime,
    mechanism: crate::protocol::Mechanism,
    creds: Credentials,
    attempt: u32,
    tls: Option<TlsInfo>,
    helo: Option<&str>,
) -> Result<Authorized, LoginError> {
    let protocol = ctx.listener.protocol;
    let Some(service) = &rt.auth_http else {
        // The front ends offer EXTERNAL only with an auth service; nothing else can judge it.
        if mechanism == crate::protocol::Mechanism::External {
            return Err(LoginError::Bad { user: None, reason: "malformed" });
        }
        let asked = Instant::now();
        let verdict = auth::authenticate(&rt.config, &creds).await;
        // A password left to the backend is checked in its login (backend_login_duration).
        if !matches!(rt.config.auth, crate::config::AuthSource::Backend) {
            metrics().auth_duration.with_label_values(&["passwd_file"]).observe(asked.elapsed().as_secs_f64());
        }
        let (user, pinned, judged) = match verdict {
            Verdict::Rejected { user } => return Err(LoginError::Bad { user, reason: "bad_credentials" }),
            Verdict::Accepted { user, backends } => (user, backends, Judged::Proxy),
            Verdict::Deferred { user } => (user, Vec::new(), Judged::ByBackend),
        };
        let Some(target) = crate::route::target(&rt.config, protocol, &user, &pinned) else {
            tracing::warn!(session = %ctx.id, user = %logging::safe_user(Some(&user)), "no route for user");
            return Err(LoginError::Unavailable("backend_unavailable"));
        };
        return Ok(Authorized { login_name: user.clone(), user, target, judged, creds });
    };
    let Some(user) = rt.config.users.canonical(&creds.user) else {
        return Err(LoginError::Bad { user: None, reason: "malformed" });
    };
    let external = mechanism == crate::protocol::Mechanism::External;
    let q = crate::auth::http::Query {
        protocol,
        method: if external { "external" } else { "plain" },
        user: &creds.user,
        password: creds.password.expose(),
        attempt,
        client_ip: ctx.peer.ip(),
        helo,
        tls,
    };
    let asked = Instant::now();
    let answer = service.query(&q).await;
    metrics().auth_duration.with_label_values(&["http"]).observe(asked.elapsed().as_secs_f64());
    let (server, port, new_user, pass, transport, client_address) = match answer {
        Err(e) => {
            // Reliability case 61: an outage is never the user's failure.
            tracing::warn!(session = %ctx.id, error = %e, "auth service unavailable");
            return Err(LoginError::Unavailable("auth_service_error"));
        }
        // `query` follows WAIT answers itself.
        Ok(crate::auth::http::Answer::Wait(_)) => return Err(LoginError::Unavailable("auth_service_error")),
        Ok(crate::auth::http::Answer::Fail { message, wait, error_code }) => {
            if crate::auth::http::is_temporary(error_code.as_deref()) {
                tracing::info!(session = %ctx.id, code = ?error_code, "auth service refused for now");
                return Err(LoginError::DeniedForNow { text: message, wait, code: error_code });
            }
            return Err(LoginError::Denied { user: Some(user), text: message, wait, code: error_code });
        }
        Ok(crate::auth::http::Answer::Ok { server, port, user, pass, transport, client_address }) => {
            (server, port, user, pass, transport, client_address)
        }
    };
    // One the protocol cannot send (XCLIENT for IMAP, ID for POP3 and SMTP), refused as the
    // config refuses it: not a login that tells no address.
    if let Some(c) = client_address
        && !c.fits(protocol)
    {
        tracing::warn!(session = %ctx.id, client_address = ?c, protocol = protocol.as_str(), "auth service answered with an Auth-Client-Address this protocol cannot send");
        return Err(LoginError::Unavailable("auth_service_error"));
    }
    let target = service_target(&rt.config, protocol, &server, port, transport, client_address).ok_or_else(|| {
        // Otherwise only a metric would say why every such login fails.
        tracing::warn!(session = %ctx.id, protocol = protocol.as_str(), auth_server = %server, ?port, "auth service answered with an Auth-Server that leads to no backend for this login: not a configured pool, nor a configured backend of this protocol (and Auth-Port), nor an address with an Auth-Port");
        LoginError::Unavailable("backend_unavailable")
    })?;
    // An Auth-User that is no usable name (empty, spaces, too long) is the service's fault:
    // never the client's own name in its place, which master and XCLIENT logins would open.
    let user = match &new_user {
        Some(u) => rt.config.users.canonical(u).ok_or_else(|| {
            tracing::warn!(session = %ctx.id, "auth service answered with an unusable Auth-User");
            LoginError::Unavailable("auth_service_error")
        })?,
        None => user,
    };
    // An Auth-Pass that is the client's own password (as sent, or as escaped in the request) is
    // no sign the service checked it: nginx refuses an IMAP or POP3 OK without one, so a
    // routing-only script echoes it. The backend has the last word on it then.
    // Compared without blanks at either end: a service's HTTP stack drops them from the header,
    // so a guess with a trailing space would otherwise pass for a password of its own.
    let echoed = pass.as_deref().is_some_and(|p| {
        let own = creds.password.expose();
        let p = p.trim_ascii();
        p == own.trim_ascii() || p == crate::auth::http::escape(own).trim_ascii()
    });
    let judged = if pass.is_none() || echoed { Judged::ServiceRouted } else { Judged::Proxy };
    let creds = Credentials {
        user: new_user.unwrap_or(creds.user),
        password: pass.map(crate::auth::Password::new).unwrap_or(creds.password),
    };
    Ok(Authorized { login_name: creds.user.clone(), user, target, judged, creds })
}

/// What one backend made of the login.
enum Tried {
    In(LoggedIn),
    /// The login ends here: the answer holds on every backend (the user's password or state, the
    /// client's own choice).
    Over(LoginError),
    /// It refused the connection: tried again in the next round.
    Refused,
    /// Another failure, counted against it: the next backend is tried.
    Next,
}

/// One login, as each backend it may go to is asked to take it.
struct BackendLoginOf<'a> {
    ctx: &'a SessionCtx,
    rt: &'a Runtime,
    info: &'a ClientInfo,
    /// The canonical name (for the log and the errors) and the one the login gives.
    user: &'a str,
    login_name: &'a str,
    creds: &'a Credentials,
    judged: Judged,
    /// The route's name, for the log.
    route: &'a str,
}

impl BackendLoginOf<'_> {
    /// Whether `backend` is where the client's own password is checked: it has the last word on
    /// a guess.
    fn password_checked_by(&self, backend: &Backend) -> bool {
        match self.judged {
            Judged::Proxy => false,
            Judged::ByBackend => true,
            Judged::ServiceRouted => backend.login == crate::config::BackendLogin::Replay,
        }
    }

    async fn on(&self, backend: &Backend) -> Tried {
        let (ctx, user) = (self.ctx, self.user);
        let started = Instant::now();
        let result = tokio::time::timeout(
            self.rt.config.limits.backend_login_timeout,
            backend_login(self.rt, backend, self.info, self.login_name, self.creds),
        )
        .await
        .unwrap_or(Err(BackendError::Protocol("backend login timed out")));
        let m = metrics();
        m.backend_login_duration.with_label_values(&[backend.label()]).observe(started.elapsed().as_secs_f64());
        let e = match result {
            Ok(logged_in) => return Tried::In(logged_in),
            Err(e) => e,
        };
        m.backend_errors.with_label_values(&[backend.label(), e.reason()]).inc();
        match e {
            BackendError::Rejected if self.judged == Judged::ByBackend => {
                Tried::Over(LoginError::Bad { user: Some(user.to_string()), reason: "bad_credentials" })
            }
            // The client's own password, which only the backend checked: maybe a guess.
            BackendError::Rejected if self.password_checked_by(backend) => {
                Tried::Over(LoginError::Bad { user: Some(user.to_string()), reason: "backend_rejected" })
            }
            BackendError::Rejected => Tried::Over(LoginError::BackendRejected { user: user.to_string() }),
            // The user's own state (another session holds the mailbox): a temporary failure for
            // this user, not a fault of the backend, and the same on every replica.
            BackendError::InUse => Tried::Over(LoginError::InUse),
            BackendError::ClientRefused { temporary, address } => {
                // The client's own, the same on every replica: no failover, and no count
                // against the backend (a client could otherwise mark a pool down at will).
                tracing::info!(session = %ctx.id, backend = %backend.name, temporary, address, "backend refused the client's EHLO name or address");
                Tried::Over(LoginError::ClientRefused { temporary, address })
            }
            BackendError::UserUnsupported => {
                // Nothing was sent; another backend of the pool may take this user.
                tracing::warn!(session = %ctx.id, backend = %backend.name, user = %logging::safe_user(Some(self.login_name)),
                    "login not sent: the user name is too long for this backend's XCLIENT LOGIN (over 255 bytes as xtext); such users need login = \"replay\" or \"master\"");
                Tried::Next
            }
            e @ BackendError::Local(_) => {
                // Out of descriptors, memory or ports here: not the backend's fault (a connection
                // flood on the proxy must not mark its backends down). The next one is tried: no
                // free local port is a shortage toward one destination only.
                tracing::warn!(session = %ctx.id, backend = %backend.name, error = %e, "cannot connect to the backend: out of local resources");
                Tried::Next
            }
            e @ BackendError::LoginRefused => {
                // Maybe the user's own condition (Dovecot's per-user connection limit): this
                // one's health is left to what sessions see before the credentials and to its
                // active checks.
                // The next one is tried: the same answer also means a replica whose own auth is
                // down (IMAP [SERVERBUG], SMTP 451/454) or one shutting down (* BYE), where
                // ending the login would be an outage for its share of users that no health
                // state shows. A limit on guesses answered so (Postfix's
                // smtpd_client_auth_rate_limit) is answered before the password is checked, so
                // a guess is still checked at most once; the proxy's own throttle paces them.
                tracing::warn!(session = %ctx.id, backend = %backend.name, route = %self.route, reason = e.reason(), "backend refused the login for now");
                Tried::Next
            }
            // Reliability cases 64-66: a refused connection counts against the backend only if
            // it is still refused when the retries end: logins that wait out a restart must not
            // mark the backend down (and so fail the logins after them at once). Any other
            // failure counts, also in a later round (a backend back on its port that cannot log
            // in yet): the refusals before it were not counted.
            BackendError::Connect(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => Tried::Refused,
            e => {
                ctx.health.failure(backend, Source::Session, backend.health.fall, e.reason());
                tracing::warn!(session = %ctx.id, backend = %backend.name, route = %self.route, reason = e.reason(), error = %e, "backend login failed");
                Tried::Next
            }
        }
    }
}

/// How often a backend that refuses connections is tried again during a login.
const BACKEND_RETRY: Duration = Duration::from_secs(1);
/// How long a login cut off by the login deadline is still followed, after the client has been
/// told, so that a guess under way is counted (its own timeouts bound it first as a rule).
const LOGIN_TAIL: Duration = Duration::from_secs(30);

/// Where the auth service's `Auth-Server` points: a configured pool or backend by name, or an
/// address (with `Auth-Port`) used as a backend with the protocol's defaults.
fn service_target(
    config: &crate::config::Config,
    protocol: Protocol,
    server: &str,
    port: Option<u16>,
    transport: Option<crate::config::Transport>,
    client_address: Option<crate::config::ClientAddress>,
) -> Option<crate::config::Target> {
    use crate::config::{Backend, Target};
    if let Some(p) = config.pools.get(server) {
        return Some(Target::Pool(p.clone()));
    }
    // A configured backend by name where it serves this protocol. One named by its bare address
    // (`10.0.0.5`) takes only logins for its own port too: another port or protocol of that
    // host is the address the service names. Any other name stands for its backend only: its
    // port is the configured one (services written for nginx send an Auth-Port with every
    // answer), and it is never looked up as a host with the protocol's defaults (plaintext, no
    // checks) in place of the configured TLS and login.
    let listens_on = |b: &Backend, p: u16| b.address.rsplit_once(':').and_then(|(_, q)| q.parse().ok()) == Some(p);
    if let Some(b) = config.backends.get(server) {
        let is_address = server.parse::<std::net::IpAddr>().is_ok();
        if b.protocol == protocol && (!is_address || port.is_none_or(|p| listens_on(b, p))) {
            return Some(Target::Backend(b.clone()));
        }
        if !is_address {
            return None;
        }
    }
    let mut b = Backend::adhoc(protocol, server, port?);
    if let Some(t) = transport {
        b.transport = t;
    }
    if let Some(c) = client_address {
        b.client_address = c;
    }
    Some(Target::Backend(Arc::new(b)))
}

async fn backend_login(
    rt: &Runtime,
    backend: &Backend,
    info: &ClientInfo,
    user: &str,
    creds: &Credentials,
) -> Result<LoggedIn, BackendError> {
    use crate::protocol::{imap, pop3, smtp};
    let tls = rt.backend_tls.get(&backend.name).cloned().or_else(|| rt.default_backend_tls.clone());
    let timeout = rt.config.limits.backend_connect_timeout;
    match backend.protocol {
        Protocol::Imap => imap::back::connect_and_login(backend, tls, info, user, creds, timeout).await,
        Protocol::Pop3 => pop3::back::connect_and_login(backend, tls, info, user, creds, timeout).await,
        Protocol::Smtp => {
            smtp::back::connect_and_login(backend, tls, info, user, creds, timeout, &rt.config.hostname).await
        }
    }
}

fn count_login(lc: &ListenerConfig, mechanism: crate::protocol::Mechanism, result: &str) {
    metrics().logins.with_label_values(&[lc.protocol.as_str(), mechanism.as_str(), result]).inc();
}

async fn fail(
    front: &mut Front,
    stream: &mut ClientStream,
    failure: LoginFailure,
    failures: u32,
    max: u32,
) -> Result<(), Outcome> {
    let closing = failures >= max;
    front.login_failed(stream, failure).await.map_err(|_| Outcome::PreAuth("client_error"))?;
    if closing {
        return Err(close(stream, front, Goodbye::TooManyFailures, "too_many_failures").await);
    }
    Ok(())
}

/// Say `why` and close, before login; the outcome to report (`reason`).
async fn close(stream: &mut ClientStream, front: &Front, why: Goodbye, reason: &'static str) -> Outcome {
    let _ = stream.write_all(front.goodbye(why)).await;
    let _ = stream.shutdown().await;
    Outcome::PreAuth(reason)
}

/// TLS handshake on an accepted socket. `greeting`, if any, is queued in the connection before
/// the handshake: with TLS 1.3 rustls sends it right after the server's Finished, in the same
/// write as the server's first flight (half-RTT data; nothing the client sends is needed for
/// it, and it carries nothing secret); with TLS 1.2 it follows the handshake.
///
/// On a listener that asks for client certificates (`client_auth`: its TLS config and policy),
/// the certificate is judged here: refused, the client gets nginx's line for it and the session
/// ends; accepted, its facts are returned for the auth service.
async fn tls_accept(
    ctx: &SessionCtx,
    tcp: TcpStream,
    greeting: Option<Vec<u8>>,
    client_auth: Option<&(Arc<rustls::ServerConfig>, Arc<ClientAuth>)>,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Option<ClientCertFacts>), Outcome> {
    let lc = &ctx.listener;
    // On a listener that asks for client certificates, its policy as now installed, where the
    // running config has one for the listener (same name and protocol): CAs and CRLs a reload
    // replaced apply to every such handshake after it, also a STARTTLS on a connection accepted
    // before (it could wait out the login timeout). Whether the listener asks at all stays as
    // it was when the connection was accepted.
    let running = client_auth.is_some().then(|| ctx.running.load_full());
    let current = running
        .as_deref()
        .filter(|r| r.config.listeners.iter().any(|l| l.name == lc.name && l.protocol == lc.protocol));
    let client_auth = client_auth.map(|accepted| current.and_then(|r| r.client_auth.get(&lc.name)).unwrap_or(accepted));
    let cfg = match client_auth {
        Some((cfg, _)) => cfg.clone(),
        None => match ctx.runtime.server_tls.get(&lc.protocol) {
            Some(cfg) => cfg.clone(),
            None => return Err(Outcome::PreAuth("tls_unconfigured")),
        },
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let started = Instant::now();
    let accept = acceptor.accept_with(tcp, |conn| {
        if let Some(g) = greeting {
            use std::io::Write;
            // Buffered by rustls until it may send application data; cannot fail for a few bytes.
            let _ = conn.writer().write_all(&g);
        }
    });
    let result = tokio::time::timeout(ctx.runtime.config.limits.tls_handshake_timeout, accept).await;
    let m = metrics();
    let (protocol, listener) = (ctx.listener.protocol.as_str(), ctx.listener.name.as_str());
    m.tls_handshake_duration.with_label_values(&[protocol]).observe(started.elapsed().as_secs_f64());
    match result {
        Ok(Ok(s)) => {
            let version = match s.get_ref().1.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
                _ => "other",
            };
            m.tls_handshakes.with_label_values(&[protocol, listener, "success", version]).inc();
            let Some((_, policy)) = client_auth else { return Ok((s, None)) };
            let check = policy.check(s.get_ref().1.peer_certificates());
            let verdict = match &check {
                CertCheck::Accepted(f) if f.cert.is_none() => "none",
                CertCheck::Accepted(f) if f.verify == "SUCCESS" => "verified",
                CertCheck::Accepted(_) => "unverified",
                CertCheck::Missing => "missing",
                CertCheck::Refused(_) => "refused",
            };
            m.client_certificates.with_label_values(&[protocol, listener, verdict]).inc();
            let (why, reason, detail) = match check {
                CertCheck::Accepted(facts) => return Ok((s, Some(facts))),
                CertCheck::Missing => (Goodbye::NoCertificate, "client_cert_missing", "no certificate"),
                CertCheck::Refused(why) => (Goodbye::CertificateError, "client_cert_refused", why),
            };
            tracing::info!(session = %ctx.id, peer = %ctx.peer.ip(), listener = %listener, error = detail, "client certificate refused");
            m.connections_rejected.with_label_values(&[protocol, listener, "client_cert"]).inc();
            let mut s = s;
            let _ = s.write_all(crate::protocol::goodbye(lc.protocol, why)).await;
            let _ = s.shutdown().await;
            Err(Outcome::PreAuth(reason))
        }
        Ok(Err(e)) => {
            tracing::debug!(session = %ctx.id, error = %e, "TLS handshake failed");
            m.tls_handshakes.with_label_values(&[protocol, listener, "failure", "none"]).inc();
            m.connections_rejected.with_label_values(&[protocol, listener, "tls"]).inc();
            Err(Outcome::PreAuth("tls_failed"))
        }
        Err(_) => {
            m.tls_handshakes.with_label_values(&[protocol, listener, "timeout", "none"]).inc();
            m.connections_rejected.with_label_values(&[protocol, listener, "tls"]).inc();
            Err(Outcome::PreAuth("tls_timeout"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Password;
    use crate::protocol::Mechanism;
    use crate::tls::client_cert::{CertDetails, ClientCertFacts};

    /// The auth service's Auth-Server names a configured backend only where that backend serves
    /// the protocol and, for a backend named by its address, given an Auth-Port, listens on it;
    /// otherwise an address is the address it is, and another name leads nowhere.
    #[test]
    fn a_backend_named_by_its_address_takes_only_its_own_port_and_protocol() {
        let text = "[auth]\nsource = \"backend\"\n\n[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nprotocol = \"imap\"\ntls = \"none\"\n\
                    allow_plaintext_auth = true\n\n[[backend]]\nname = \"10.0.0.5\"\naddress = \"10.0.0.5:143\"\n\
                    protocol = \"imap\"\n\n[routing.imap]\ndefault = \"10.0.0.5\"\n";
        let config = crate::config::Config::parse(std::path::Path::new("t.toml"), text).unwrap();
        let to = |protocol, port| match service_target(&config, protocol, "10.0.0.5", port, None, None) {
            Some(crate::config::Target::Backend(b)) => (b.dynamic, b.address.clone()),
            _ => panic!("no backend"),
        };
        assert_eq!(to(Protocol::Imap, None), (false, "10.0.0.5:143".to_string()));
        assert_eq!(to(Protocol::Imap, Some(143)), (false, "10.0.0.5:143".to_string()));
        assert_eq!(to(Protocol::Imap, Some(1143)), (true, "10.0.0.5:1143".to_string()));
        assert_eq!(to(Protocol::Pop3, Some(110)), (true, "10.0.0.5:110".to_string()));
        assert!(service_target(&config, Protocol::Pop3, "10.0.0.5", None, None, None).is_none());
        // A backend with a name of its own is never taken for a host to look up in its place.
        let named = text
            .replace("name = \"10.0.0.5\"", "name = \"mail1\"")
            .replace("default = \"10.0.0.5\"", "default = \"mail1\"");
        let config = crate::config::Config::parse(std::path::Path::new("t.toml"), &named).unwrap();
        assert!(matches!(
            service_target(&config, Protocol::Imap, "mail1", Some(143), None, None),
            Some(crate::config::Target::Backend(b)) if !b.dynamic
        ));
        // Its port is the configured one, whatever Auth-Port says (as before: nginx-style
        // services send one with every answer).
        assert!(matches!(
            service_target(&config, Protocol::Imap, "mail1", Some(993), None, None),
            Some(crate::config::Target::Backend(b)) if !b.dynamic && b.address == "10.0.0.5:143"
        ));
        assert!(service_target(&config, Protocol::Pop3, "mail1", Some(110), None, None).is_none());
    }

    /// Every failed EXTERNAL attempt with another user or certificate counts for the throttle;
    /// without this they would all share the empty password's fingerprint and count once.
    #[test]
    fn external_attempts_are_told_apart() {
        let creds = |user: &str, pw: &[u8]| Credentials { user: user.into(), password: Password::new(pw.to_vec()) };
        let tls = |fp: &str| TlsInfo {
            version: "TLSv1.3".into(),
            cipher: String::new(),
            client_cert: Some(ClientCertFacts {
                verify: "SUCCESS".into(),
                cert: Some(CertDetails {
                    subject: String::new(),
                    issuer: String::new(),
                    serial: String::new(),
                    fingerprint: fp.into(),
                    der: Vec::new(),
                }),
            }),
        };
        let ext = |user: &str, fp: &str| attempt_fingerprint(Mechanism::External, &creds(user, b""), Some(&tls(fp)));
        assert_eq!(ext("a", "aa"), ext("a", "aa"));
        assert_ne!(ext("a", "aa"), ext("b", "aa"));
        assert_ne!(ext("a", "aa"), ext("a", "bb"));
        let plain = |user: &str, pw: &[u8]| attempt_fingerprint(Mechanism::Plain, &creds(user, pw), None);
        assert_eq!(plain("a", b"x"), plain("a", b"x"));
        assert_ne!(plain("a", b"x"), plain("a", b"y"));
        // Reliability case 55: one password sprayed over users is a new attempt for each.
        assert_ne!(plain("a", b"x"), plain("b", b"x"));
        assert_ne!(plain("a\0x", b""), plain("a", b"x\0"));
        assert_ne!(ext("a", ""), plain("a", b""));
    }
}
