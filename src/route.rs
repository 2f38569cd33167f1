//! Which backend serves a user: the backend named in the user's entry, else the user's domain's
//! backend, else the default. Pure lookups over one config snapshot.

use std::sync::Arc;

use crate::config::{Backend, Config};

pub fn route(config: &Config, user: &str, pinned: Option<&str>) -> Option<Arc<Backend>> {
    if let Some(name) = pinned {
        return config.backends.get(name).cloned();
    }
    if let Some((_, domain)) = user.rsplit_once('@')
        && let Some(b) = config.routing.domains.get(&domain.to_ascii_lowercase())
    {
        return Some(b.clone());
    }
    config.routing.default.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn pinned_then_domain_then_default() {
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
            [routing]
            default = "a"
            domains = { "Example.ORG" = "b" }
        "#;
        let cfg = Config::parse(Path::new("/tmp/t.toml"), text).unwrap();
        assert_eq!(route(&cfg, "x@example.org", None).unwrap().name, "b");
        assert_eq!(route(&cfg, "x@EXAMPLE.org", None).unwrap().name, "b");
        assert_eq!(route(&cfg, "x@example.net", None).unwrap().name, "a");
        assert_eq!(route(&cfg, "x", Some("c")).unwrap().name, "c");
    }
}
