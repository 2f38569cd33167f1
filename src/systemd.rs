//! systemd `Type=notify` support: `READY=1`, `RELOADING=1`, `STOPPING=1` to `$NOTIFY_SOCKET`.
//! A no-op when not started by systemd.

use std::os::unix::net::UnixDatagram;

/// Send one state line to the service manager, if there is one.
pub fn notify(state: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        notify_to(&path, state);
    }
}

fn notify_to(path: &std::ffi::OsStr, state: &str) {
    let Ok(sock) = UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket name (Linux).
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), path)
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `RELOADING=1` needs a monotonic timestamp since systemd 253 (`MONOTONIC_USEC`).
pub fn reloading() {
    let usec = nix_monotonic_usec();
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

fn nix_monotonic_usec() -> u128 {
    // CLOCK_MONOTONIC as seen by /proc/uptime is close enough for systemd's ordering check.
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|f| f.parse::<f64>().ok()))
        .map_or(0, |secs| (secs * 1_000_000.0) as u128)
}

#[cfg(test)]
mod tests {
    #[test]
    fn notifies_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        super::notify_to(path.as_os_str(), "READY=1");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
