//! One client connection, start to end: [implicit TLS] → front end (STARTTLS, pre-auth dialogue)
//! → auth → route → backend login → relay. One config snapshot for the whole life of the session,
//! one access-log line at its end. Written once for all protocols: the protocol differences live
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
use crate::logging;
use crate::protocol::smtp::ehlo::EhloCache;
use crate::protocol::{CloseReason, Event, Front, FrontSettings, Goodbye, LoginFailure};
use crate::relay::{self, Transferred};
use crate::tls::{ClientStream, MaybeTls};

/// Time past the login deadline in which a session still gets to say goodbye.
const LOGIN_TIMEOUT_SLACK: Duration = Duration::from_secs(1);

/// Everything a session needs, fixed at accept.
pub struct SessionCtx {
    pub runtime: Arc<Runtime>,
    pub listener: Arc<ListenerConfig>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub id: String,
    pub shutdown: CancellationToken,
    pub ehlo: Arc<EhloCache>,
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
}

pub async fn run(ctx: SessionCtx, tcp: TcpStream) {
    let start = Instant::now();
    let _ = tcp.set_nodelay(true);
    let limits = ctx.runtime.config.limits.clone();
    // Boxed so its buffers are freed after login: the session task's own future stays small for
    // the (long, mostly idle) relay phase. Shutdown is handled inside, where the client can
    // still be told.
    // The login deadline is enforced inside (so the client hears why); this outer bound only
    // catches a phase that cannot answer, such as a TLS handshake in progress.
    let deadline = start + limits.login_timeout;
    let pre =
        match tokio::time::timeout_at(deadline + LOGIN_TIMEOUT_SLACK, Box::pin(preauth(&ctx, tcp, deadline))).await {
            Ok(r) => r,
            Err(_) => Err(Outcome::PreAuth("login_timeout")),
        };
    let (outcome, user, backend, bytes) = match pre {
        Err(outcome) => (outcome, None, None, Transferred::default()),
        Ok(mut a) => {
            let (end, bytes) = relay_session(&mut a, limits.idle_timeout).await;
            (Outcome::Relayed(end), Some(a.user), Some(a.backend_name), bytes)
        }
    };
    let (phase, result) = match outcome {
        Outcome::PreAuth(r) => ("preauth", r),
        Outcome::Relayed(r) => ("relay", r),
    };
    tracing::info!(
        target: "portcullis::access",
        session = %ctx.id,
        listener = %ctx.listener.name,
        protocol = ctx.listener.protocol.as_str(),
        client = %ctx.peer,
        user = %logging::safe_user(user.as_deref()),
        backend = backend.as_deref().unwrap_or("-"),
        phase,
        result,
        bytes_in = bytes.client_to_backend,
        bytes_out = bytes.backend_to_client,
        duration_ms = start.elapsed().as_millis() as u64,
        "session end"
    );
}

async fn relay_session(a: &mut Authenticated, idle: Duration) -> (&'static str, Transferred) {
    let first = std::mem::take(&mut a.to_client);
    if a.client.write_all(&first).await.is_err() || a.client.flush().await.is_err() {
        return ("client_error", Transferred::default());
    }
    if !a.pipelined.is_empty() && a.backend.stream.write_all(&a.pipelined).await.is_err() {
        return ("backend_error", Transferred::default());
    }
    a.pipelined = Vec::new();
    let (end, t) = relay::relay(&mut a.client, &mut a.backend.stream, idle).await;
    (end.as_str(), t)
}

fn front_settings(ctx: &SessionCtx, tls_active: bool) -> FrontSettings {
    let config = &ctx.runtime.config;
    let lc = &ctx.listener;
    // Honest EHLO: the extensions of the backend unauthenticated SMTP clients would be routed to.
    let extensions = match lc.protocol {
        Protocol::Smtp => config
            .routing
            .tables
            .get(&Protocol::Smtp)
            .and_then(|t| t.default.as_ref().or_else(|| t.domains.values().next()))
            .and_then(|b| ctx.ehlo.get(&b.name))
            .unwrap_or_else(|| Arc::from(Vec::new())),
        _ => Arc::from(Vec::new()),
    };
    FrontSettings {
        tls_active,
        starttls_offered: lc.tls == TlsMode::StartTls,
        auth_allowed: tls_active || lc.allow_plaintext_auth,
        max_line: config.limits.max_line_length,
        max_errors: config.limits.max_errors,
        idle_timeout: config.limits.preauth_idle_timeout,
        hostname: config.hostname.clone(),
        extensions,
        greeting_delay: config.limits.smtp_greeting_delay,
    }
}

