//! One client connection, start to end: [implicit TLS] → front end (STARTTLS, pre-auth dialogue)
//! → auth → route → backend login → relay. One config snapshot for the whole life of the session,
//! one access-log line at its end.
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
use crate::auth::{self, Verdict};
use crate::config::{ListenerConfig, TlsMode};
use crate::logging;
use crate::protocol::imap::back::{self, BackendError, ClientInfo, LoggedIn};
use crate::protocol::imap::front::{CloseReason, Event, FrontSettings, ImapFront, LoginFailure};
use crate::relay::{self, Transferred};
use crate::tls::{ClientStream, MaybeTls};

/// Everything a session needs, fixed at accept.
pub struct SessionCtx {
    pub runtime: Arc<Runtime>,
    pub listener: Arc<ListenerConfig>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub id: String,
    pub shutdown: CancellationToken,
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
    user: String,
    backend_name: String,
    pipelined: Vec<u8>,
}

pub async fn run(ctx: SessionCtx, tcp: TcpStream) {
    let start = Instant::now();
    let _ = tcp.set_nodelay(true);
    let limits = ctx.runtime.config.limits.clone();
    // Shutdown is handled inside `preauth`, where the client can still be told.
    let pre = match tokio::time::timeout(limits.login_timeout, preauth(&ctx, tcp)).await {
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
    // The login reply goes first, then whatever the backend sent after it, then the relay.
    let mut first = std::mem::take(&mut a.backend.untagged);
    first.append(&mut a.backend.tagged_rest);
    first.append(&mut a.backend.leftover);
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

async fn preauth(ctx: &SessionCtx, tcp: TcpStream) -> Result<Authenticated, Outcome> {
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
        let tls_active = stream.is_tls();
        let mut front = ImapFront::new(FrontSettings {
            tls_active,
            starttls_offered: lc.tls == TlsMode::StartTls,
            auth_allowed: tls_active || lc.allow_plaintext_auth,
            max_line: limits.max_line_length,
            max_errors: limits.max_errors,
            idle_timeout: limits.preauth_idle_timeout,
        });
        if !greeted {
            front.greet(&mut stream).await.map_err(|_| Outcome::PreAuth("client_error"))?;
            greeted = true;
        }
        loop {
            let event = tokio::select! {
                e = front.next_event(&mut stream) => e.map_err(|_| Outcome::PreAuth("client_error"))?,
                _ = ctx.shutdown.cancelled() => {
                    // Reliability case 80: tell clients still logging in why they are dropped.
                    let _ = stream.write_all(b"* BYE Server shutting down.\r\n").await;
                    let _ = stream.shutdown().await;
                    return Err(Outcome::PreAuth("shutdown"));
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
            let Some(creds) = req.credentials else {
                logging::login_failed(ctx.peer.ip(), None, lc.protocol.as_str(), &lc.name, "malformed");
                failures += 1;
                tokio::time::sleep_until(fail_at).await;
                fail(
                    &mut front,
                    &mut stream,
                    &req.tag,
                    LoginFailure::BadCredentials,
                    failures,
                    limits.max_auth_attempts,
                )
                .await?;
                continue;
            };
            let verdict = auth::authenticate(&rt.config, &creds).await;
            let (user, pinned, deferred) = match verdict {
                Verdict::Rejected { user } => {
                    logging::login_failed(
                        ctx.peer.ip(),
                        user.as_deref(),
                        lc.protocol.as_str(),
                        &lc.name,
                        "bad_credentials",
                    );
                    failures += 1;
                    tokio::time::sleep_until(fail_at).await;
                    fail(
                        &mut front,
                        &mut stream,
                        &req.tag,
                        LoginFailure::BadCredentials,
                        failures,
                        limits.max_auth_attempts,
                    )
                    .await?;
                    continue;
                }
                Verdict::Accepted { user, backend } => (user, backend, false),
                Verdict::Deferred { user } => (user, None, true),
            };
            let Some(backend) = crate::route::route(&rt.config, &user, pinned.as_deref()) else {
                tracing::warn!(session = %ctx.id, user = %logging::safe_user(Some(&user)), "no backend for user");
                fail(&mut front, &mut stream, &req.tag, LoginFailure::Unavailable, 0, u32::MAX).await?;
                continue;
            };
            let info = ClientInfo {
                peer: ctx.peer,
                local: ctx.local,
                session_id: ctx.id.clone(),
                id_fields: front.client_id().to_vec(),
            };
            let tls = rt.backend_tls.get(&backend.name).cloned();
            let login = tokio::time::timeout(
                limits.backend_login_timeout,
                back::connect_and_login(&backend, tls, &info, &user, &creds, limits.backend_connect_timeout),
            )
            .await
            .unwrap_or_else(|_| Err(BackendError::Protocol("backend login timed out")));
            match login {
                Ok(logged_in) => {
                    let Some(pipelined) = front.into_pipelined() else {
                        let _ = stream.write_all(b"* BYE Command line too long.\r\n").await;
                        return Err(Outcome::PreAuth(CloseReason::LineTooLong.as_str()));
                    };
                    let mut tagged = req.tag.into_bytes();
                    tagged.push(b' ');
                    let mut backend_login = logged_in;
                    tagged.append(&mut backend_login.tagged_rest);
                    backend_login.tagged_rest = tagged;
                    tracing::debug!(session = %ctx.id, backend = %backend.name, mechanism = req.mechanism.as_str(), "login ok");
                    return Ok(Authenticated {
                        client: stream,
                        backend: backend_login,
                        user,
                        backend_name: backend.name.clone(),
                        pipelined,
                    });
                }
                Err(BackendError::Rejected) => {
                    let reason = if deferred { "bad_credentials" } else { "backend_rejected" };
                    logging::login_failed(ctx.peer.ip(), Some(&user), lc.protocol.as_str(), &lc.name, reason);
                    failures += 1;
                    tokio::time::sleep_until(fail_at).await;
                    fail(
                        &mut front,
                        &mut stream,
                        &req.tag,
                        LoginFailure::BadCredentials,
                        failures,
                        limits.max_auth_attempts,
                    )
                    .await?;
                }
                Err(e) => {
                    tracing::warn!(session = %ctx.id, backend = %backend.name, reason = e.reason(), error = %e, "backend login failed");
                    fail(&mut front, &mut stream, &req.tag, LoginFailure::Unavailable, 0, u32::MAX).await?;
                }
            }
        }
        // STARTTLS: the front end checked that no plaintext is buffered; upgrade and start over
        // with a fresh front end (pre-TLS state, including ID, is forgotten).
        let MaybeTls::Plain(tcp) = stream else {
            return Err(Outcome::PreAuth("starttls_on_tls"));
        };
        stream = MaybeTls::Tls(Box::new(tls_accept(ctx, tcp).await?));
    }
}

async fn fail(
    front: &mut ImapFront,
    stream: &mut ClientStream,
    tag: &str,
    failure: LoginFailure,
    failures: u32,
    max: u32,
) -> Result<(), Outcome> {
    front.login_failed(stream, tag, failure).await.map_err(|_| Outcome::PreAuth("client_error"))?;
    if failures >= max {
        let _ = stream.write_all(b"* BYE Too many failed logins.\r\n").await;
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
