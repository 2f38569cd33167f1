//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (config loaded, listeners bound, certificates loaded; pools without a backend up are
//! listed but do not make it fail),
//! and `POST /acme/renew/NAME` from the same host only, with the token in the ACME state
//! directory (`tls::acme::RENEW_TOKEN_FILE`).
//! It binds loopback unless configured otherwise and never serves anything a client sent.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::metrics::metrics;

/// Connections served at once; more are closed at accept. A scraper needs one or two; the
/// cap keeps anyone who can reach the port from holding the file descriptors the mail
/// listeners share.
const MAX_CONNECTIONS: usize = 64;
/// Connections from one address at once: one client holding idle connections cannot take every
/// slot and so lock out the scraper and the health probes (which restart the pod when they fail).
const MAX_PER_ADDRESS: usize = 8;
/// How long a request's headers may take to arrive, and how long one connection may stay open
/// (a scraper reconnects; a connection that sends nothing is closed).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Serve until `stop` is cancelled.
pub async fn serve(listener: TcpListener, app: Weak<App>, stop: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // The mail listeners' counter, with its own instance: the admin server's caps are its own.
    let open = Arc::new(crate::limits::Connections::default());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Per client as the mail ports count them (an IPv6 /64 is one; a v4-mapped address its
        // IPv4), so one host's many addresses cannot take every slot from the health probes.
        let client = crate::limits::ip_key(peer.ip(), 64);
        let slot = match open.acquire("admin", client, MAX_CONNECTIONS, 0, MAX_PER_ADDRESS) {
            Ok(slot) => slot,
            Err(cap) => {
                tracing::warn!(peer = %peer, cap = cap.as_str(), "admin connection refused: too many open");
                continue;
            }
        };
        // Renewals are asked from the proxy's own host (`portcullis renew`, which connects to the
        // configured address): the only request here that acts, so not one for whoever can reach
        // a metrics port bound to all addresses.
        let same_host = tcp.local_addr().is_ok_and(|local| same_host(peer.ip(), local.ip()));
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            async move {
                // POST /acme/renew/NAME: `portcullis renew NAME`.
                if req.method() == hyper::Method::POST
                    && let Some(label) = req.uri().path().strip_prefix("/acme/renew/")
                {
                    // A browser on this host could be made to send this POST by any web page
                    // (no preflight for a body-less POST); browsers always say where from.
                    let from_browser = req.headers().contains_key("origin")
                        || req.headers().contains_key("sec-fetch-site")
                        || req.headers().contains_key("referer");
                    if !same_host || from_browser {
                        let resp = Response::builder()
                            .status(StatusCode::FORBIDDEN)
                            .body(Full::new(Bytes::from(
                                "renewals are asked from the proxy's own host, not from a browser\n",
                            )))
                            .unwrap_or_default();
                        return Ok::<_, Infallible>(resp);
                    }
                    let label = label.to_string();
                    // The token in the state directory: only the proxy's user (and root) may
                    // spend the CA's limits, not every local user who can reach this port.
                    let token = req.headers().get("x-renew-token").map_or(&b""[..], |v| v.as_bytes());
                    let renewal = match app.upgrade() {
                        Some(app) => {
                            app.acme_renew(if label.is_empty() { None } else { Some(&label) }, Some(token)).await
                        }
                        None => crate::app::Renewal::Unknown,
                    };
                    let (status, body) = match renewal {
                        crate::app::Renewal::Started => (StatusCode::ACCEPTED, "renewal started\n"),
                        crate::app::Renewal::Unknown => (StatusCode::NOT_FOUND, "no such ACME certificate\n"),
                        crate::app::Renewal::Refused => (
                            StatusCode::FORBIDDEN,
                            "renewal token missing or not this run's (portcullis renew reads it from the ACME state_dir's renew-token file)\n",
                        ),
                    };
                    let resp =
                        Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap_or_default();
                    return Ok::<_, Infallible>(resp);
                }
                Ok::<_, Infallible>(handle(&req, app.upgrade()))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(tcp), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(slot);
        });
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), graceful.shutdown()).await;
}

/// Whether a connection from `peer` to our `local` address comes from this host.
fn same_host(peer: std::net::IpAddr, local: std::net::IpAddr) -> bool {
    peer.is_loopback() || peer == local
}

fn handle(req: &Request<Incoming>, app: Option<Arc<App>>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let (ctype, body) = match &app {
                Some(app) => app.render_metrics(),
                None => metrics().render(),
            };
            Response::builder().header("content-type", ctype).body(Full::new(Bytes::from(body))).unwrap_or_default()
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match app.map(|a| a.readiness()) {
            Some((problems, degraded)) if problems.is_empty() => {
                let notes: String = degraded.iter().map(|d| format!("degraded: {d}\n")).collect();
                text(StatusCode::OK, format!("ready\n{notes}"))
            }
            Some((problems, _)) => text(StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n"),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into()),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Bind the admin address (a failure is a start/reload error).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn renewals_only_from_this_host() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(super::same_host(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(super::same_host(ip("::1"), ip("0.0.0.0")));
        // The CLI on the host, to an admin bound to one of its addresses.
        assert!(super::same_host(ip("10.0.0.5"), ip("10.0.0.5")));
        assert!(!super::same_host(ip("10.0.0.7"), ip("10.0.0.5")));
        assert!(!super::same_host(ip("2001:db8::7"), ip("2001:db8::5")));
    }
}