async fn preauth(ctx: &SessionCtx, tcp: TcpStream, deadline: Instant) -> Result<Authenticated, Outcome> {
    let rt = &ctx.runtime;
    let limits = &rt.config.limits;
    let lc = &ctx.listener;
    let mut stream: ClientStream = match lc.tls {
        TlsMode::Implicit => MaybeTls::Tls(Box::new(tls_accept(ctx, tcp).await?)),
        TlsMode::StartTls | TlsMode::None => MaybeTls::Plain(tcp),
    };
    let mut greeted = false;
    let mut failures = 0u32;
    loop {
        let mut front = Front::new(lc.protocol, front_settings(ctx, stream.is_tls()));
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
                _ = ctx.shutdown.cancelled() => {
                    // Reliability case 80: tell clients still logging in why they are dropped.
                    let _ = stream.write_all(front.goodbye(Goodbye::Shutdown)).await;
                    let _ = stream.shutdown().await;
                    return Err(Outcome::PreAuth("shutdown"));
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // Reliability case 58: activity does not extend the login deadline.
                    let _ = stream.write_all(front.goodbye(Goodbye::LoginTimeout)).await;
                    let _ = stream.shutdown().await;
                    return Err(Outcome::PreAuth("login_timeout"));
                }
            };
            let req = match event {
                Event::Closed(reason) => {
                    let _ = stream.shutdown().await;
                    return Err(Outcome::PreAuth(reason.as_str()));
                }
                Event::StartTls => break,
                Event::Login(req) => req,
            };
            let fail_at = Instant::now() + limits.auth_failure_delay;
            let attempt = match req.credentials {
                None => Err((None, "malformed")),
                Some(creds) => login(ctx, &front, creds).await,
            };
            match attempt {
                Ok((logged_in, user, backend_name)) => {
                    let mut to_client = front.success_reply(logged_in.untagged.clone(), logged_in.reply.clone());
                    to_client.extend_from_slice(&logged_in.leftover);
                    let goodbye = front.goodbye(Goodbye::LineTooLong);
                    let Some(pipelined) = front.into_pipelined() else {
                        let _ = stream.write_all(goodbye).await;
                        return Err(Outcome::PreAuth(CloseReason::LineTooLong.as_str()));
                    };
                    if let Some(exts) = &logged_in.extensions {
                        ctx.ehlo.update(&backend_name, exts);
                    }
                    tracing::debug!(session = %ctx.id, backend = %backend_name, mechanism = req.mechanism.as_str(), "login ok");
                    let backend = LoggedIn { leftover: Vec::new(), ..logged_in };
                    return Ok(Authenticated { client: stream, backend, to_client, user, backend_name, pipelined });
                }
                Err((user, "unavailable")) => {
                    let _ = user;
                    fail(&mut front, &mut stream, LoginFailure::Unavailable, 0, u32::MAX).await?;
                }
                Err((user, reason)) => {
                    logging::login_failed(ctx.peer.ip(), user.as_deref(), lc.protocol.as_str(), &lc.name, reason);
                    failures += 1;
                    tokio::time::sleep_until(fail_at).await;
                    fail(&mut front, &mut stream, LoginFailure::BadCredentials, failures, limits.max_auth_attempts)
                        .await?;
                }
            }
        }
        // STARTTLS: the front end checked that no plaintext is buffered; upgrade and start over
        // with a fresh front end (pre-TLS state is forgotten).
        let MaybeTls::Plain(tcp) = stream else {
            return Err(Outcome::PreAuth("starttls_on_tls"));
        };
        stream = MaybeTls::Tls(Box::new(tls_accept(ctx, tcp).await?));
    }
}

