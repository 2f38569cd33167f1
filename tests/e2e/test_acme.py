"""ACME end to end with Pebble: issuance over HTTP-01, TLS-ALPN-01 and DNS-01, an IMAPS client
verifying the issued certificate against Pebble's root, forced renewal under a running session,
a CA outage, a restart that reuses the stored account and certificate, and an order stopped by
a reload that still removes its DNS record.
"""

import os
import re
import socket
import ssl
import stat
import subprocess
import time

import pytest

from acme_servers import DNS_HOOK, Pebble
from conftest import DEMO
from servers import Portcullis, dovecot_imap_route, free_port, metric_value, portcullis_binary, scrape_metrics, wait_for

NAME = "mail.example.test"


def acme_config(pebble, tmp, challenge, imaps_port, admin_port, dovecot, extra=""):
    return f"""
[admin]
bind = "127.0.0.1:{admin_port}"

[tls]
self_signed_names = ["localhost"]

[[listener]]
name = "imaps"
bind = "127.0.0.1:{imaps_port}"
protocol = "imap"
tls = "implicit"

[auth]
source = "backend"

{dovecot_imap_route(dovecot)}
[acme]
directory = "{pebble.directory}"
ca_file = "{pebble.ca}"
terms_agreed = true
contact = ["mailto:ops@example.test"]
state_dir = "{tmp}/acme-state"
retry_min = "1s"
{challenge}
{extra}

[[acme.certificate]]
names = ["{NAME}"]
"""


def served_certificate(port, root_pem, tmp):
    """The certificate the proxy serves for NAME, verified against Pebble's root."""
    root = os.path.join(tmp, f"root-{time.monotonic_ns()}.pem")
    with open(root, "wb") as f:
        f.write(root_pem)
    ctx = ssl.create_default_context(cafile=root)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=NAME) as s:
            assert s.recv(100).startswith(b"* OK")
            return s.getpeercert(binary_form=True)


def serial(der):
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"], input=der, capture_output=True, check=True)
    return out.stdout.strip()


@pytest.fixture
def pebble(tmp_path):
    p = Pebble(str(tmp_path), http_port=free_port(), tls_port=free_port()).start()
    try:
        yield p
    finally:
        p.stop()


def start(pebble, tmp_path, dovecot, challenge, extra=""):
    imaps, admin = free_port(), free_port()
    cfg = acme_config(pebble, tmp_path, challenge, imaps, admin, dovecot, extra)
    pc = Portcullis(str(tmp_path), cfg).start(wait_port=imaps, tls=True)
    pc.imaps = imaps
    return pc


def issued(pc, count=1, timeout=30.0):
    return wait_for(lambda: pc.log().count("ACME: certificate issued and stored") >= count, timeout=timeout)


@pytest.mark.parametrize("kind", ["http-01", "tls-alpn-01", "dns-01"])
def test_issuance_and_verified_handshake(kind, pebble, tmp_path, dovecot):
    if kind == "http-01":
        challenge = f'challenge = "http-01"\nhttp01_bind = "127.0.0.1:{pebble.http_port}"'
    elif kind == "tls-alpn-01":
        challenge = f'challenge = "tls-alpn-01"\ntls_alpn01_bind = "127.0.0.1:{pebble.tls_port}"'
    else:
        hook = tmp_path / "dns-hook"
        hook.write_text(DNS_HOOK % pebble.dns_mgmt_port)
        hook.chmod(0o755)
        challenge = f'challenge = "dns-01"\ndns01_hook = "{hook}"\ndns01_propagation = "100ms"'
    pc = start(pebble, tmp_path, dovecot, challenge)
    try:
        assert issued(pc), pc.log() + pebble.log()
        der = served_certificate(pc.imaps, pebble.issuing_root(), str(tmp_path))
        assert der
        assert f"challenge=\"{kind}\"" in pc.log() or f"challenge={kind}" in pc.log()
        # Account and key files are private.
        state = tmp_path / "acme-state"
        for f in [state / "account.json", state / "certs" / f"{NAME}.key", state / "certs" / f"{NAME}.pem"]:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        pc.stop()


