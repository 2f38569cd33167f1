//! The shipped configuration files stay valid.

use std::path::Path;

#[test]
fn quickstart_config_passes_check() {
    portcullis::tls::init_crypto();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let c = portcullis::app::check(&root.join("config/quickstart.toml")).unwrap();
    let names: Vec<_> = c.listeners.iter().map(|l| (l.name.as_str(), l.bind[0].to_string())).collect();
    // The quickstart's ports are a contract with the README and users.
    let expected = [
        ("imaps", "127.0.0.1:10993"),
        ("imap", "127.0.0.1:10143"),
        ("pop3s", "127.0.0.1:10995"),
        ("pop3", "127.0.0.1:10110"),
        ("submissions", "127.0.0.1:10465"),
        ("submission", "127.0.0.1:10587"),
    ];
    assert_eq!(names, expected.iter().map(|(n, a)| (*n, a.to_string())).collect::<Vec<_>>());
    // So are the backends `scripts/quickstart` starts, the admin server and the demo user.
    let mut backends: Vec<_> = c.backends.values().map(|b| (b.protocol.as_str(), b.address.as_str())).collect();
    backends.sort();
    assert_eq!(backends, [("imap", "127.0.0.1:20143"), ("pop3", "127.0.0.1:20110"), ("smtp", "127.0.0.1:20587")]);
    assert_eq!(c.admin, Some("127.0.0.1:10080".parse().unwrap()));
    let portcullis::config::AuthSource::PasswdFile { users, .. } = &c.auth else { panic!("not a users file") };
    let demo = users.get("demo@example.test").expect("no demo user");
    assert!(demo.hash.verify(b"demo") && !demo.hash.verify(b"demo2"));
}

#[test]
fn reference_config_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("config/portcullis.toml")).unwrap();
    std::fs::write(dir.path().join("users"), "u@example.org:{PLAIN}x\n").unwrap();
    let c = portcullis::config::Config::parse(&dir.path().join("portcullis.toml"), &text).unwrap();
    assert_eq!(c.listeners.len(), 6);
    assert_eq!(c.backends.len(), 4);
    assert_eq!(c.tls.certificates.len(), 2);
}

/// A certificate file that cannot be used is reported at the line that names it, like every
/// other config error.
#[test]
fn a_missing_certificate_file_is_named_at_its_line() {
    portcullis::tls::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let text = "[auth]\nsource = \"backend\"\n\n[[tls.certificate]]\ncert = \"nowhere.pem\"\nkey = \"nowhere.key\"\nnames = [\"mail.example.org\"]\n\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:143\"\n[routing.imap]\ndefault = \"b\"\n";
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    let e = portcullis::app::check(&path).unwrap_err().to_string();
    let expected = format!("{}:5:8: field `tls.certificate[0].cert`", path.display());
    assert!(e.starts_with(&expected), "{e}");
    assert!(e.contains("nowhere.pem"), "{e}");
}

/// A backend's CA file that cannot be read is reported at its line too.
#[test]
fn a_missing_backend_ca_file_is_named_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[auth]\nsource = \"backend\"\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:993\"\ntransport = \"tls\"\ntls_server_name = \"mail.example.org\"\ntls_ca_file = \"missing-ca.pem\"\n[routing.imap]\ndefault = \"b\"\n";
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    let e = portcullis::config::Config::load(&path).unwrap_err();
    assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("backend[0].tls_ca_file", Some(8)), "{e}");
}

/// A user pinned to a backend that does not exist is reported at the user's line.
#[test]
fn a_user_pinned_to_an_unknown_backend_is_named_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("users"),
        "# users\na@example.org:{PLAIN}x::::::backend=b\nc@example.org:{PLAIN}y::::::backend=nope\n",
    )
    .unwrap();
    let text = "[auth]\npasswd_file = \"users\"\n\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:143\"\n[routing.imap]\ndefault = \"b\"\n";
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    let e = portcullis::config::Config::parse(&path, text).unwrap_err().to_string();
    let expected = format!("{}:3:1: field `backend`", dir.path().join("users").display());
    assert!(e.starts_with(&expected), "{e}");
    assert!(e.contains("\"nope\""), "{e}");
}

/// An ACME state directory the proxy cannot write (here under a regular file; in life a
/// read-only file system or another user's directory) fails `check` at its line, not `run`
/// later when ACME starts.
#[test]
fn an_unwritable_acme_state_dir_fails_check_at_its_line() {
    portcullis::tls::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let text = "[auth]\nsource = \"backend\"\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:143\"\n[routing.imap]\ndefault = \"b\"\n\
                [acme]\ndirectory = \"https://127.0.0.1:14000/dir\"\nterms_agreed = true\nstate_dir = \"file/acme\"\n\
                [[acme.certificate]]\nnames = [\"mail.example.org\"]\n";
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    let e = portcullis::app::check(&path).unwrap_err().to_string();
    let expected = format!("{}:11:1: field `acme.state_dir`", path.display());
    assert!(e.starts_with(&expected), "{e}");
    // Writable: it passes, creating nothing and leaving nothing behind.
    std::fs::write(&path, text.replace("file/acme", "state/acme")).unwrap();
    portcullis::app::check(&path).unwrap();
    assert!(!dir.path().join("state").exists());
    let mut left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["file", "p.toml"]);
}

/// Errors found after parsing (building a backend's TLS context, say) name the entry as the
/// parser does, at its line.
#[test]
fn errors_after_parsing_name_the_entry_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[[backend]]\nname = \"a\"\naddress = \"127.0.0.1:143\"\n\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:993\"\ntransport = \"tls\"\n";
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    let e = portcullis::config::entry_error(&path, "backend", "b", "transport", "no roots".into());
    assert_eq!((e.field.as_str(), e.position), ("backend[1].transport", Some((8, 1))), "{e}");
    let e = portcullis::config::entry_error(&path, "backend", "a", "transport", "no roots".into());
    assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("backend[0].transport", Some(1)), "{e}");
}
