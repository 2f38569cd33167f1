//! Every metric the proxy exports, defined in one place, with label values only from fixed sets:
//! protocol, listener and backend names from the config, and result/reason enums. Never a user,
//! never a client address (reliability case 62). Backends the auth service names by address are
//! counted under the backend label `dynamic`.

use std::sync::OnceLock;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub connections_accepted: IntCounterVec,
    pub connections_active: IntGaugeVec,
    pub connections_rejected: IntCounterVec,
    pub accept_errors: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub client_certificates: IntCounterVec,
    pub tls_handshake_duration: HistogramVec,
    pub starttls_upgrades: IntCounterVec,
    pub logins: IntCounterVec,
    pub auth_duration: HistogramVec,
    pub backend_connect_duration: HistogramVec,
    pub backend_login_duration: HistogramVec,
    pub backend_errors: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub backend_draining: IntGaugeVec,
    pub backend_sessions: IntGaugeVec,
    pub pool_backends_up: IntGaugeVec,
    pub health_checks: IntCounterVec,
    pub relayed_bytes: IntCounterVec,
    pub session_duration: HistogramVec,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_success: IntGauge,
    pub config_last_reload_successful: IntGauge,
    pub certificate_not_after: GaugeVec,
    pub client_crl_next_update: GaugeVec,
    pub acme_orders: IntCounterVec,
    pub acme_renewals: IntCounterVec,
    pub acme_failures: IntGaugeVec,
    pub build_info: IntGaugeVec,
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace("portcullis"), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help).namespace("portcullis"), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).namespace("portcullis").buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        // Latencies from 1 ms to ~65 s; handshakes and logins live there, and the slowest a
        // login can take (backend_login_timeout, 30 s by default) still has a bucket.
        let latency = || prometheus::exponential_buckets(0.001, 2.0, 17).expect("valid buckets");
        // Sessions last from a second (a POP3 check) to days (IMAP IDLE).
        let sessions = vec![1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4.0 * 3600.0, 24.0 * 3600.0];
        let last_reload = IntGauge::with_opts(
            Opts::new(
                "config_last_reload_success_timestamp_seconds",
                "When the configuration was last loaded successfully",
            )
            .namespace("portcullis"),
        )
        .expect("valid metric");
        r.register(Box::new(last_reload.clone())).expect("unique metric");
        let reload_ok = IntGauge::with_opts(
            Opts::new(
                "config_last_reload_successful",
                "1 when the files on disk are the running configuration, 0 after a reload failed (until one succeeds)",
            )
            .namespace("portcullis"),
        )
        .expect("valid metric");
        r.register(Box::new(reload_ok.clone())).expect("unique metric");
        let not_after = GaugeVec::new(
            Opts::new("certificate_not_after_timestamp_seconds", "Expiry of each served certificate")
                .namespace("portcullis"),
            &["certificate"],
        )
        .expect("valid metric");
        r.register(Box::new(not_after.clone())).expect("unique metric");
        let crl_next_update = GaugeVec::new(
            Opts::new(
                "client_crl_next_update_timestamp_seconds",
                "When the first of a listener's client-certificate revocation lists expires",
            )
            .namespace("portcullis"),
            &["listener"],
        )
        .expect("valid metric");
        r.register(Box::new(crl_next_update.clone())).expect("unique metric");
        let m = Metrics {
            connections_accepted: counter(
                &r,
                "connections_accepted_total",
                "Accepted client connections",
                &["protocol", "listener"],
            ),
            connections_active: gauge(&r, "connections_active", "Open client connections", &["protocol", "listener"]),
            connections_rejected: counter(
                &r,
                "connections_rejected_total",
                "Client connections refused or dropped before the dialogue, or whose TLS handshake (implicit or STARTTLS) failed",
                &["protocol", "listener", "reason"],
            ),
            accept_errors: counter(
                &r,
                "accept_errors_total",
                "Failed accepts (out of descriptors or memory): clients wait in the listen queue meanwhile",
                &["listener"],
            ),
            tls_handshakes: counter(
                &r,
                "tls_handshakes_total",
                "TLS handshakes with clients",
                &["protocol", "listener", "result", "version"],
            ),
            client_certificates: counter(
                &r,
                "client_certificates_total",
                "Client certificate checks on listeners with verify_client, by verdict: verified, \
                 unverified (accepted by optional_no_ca), none (optional), missing and refused (closed)",
                &["protocol", "listener", "verdict"],
            ),
            tls_handshake_duration: histogram(
                &r,
                "tls_handshake_duration_seconds",
                "Client TLS handshake time",
                &["protocol"],
                latency(),
            ),
            starttls_upgrades: counter(
                &r,
                "starttls_upgrades_total",
                "Successful STARTTLS/STLS upgrades",
                &["protocol", "listener"],
            ),
            logins: counter(&r, "logins_total", "Login attempts by outcome", &["protocol", "mechanism", "result"]),
            auth_duration: histogram(&r, "auth_duration_seconds", "Time to verify credentials", &["source"], latency()),
            backend_connect_duration: histogram(
                &r,
                "backend_connect_duration_seconds",
                "Time to connect to a backend for a session (TCP, PROXY header and TLS; not health checks)",
                &["backend"],
                latency(),
            ),
            backend_login_duration: histogram(
                &r,
                "backend_login_duration_seconds",
                "Time from connect to a finished backend login",
                &["backend"],
                latency(),
            ),
            backend_errors: counter(
                &r,
                "backend_errors_total",
                "Backend connections or logins that failed",
                &["backend", "reason"],
            ),
            backend_up: gauge(&r, "backend_up", "1 when health checks consider the backend up", &["backend"]),
            backend_draining: gauge(
                &r,
                "backend_draining",
                "1 when the backend is draining (no new sessions)",
                &["backend"],
            ),
            backend_sessions: gauge(&r, "backend_sessions", "Relayed sessions open on the backend", &["backend"]),
            pool_backends_up: gauge(
                &r,
                "pool_backends_up",
                "Backends of the pool that are up and not draining, per protocol they speak",
                &["pool", "protocol"],
            ),
            health_checks: counter(&r, "health_checks_total", "Active health checks by result", &["backend", "result"]),
            relayed_bytes: counter(&r, "relayed_bytes_total", "Bytes relayed after login", &["protocol", "direction"]),
            session_duration: histogram(
                &r,
                "session_duration_seconds",
                "Client connection length, by whether it was relayed after a login (relay) or ended before one (preauth)",
                &["protocol", "phase"],
                sessions,
            ),
            config_reloads: counter(&r, "config_reloads_total", "Configuration reloads by result", &["result"]),
            config_last_reload_success: last_reload,
            config_last_reload_successful: reload_ok,
            certificate_not_after: not_after,
            client_crl_next_update: crl_next_update,
            acme_orders: counter(&r, "acme_orders_total", "ACME certificate orders by result", &["result"]),
            acme_renewals: counter(&r, "acme_renewals_total", "ACME renewals by result", &["result"]),
            acme_failures: gauge(
                &r,
                "acme_consecutive_failures",
                "Failed ACME orders in a row for each certificate (0 once one succeeds)",
                &["certificate"],
            ),
            build_info: gauge(&r, "build_info", "Build information", &["version"]),
            registry: r,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for result in ["success", "error"] {
            m.config_reloads.with_label_values(&[result]);
            m.acme_orders.with_label_values(&[result]);
            m.acme_renewals.with_label_values(&[result]);
        }
        m
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> (String, Vec<u8>) {
        let encoder = TextEncoder::new();
        let mut buf = Vec::new();
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        (encoder.format_type().to_string(), buf)
    }
}

/// Keeps the active-connections gauge of one listener up while it lives.
pub struct ActiveConnection(prometheus::IntGauge);

impl ActiveConnection {
    pub fn new(protocol: &str, listener: &str) -> ActiveConnection {
        let m = metrics();
        m.connections_accepted.with_label_values(&[protocol, listener]).inc();
        let g = m.connections_active.with_label_values(&[protocol, listener]);
        g.inc();
        ActiveConnection(g)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_prefix() {
        let m = metrics();
        let _c = ActiveConnection::new("imap", "imaps");
        m.logins.with_label_values(&["imap", "plain", "success"]).inc();
        let (ctype, body) = m.render();
        let text = String::from_utf8(body).unwrap();
        assert!(ctype.starts_with("text/plain"));
        assert!(text.contains("portcullis_connections_active{listener=\"imaps\",protocol=\"imap\"} 1"), "{text}");
        assert!(text.contains("portcullis_logins_total{mechanism=\"plain\",protocol=\"imap\",result=\"success\"} 1"));
        assert!(text.contains(&format!("portcullis_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
        assert!(text.contains("portcullis_config_reloads_total{result=\"error\"} 0"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("portcullis_"), "{line}");
        }
    }
}
