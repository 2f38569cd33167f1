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

fn nix_monotonic_usec() -> u64 {
    std::fs::read_to_string("/proc/uptime").ok().and_then(|s| usec_not_before_monotonic(&s)).unwrap_or(0)
}

/// From /proc/uptime, a time in microseconds that is not before CLOCK_MONOTONIC's now, which
/// systemd compares with when it asked for the reload: uptime is CLOCK_BOOTTIME (monotonic
/// plus time suspended, never less) cut to hundredths, so the next hundredth is never early.
fn usec_not_before_monotonic(uptime: &str) -> Option<u64> {
    let (secs, hundredths) = uptime.split_whitespace().next()?.split_once('.')?;
    let (secs, hundredths) = (secs.parse::<u64>().ok()?, hundredths.parse::<u64>().ok()?);
    Some(secs * 1_000_000 + (hundredths + 1) * 10_000)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_reload_timestamp_is_rounded_up() {
        assert_eq!(super::usec_not_before_monotonic("12345.67 9876.54\n"), Some(12_345_680_000));
        assert_eq!(super::usec_not_before_monotonic("7.99 1.00"), Some(8_000_000));
        assert_eq!(super::usec_not_before_monotonic("nonsense"), None);
    }
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