def test_an_ecdsa_and_an_rsa_certificate_for_the_same_names(pebble, tmp_path, dovecot):
    """Two [[acme.certificate]] for the same names, ECDSA and RSA, over tls-alpn-01 (whose
    challenge certificate is served by name, so the two orders take turns): both are issued,
    stored under their own labels (the RSA one `NAME+rsa`), and each client gets the one it can
    use, verified against Pebble's root, with SNI and without."""
    challenge = f'challenge = "tls-alpn-01"\ntls_alpn01_bind = "127.0.0.1:{pebble.tls_port}"'
    rsa = f'\n[[acme.certificate]]\nnames = ["{NAME}"]\nkey_type = "rsa-2048"\n'
    imaps, admin = free_port(), free_port()
    cfg = acme_config(pebble, tmp_path, challenge, imaps, admin, dovecot) + rsa
    pc = Portcullis(str(tmp_path), cfg).start(wait_port=imaps, tls=True)
    try:
        assert issued(pc, count=2, timeout=60), pc.log() + pebble.log()
        state = tmp_path / "acme-state" / "certs"
        assert (state / f"{NAME}.pem").exists() and (state / f"{NAME}+rsa.pem").exists(), os.listdir(state)
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(pebble.issuing_root())

        def served(*args):
            out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{imaps}", "-CAfile", str(root),
                                  "-verify_return_error", *args], input=b"", capture_output=True, timeout=15)
            text = out.stdout.decode(errors="replace")
            assert "Verify return code: 0 (ok)" in text, text + out.stderr.decode(errors="replace")
            key = re.search(r"Server public key is (\d+) bit", text)
            return {"256": "ECDSA", "2048": "RSA"}[key.group(1)]

        assert served("-servername", NAME) == "ECDSA"
        assert served("-servername", NAME, "-sigalgs", "RSA-PSS+SHA256:RSA+SHA256") == "RSA"
        assert served("-servername", NAME, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256") == "RSA"
        # No SNI: the pair stands in for the self-signed default.
        assert served("-noservername", "-sigalgs", "RSA-PSS+SHA256:RSA+SHA256", "-verify_hostname", NAME) == "RSA"
        text = metrics(pc)
        assert f'certificate="{NAME}+rsa"' in text and f'certificate="{NAME}"' in text, text
    finally:
        pc.stop()


def test_a_file_certificate_keeps_its_expiry_series_beside_an_acme_one(pebble, tmp_path, dovecot):
    """An RSA file beside an ACME (ECDSA) certificate with the same label: once the CA has
    issued, each has its own expiry series, the file's as `NAME (file)`; the install used to
    write the ACME expiry over the file's, which then went unwatched."""
    key, cert = tmp_path / "rsa.key", tmp_path / "rsa.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-subj", f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME}", "-days", "30"],
                   check=True, capture_output=True)
    end = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-enddate"], check=True, capture_output=True, text=True)
    import calendar
    file_expiry = calendar.timegm(time.strptime(end.stdout.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y %Z"))
    challenge = f'challenge = "http-01"\nhttp01_bind = "127.0.0.1:{pebble.http_port}"'
    files = f'\n[[tls.certificate]]\nnames = ["{NAME}"]\ncert = "{cert}"\nkey = "{key}"\n'
    imaps, admin = free_port(), free_port()
    cfg = acme_config(pebble, tmp_path, challenge, imaps, admin, dovecot).replace("[[listener]]", files + "\n[[listener]]", 1)
    pc = Portcullis(str(tmp_path), cfg).start(wait_port=imaps, tls=True)
    try:
        assert issued(pc), pc.log() + pebble.log()
        page = metrics(pc)
        series = f'portcullis_certificate_not_after_timestamp_seconds{{certificate="{NAME} (file)"}}'
        assert metric_value(page, series) == file_expiry, page
        acme = metric_value(page, f'portcullis_certificate_not_after_timestamp_seconds{{certificate="{NAME}"}}')
        assert acme and acme != file_expiry, page
    finally:
        pc.stop()


def test_bad_nonces_fail_the_order_and_the_proxy_keeps_serving(tmp_path, dovecot):
    """Reliability case 79: Pebble refuses every nonce (badNonce). The ACME client retries each
    request with the fresh nonce it is given, then the order fails; the proxy keeps serving the
    certificate it has (here its self-signed one), says why, counts the error and retries."""
    p = Pebble(str(tmp_path), http_port=free_port(), tls_port=free_port(), nonce_reject=100).start()
    try:
        pc = start(p, tmp_path, dovecot, f'challenge = "http-01"\nhttp01_bind = "127.0.0.1:{p.http_port}"')
        try:
            assert wait_for(lambda: "ACME: will retry" in pc.log(), timeout=30), pc.log()
            assert "badNonce" in pc.log(), pc.log()
            assert "ACME: certificate issued" not in pc.log()
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", pc.imaps), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=NAME) as s:
                    assert s.recv(100).startswith(b"* OK")
            page = metrics(pc)
            assert metric_value(page, 'portcullis_acme_orders_total{result="error"}') >= 1, page
            assert metric_value(page, f'portcullis_acme_consecutive_failures{{certificate="{NAME}"}}') >= 1, page
        finally:
            pc.stop()
    finally:
        p.stop()


def issued_over_http01(pebble, tmp_path, dovecot):
    """A proxy ordering over HTTP-01, once its first certificate is in: (the proxy, Pebble's
    root, the serial it serves). Stopped here if that fails."""
    challenge = f'challenge = "http-01"\nhttp01_bind = "127.0.0.1:{pebble.http_port}"'
    pc = start(pebble, tmp_path, dovecot, challenge)
    try:
        assert issued(pc), pc.log()
        root = pebble.issuing_root()
        return pc, root, serial(served_certificate(pc.imaps, root, str(tmp_path)))
    except BaseException:
        pc.stop()
        raise


def renew(pc):
    """`portcullis renew NAME`, which talks to the running process."""
    out = subprocess.run([portcullis_binary(), "renew", "--config", pc.config, NAME], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_renewal_swaps_under_a_running_session_and_outage_keeps_serving(pebble, tmp_path, dovecot):
    pc, root, first = issued_over_http01(pebble, tmp_path, dovecot)
    try:
        # An IMAP session logged in through the proxy.
        ctx = ssl.create_default_context(cafile=None)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        import imaplib
        session = imaplib.IMAP4_SSL("127.0.0.1", pc.imaps, ssl_context=ctx)
        session.login(*DEMO)
        session.select("INBOX")
        renew(pc)
        assert issued(pc, count=2), pc.log()
        second = serial(served_certificate(pc.imaps, root, str(tmp_path)))
        assert second != first
        assert session.noop()[0] == "OK" and session.select("INBOX")[0] == "OK"
        session.logout()
        assert metric_value(metrics(pc), f'portcullis_acme_consecutive_failures{{certificate="{NAME}"}}') == 0
        # The CA goes away: a forced renewal fails, the proxy keeps serving and retries.
        pebble.stop_pebble()
        before = pc.log().count("ACME: order failed")
        os.kill(pc.proc.pid, 10)  # SIGUSR1: renew everything now
        assert wait_for(lambda: pc.log().count("ACME: order failed") > before, timeout=20), pc.log()
        assert serial(served_certificate(pc.imaps, root, str(tmp_path))) == second
        assert wait_for(lambda: "ACME: will retry" in pc.log())
        page = metrics(pc)
        assert metric_value(page, 'portcullis_acme_orders_total{result="error"}') >= 1, page
        assert metric_value(page, f'portcullis_acme_consecutive_failures{{certificate="{NAME}"}}') >= 1, page
    finally:
        pc.stop()


def test_a_certificate_issued_but_not_stored_is_served(pebble, tmp_path, dovecot):
    """The CA has issued a certificate the proxy cannot write (here its file's place is taken by
    a directory; a full disk in practice): it is served all the same, and the order counts as
    done, not failed and ordered again and again (Let's Encrypt allows five certificates for
    the same names a week)."""
    pc, root, first = issued_over_http01(pebble, tmp_path, dovecot)
    try:
        pem = tmp_path / "acme-state" / "certs" / f"{NAME}.pem"
        pem.unlink()
        pem.mkdir()
        renew(pc)
        assert wait_for(lambda: "ACME: certificate issued but not stored" in pc.log(), timeout=30), pc.log()
        second = serial(served_certificate(pc.imaps, root, str(tmp_path)))
        assert second != first
        time.sleep(2.5)  # retry_min is 1 s: a failed order would have been ordered again by now
        assert pc.log().count("ACME: ordering") == 2, pc.log()
        assert "ACME: order failed" not in pc.log(), pc.log()
        assert metric_value(metrics(pc), f'portcullis_acme_consecutive_failures{{certificate="{NAME}"}}') == 0
    finally:
        pc.stop()


def metrics(pc):
    admin = next(l.split('"')[1] for l in open(pc.config).read().splitlines() if l.startswith("bind = \"127.0.0.1:") and "imaps" not in l)
    return scrape_metrics(admin.rsplit(":", 1)[1])


def test_restart_reuses_account_and_certificate(pebble, tmp_path, dovecot):
    challenge = f'challenge = "http-01"\nhttp01_bind = "127.0.0.1:{pebble.http_port}"'
    pc = start(pebble, tmp_path, dovecot, challenge)
    try:
        assert issued(pc), pc.log()
        first = serial(served_certificate(pc.imaps, pebble.issuing_root(), str(tmp_path)))
    finally:
        pc.stop()
    log_before = pc.log()
    pc.start(wait_port=pc.imaps, tls=True)
    try:
        assert wait_for(lambda: "ACME: using the stored certificate" in pc.log()[len(log_before):]), pc.log()
        time.sleep(1.0)
        restarted = pc.log()[len(log_before):]
        assert "ACME: ordering" not in restarted, restarted
        assert serial(served_certificate(pc.imaps, pebble.issuing_root(), str(tmp_path))) == first
    finally:
        pc.stop()


def recording_dns_hook(pebble, tmp_path):
    """A DNS-01 hook that also appends "ACTION NAME" to a file; (challenge config, that file)
    with a propagation wait long enough to interrupt."""
    calls = tmp_path / "hook-calls"
    hook = tmp_path / "dns-hook"
    hook.write_text(
        DNS_HOOK % pebble.dns_mgmt_port
        + f"with open({str(calls)!r}, 'a') as f:\n    f.write(action + ' ' + name + '\\n')\n"
    )
    hook.chmod(0o755)
    return f'challenge = "dns-01"\ndns01_hook = "{hook}"\ndns01_propagation = "60s"', calls


def test_an_order_stopped_by_a_reload_removes_its_dns_record(pebble, tmp_path, dovecot):
    """A reload that changes [acme] while an order waits for its DNS record to propagate: the
    old order is given up, and its record is removed before the new settings order again."""
    slow, calls = recording_dns_hook(pebble, tmp_path)
    imaps, admin = free_port(), free_port()
    pc = Portcullis(str(tmp_path), acme_config(pebble, tmp_path, slow, imaps, admin, dovecot)).start(wait_port=imaps, tls=True)
    try:
        record = f"add _acme-challenge.{NAME}"
        assert wait_for(lambda: calls.exists() and record in calls.read_text(), timeout=30), pc.log()
        fast = slow.replace('"60s"', '"100ms"')
        pc.write_config(acme_config(pebble, tmp_path, fast, imaps, admin, dovecot))
        assert issued(pc, timeout=40), pc.log() + pebble.log()
        seen = calls.read_text().split()
        actions = seen[0::2]
        # add (old order), remove (old order, given up), add and remove (the new order).
        assert actions[:4] == ["add", "remove", "add", "remove"], seen
        assert "configuration reloaded" in pc.log()
    finally:
        pc.stop()


def test_a_renewal_asked_during_an_order_is_answered_by_it(pebble, tmp_path, dovecot):
    """SIGUSR1 (renew now) while an order waits for its DNS record: that order answers it. A
    second order straight after would be another certificate against the CA's duplicate limit."""
    slow, calls = recording_dns_hook(pebble, tmp_path)
    slow = slow.replace('"60s"', '"2s"')
    imaps, admin = free_port(), free_port()
    pc = Portcullis(str(tmp_path), acme_config(pebble, tmp_path, slow, imaps, admin, dovecot)).start(wait_port=imaps, tls=True)
    try:
        assert wait_for(lambda: calls.exists() and f"add _acme-challenge.{NAME}" in calls.read_text(), timeout=30), pc.log()
        os.kill(pc.proc.pid, 10)  # SIGUSR1, during the order's 2 s propagation wait
        assert issued(pc, timeout=40), pc.log() + pebble.log()
        time.sleep(3.0)
        assert pc.log().count("ACME: ordering") == 1, pc.log()
        assert pc.log().count("ACME: certificate issued and stored") == 1, pc.log()
    finally:
        pc.stop()


def test_shutdown_during_an_order_removes_its_dns_record(pebble, tmp_path, dovecot):
    slow, calls = recording_dns_hook(pebble, tmp_path)
    imaps, admin = free_port(), free_port()
    pc = Portcullis(str(tmp_path), acme_config(pebble, tmp_path, slow, imaps, admin, dovecot)).start(wait_port=imaps, tls=True)
    try:
        assert wait_for(lambda: calls.exists() and f"add _acme-challenge.{NAME}" in calls.read_text(), timeout=30), pc.log()
    finally:
        pc.stop()
    assert pc.proc.returncode == 0, pc.log()
    assert calls.read_text().split()[0::2] == ["add", "remove"], calls.read_text()