/// Verify, route and log in to the backend. The error carries the canonical user (if any) and
/// the failure reason; "unavailable" is the backend's fault, anything else a failed login.
async fn login(
    ctx: &SessionCtx,
    front: &Front,
    creds: Credentials,
) -> Result<(LoggedIn, String, String), (Option<String>, &'static str)> {
    let rt = &ctx.runtime;
    let limits = &rt.config.limits;
    let protocol = ctx.listener.protocol;
    let (user, pinned, deferred) = match auth::authenticate(&rt.config, &creds).await {
        Verdict::Rejected { user } => return Err((user, "bad_credentials")),
        Verdict::Accepted { user, backends } => (user, backends, false),
        Verdict::Deferred { user } => (user, Vec::new(), true),
    };
    let Some(backend) = crate::route::route(&rt.config, protocol, &user, &pinned) else {
        tracing::warn!(session = %ctx.id, user = %logging::safe_user(Some(&user)), "no backend for user");
        return Err((Some(user), "unavailable"));
    };
    let hints = front.hints();
    let info = ClientInfo {
        peer: ctx.peer,
        local: ctx.local,
        session_id: ctx.id.clone(),
        id_fields: hints.id_fields,
        helo: hints.helo,
        esmtp: hints.esmtp,
    };
    let result = tokio::time::timeout(limits.backend_login_timeout, backend_login(ctx, &backend, &info, &user, &creds))
        .await
        .unwrap_or(Err(BackendError::Protocol("backend login timed out")));
    match result {
        Ok(logged_in) => Ok((logged_in, user, backend.name.clone())),
        Err(BackendError::Rejected) => Err((Some(user), if deferred { "bad_credentials" } else { "backend_rejected" })),
        Err(e) => {
            tracing::warn!(session = %ctx.id, backend = %backend.name, reason = e.reason(), error = %e, "backend login failed");
            Err((Some(user), "unavailable"))
        }
    }
}

async fn backend_login(
    ctx: &SessionCtx,
    backend: &Backend,
    info: &ClientInfo,
    user: &str,
    creds: &Credentials,
) -> Result<LoggedIn, BackendError> {
    use crate::protocol::{imap, pop3, smtp};
    let rt = &ctx.runtime;
    let tls = rt.backend_tls.get(&backend.name).cloned();
    let timeout = rt.config.limits.backend_connect_timeout;
    match backend.protocol {
        Protocol::Imap => imap::back::connect_and_login(backend, tls, info, user, creds, timeout).await,
        Protocol::Pop3 => pop3::back::connect_and_login(backend, tls, info, user, creds, timeout).await,
        Protocol::Smtp => {
            smtp::back::connect_and_login(backend, tls, info, user, creds, timeout, &rt.config.hostname).await
        }
    }
}

async fn fail(
    front: &mut Front,
    stream: &mut ClientStream,
    failure: LoginFailure,
    failures: u32,
    max: u32,
) -> Result<(), Outcome> {
    front.login_failed(stream, failure).await.map_err(|_| Outcome::PreAuth("client_error"))?;
    if failures >= max {
        let _ = stream.write_all(front.goodbye(Goodbye::TooManyFailures)).await;
        let _ = stream.shutdown().await;
        return Err(Outcome::PreAuth("too_many_failures"));
    }
    Ok(())
}

async fn tls_accept(ctx: &SessionCtx, tcp: TcpStream) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Outcome> {
    let Some(cfg) = ctx.runtime.server_tls.get(&ctx.listener.protocol).cloned() else {
        return Err(Outcome::PreAuth("tls_unconfigured"));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    match tokio::time::timeout(ctx.runtime.config.limits.tls_handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            tracing::debug!(session = %ctx.id, error = %e, "TLS handshake failed");
            Err(Outcome::PreAuth("tls_failed"))
        }
        Err(_) => Err(Outcome::PreAuth("tls_timeout")),
    }
}
