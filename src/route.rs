//! Which backend serves a user: a backend the user's entry pins it to (speaking the session's
//! protocol), else the protocol's route for the user's domain, else the protocol's default. Pure
//! lookups over one config snapshot.

use std::sync::Arc;

use crate::config::{Backend, Config, Protocol};

pub fn route(config: &Config, protocol: Protocol, user: &str, pinned: &[String]) -> Option<Arc<Backend>> {
    if let Some(b) = pinned.iter().filter_map(|name| config.backends.get(name)).find(|b| b.protocol == protocol) {
        return Some(b.clone());
    }
    let table = config.routing.tables.get(&protocol)?;
    if let Some((_, domain)) = user.rsplit_once('@')
        && let Some(b) = table.domains.get(&domain.to_ascii_lowercase())
    {
        return Some(b.clone());
    }
    table.default.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn pinned_then_domain_then_default_per_protocol() {
        let text = r#"
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
            [[backend]]
            name = "s"
            protocol = "smtp"
            address = "127.0.0.1:4"
            [routing.imap]
            default = "a"
            domains = { "Example.ORG" = "b" }
            [routing.smtp]
            default = "s"
        "#;
        let cfg = Config::parse(Path::new("/tmp/t.toml"), text).unwrap();
        let r = |p, u, pins: &[&str]| {
            let pins: Vec<String> = pins.iter().map(|s| s.to_string()).collect();
            route(&cfg, p, u, &pins).map(|b| b.name.clone())
        };
        assert_eq!(r(Protocol::Imap, "x@example.org", &[]).as_deref(), Some("b"));
        assert_eq!(r(Protocol::Imap, "x@EXAMPLE.org", &[]).as_deref(), Some("b"));
        assert_eq!(r(Protocol::Imap, "x@example.net", &[]).as_deref(), Some("a"));
        assert_eq!(r(Protocol::Imap, "x", &["s", "c"]).as_deref(), Some("c"));
        assert_eq!(r(Protocol::Smtp, "x@example.org", &["c"]).as_deref(), Some("s"));
        assert_eq!(r(Protocol::Pop3, "x", &[]), None);
        // A route to a backend of another protocol is a config error.
        let bad =
            text.replace("[routing.smtp]\n            default = \"s\"", "[routing.smtp]\n            default = \"a\"");
        let e = Config::parse(Path::new("/tmp/t.toml"), &bad).unwrap_err();
        assert_eq!(e.field, "routing.smtp.default");
    }
}
