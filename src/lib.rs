//! portcullis: a TLS-terminating, protocol-aware mail edge proxy.
//!
//! # Layout
//!
//! One connection takes one straight path; each module is one stage or one service beside it:
//!
//! - `app`: the running proxy: swapped runtime snapshot, listeners, reload, shutdown.
//! - `config`: file format, validated model, reload watcher.
//! - `tls`: server/client TLS configs, the SNI certificate store, plain-or-TLS streams.
//! - `session`: accept → (TLS) → front end → auth → route → backend login → relay.
//! - `protocol`: IMAP, POP3 and SMTP front ends and backend logins, SASL decoding, line framing.
//! - `backend`: connect, PROXY v2, TLS/STARTTLS toward backends, bounded reply lines.
//! - `auth`: credential verification (passwd-file hashes, or backend-verified).
//! - `route`: user → pool → backends in weighted rendezvous order.
//! - `health`: active checks, passive circuit breaker, session counts per backend.
//! - `limits`: login throttling (penalties, blocks) and connection caps.
//! - `relay`: the post-login byte pipe.
//! - `logging`: subscriber setup and the stable log lines.
//! - `metrics`: every Prometheus metric; `admin`: the /metrics, /healthz, /readyz server.
//! - `systemd`: sd_notify for `Type=notify` units.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod backend;
pub mod config;
pub mod health;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod relay;
pub mod route;
pub mod session;
pub mod systemd;
pub mod tls;
