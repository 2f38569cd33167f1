"""End-to-end IMAP: the real portcullis binary in front of a real Dovecot, driven by real clients
(imaplib, curl, openssl s_client, raw sockets). All on 127.0.0.1 high ports; clients connect
from 127.0.0.2 so the address Dovecot logs proves the proxy forwarded the client's address.

Run: python3 -m pytest tests/e2e -v
"""

import base64
import hashlib
import imaplib
import os
import re
import shutil
import signal
import ssl
import subprocess
import time

import pytest

from conftest import DEAD, DEMO, DRIFT, HAPROXY, MASTER, QUOTED, WEIRD, ProxySetup, start_proxy, write_users_file
from servers import (
    CLIENT_IP,
    IMAP4From,
    IMAP4SSLFrom,
    RawClient,
    client_tls_context,
    free_port,
    metric_value,
    portcullis_binary,
    scrape_metrics,
    wait_for,
    wait_greeting,
)


def login_line_for(dovecot, rport, timeout=5.0):
    """The Dovecot `Login:` line whose client port is `rport` (waits for the log to catch up)."""
    found = wait_for(lambda: [l for l in dovecot.logins() if l.get("rport") == str(rport)], timeout)
    assert found, f"no Dovecot Login line with rport={rport}:\n{dovecot.info_log()}"
    assert len(found) == 1, found
    return found[0]


def login_raw(user, password):
    """LOGIN with the password as a synchronising literal (it may hold any byte but CR/LF/NUL)."""

    def do(m):
        m.literal = password.encode("utf-8")
        typ, data = m._simple_command("LOGIN", m._quote(user))
        if typ == "OK":
            m.state = "AUTH"
        return typ, data

    return do


def logout_cleanly(m, tag=b"ZZ"):
    """LOGOUT and read everything up to the server's close: `* BYE`, then the tagged OK, then
    EOF. (imaplib's logout() stops at the BYE and cannot tell a clean end from an abort.)"""
    m.send(tag + b" LOGOUT\r\n")
    lines = []
    while True:
        line = m.readline()
        if not line:
            break
        lines.append(line)
    m.shutdown()
    assert lines and lines[0].startswith(b"* BYE"), lines
    assert lines[-1].startswith(tag + b" OK"), lines
    return lines


def plain(user, password):
    return lambda _challenge: b"\0" + user.encode() + b"\0" + password.encode("utf-8")


def portcullis_check(path):
    return subprocess.run(
        [portcullis_binary(), "check", "--config", path], capture_output=True, text=True, timeout=30
    )


# --- environment -------------------------------------------------------------------------------


def test_real_tools_installed():
    """The suite needs real servers and clients; their absence is a failure, never a skip."""
    assert shutil.which("dovecot") or os.path.exists("/usr/sbin/dovecot"), "dovecot-imapd is not installed"
    assert shutil.which("curl"), "curl is not installed"
    assert shutil.which("openssl"), "openssl is not installed"
    assert os.access(portcullis_binary(), os.X_OK)


# --- 1. implicit TLS login, select, fetch ------------------------------------------------------


def test_imaps_login_select_fetch(proxy, dovecot):
    """LOGIN, SELECT, FETCH over implicit TLS; Dovecot sees the client's address (rip=127.0.0.2),
    the client's port and the proxy's session id (forwarded with IMAP ID)."""
    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps)
    rport = m.sock.getsockname()[1]
    assert m.sock.version() in ("TLSv1.2", "TLSv1.3")
    typ, _ = m.login(*DEMO)
    assert typ == "OK"
    typ, data = m.select("INBOX")
    assert (typ, data) == ("OK", [dovecot.inbox_count(*DEMO)])
    typ, data = m.uid("FETCH", "1", "(BODY.PEEK[])")
    assert typ == "OK"
    assert data[0][1] == dovecot.small_message
    logout_cleanly(m)

    line = login_line_for(dovecot, rport)
    assert line["user"] == DEMO[0]
    assert line["rip"] == CLIENT_IP
    assert line["lip"] == "127.0.0.1"
    assert line["lport"] == str(proxy.imaps)
    # The session id Dovecot logs is the one in the proxy's access log line for this client.
    access = wait_for(lambda: [l for l in proxy.log().splitlines() if f"client={CLIENT_IP}:{rport} " in l])
    assert access and 'phase="relay"' in access[0] and f"user={DEMO[0]} " in access[0], proxy.log()
    # How the client logged in, for deciding when an old TLS version can go.
    assert 'mechanism="login" tls_version="TLSv1_3" tls_cipher="TLS13_' in access[0], access[0]
    access = re.search(r"session end session=(\S+) ", access[0])
    assert line["session"] == access.group(1)


# --- 2. STARTTLS listener ----------------------------------------------------------------------


def test_starttls_capabilities_and_login(proxy, dovecot):
    """Before TLS: STARTTLS and LOGINDISABLED, no AUTH=, and LOGIN/AUTHENTICATE are refused
    (reliability cases 6, 7). After STARTTLS the capabilities are new (case 5) and login works."""
    m = IMAP4From("127.0.0.1", proxy.imap, timeout=10)
    caps = m.capabilities
    assert "STARTTLS" in caps and "LOGINDISABLED" in caps, caps
    assert not [c for c in caps if c.startswith("AUTH=")], caps
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        m.login(*DEMO)
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        m.authenticate("PLAIN", plain(*DEMO))
    assert m.noop()[0] == "OK"

    typ, _ = m.starttls(ssl_context=client_tls_context())
    assert typ == "OK"
    caps = m.capabilities  # imaplib asks again after the upgrade
    assert "AUTH=PLAIN" in caps, caps
    assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps, caps
    rport = m.sock.getsockname()[1]
    typ, _ = m.login(*DEMO)
    assert typ == "OK"
    assert m.select("INBOX") == ("OK", [dovecot.inbox_count(*DEMO)])
    m.logout()
    line = login_line_for(dovecot, rport)
    assert (line["user"], line["rip"]) == (DEMO[0], CLIENT_IP)


def test_starttls_refused_on_implicit_tls(proxy):
    """STARTTLS on an implicit-TLS port is a tagged BAD, never nested TLS (reliability case 3)."""
    c = RawClient(proxy.imaps, tls=True)
    assert c.line().startswith(b"* OK [CAPABILITY ")
    c.send(b"s1 STARTTLS\r\ns2 NOOP\r\n")
    assert c.until_tagged(b"s1")[-1].startswith(b"s1 BAD")
    assert c.until_tagged(b"s2") == [b"s2 OK NOOP completed.\r\n"]
    c.close()


def test_starttls_after_login_goes_nowhere(proxy, dovecot):
    """STARTTLS after LOGIN (reliability case 4) is refused, and the session goes on: once
    relayed it is the backend's to answer, and Dovecot refuses it in the authenticated state."""
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    c.send(b"a LOGIN " + DEMO[0].encode() + b" " + DEMO[1].encode() + b"\r\n")
    assert c.until_tagged(b"a")[-1].startswith(b"a OK")
    c.send(b"s STARTTLS\r\n")
    assert c.until_tagged(b"s")[-1].startswith(b"s BAD")
    c.send(b"n NOOP\r\n")
    assert c.until_tagged(b"n")[-1].startswith(b"n OK")
    c.close()


# --- 3. AUTHENTICATE and awkward passwords -----------------------------------------------------


def test_authenticate_plain(proxy, dovecot):
    """AUTHENTICATE PLAIN with a continuation (imaplib), then a SELECT through the backend."""
    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps)
    rport = m.sock.getsockname()[1]
    typ, _ = m.authenticate("PLAIN", plain(*DEMO))
    assert typ == "OK"
    assert m.select("INBOX") == ("OK", [dovecot.inbox_count(*DEMO)])
    m.logout()
    assert login_line_for(dovecot, rport)["user"] == DEMO[0]


def test_authenticate_plain_initial_response_and_login_mechanism(proxy):
    """AUTHENTICATE PLAIN with SASL-IR and AUTHENTICATE LOGIN (reliability case 41)."""
    import base64

    ir = base64.b64encode(b"\0" + DEMO[0].encode() + b"\0" + DEMO[1].encode())
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    c.send(b"a AUTHENTICATE PLAIN " + ir + b"\r\n")
    assert c.until_tagged(b"a")[-1].startswith(b"a OK")
    c.send(b"b NOOP\r\n")
    assert c.until_tagged(b"b")[-1].startswith(b"b OK")
    c.close()

    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps)
    challenges = []

    def login_mech(challenge):
        challenges.append(challenge)
        return DEMO[0] if challenge == b"Username:" else DEMO[1]

    typ, _ = m.authenticate("LOGIN", login_mech)
    assert typ == "OK"
    assert challenges == [b"Username:", b"Password:"]
    assert m.select("INBOX")[0] == "OK"
    m.logout()


def test_weird_password_login_and_authenticate(proxy, dovecot):
    """A password with quotes, a backslash, spaces and UTF-8: LOGIN with a literal (reliability
    case 30) and AUTHENTICATE PLAIN both work, so the proxy re-encodes it exactly once for the
    backend (case 33)."""
    user, password = WEIRD
    assert '"' in password and "\\" in password and " " in password and "\u00f6" in password

    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps)
    rport = m.sock.getsockname()[1]
    typ, data = login_raw(user, password)(m)
    assert typ == "OK", data
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    assert login_line_for(dovecot, rport)["user"] == user

    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps)
    rport = m.sock.getsockname()[1]
    typ, _ = m.authenticate("PLAIN", plain(user, password))
    assert typ == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    assert login_line_for(dovecot, rport)["user"] == user


def test_quoted_string_escapes(proxy, dovecot):
    """LOGIN with a quoted-string password holding `\\"` and `\\\\` escapes (reliability case 33):
    imaplib escapes it, the proxy must unescape once and re-escape for Dovecot."""
    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps)
    rport = m.sock.getsockname()[1]
    typ, _ = m.login(*QUOTED)
    assert typ == "OK"
    m.logout()
    assert login_line_for(dovecot, rport)["user"] == QUOTED[0]


# --- 4. curl -----------------------------------------------------------------------------------


def curl(url, *extra, user=DEMO):
    out = subprocess.run(
        ["curl", "-sS", "-k", "--max-time", "20", "-u", f"{user[0]}:{user[1]}", *extra, url],
        capture_output=True,
        timeout=30,
    )
    return out


def test_curl_imaps_fetch(proxy, dovecot):
    """curl fetches the small message over imaps://, also from --interface 127.0.0.2."""
    url = f"imaps://127.0.0.1:{proxy.imaps}/INBOX;UID=1"
    out = curl(url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == dovecot.small_message

    out = curl(url, "--interface", CLIENT_IP, "-w", "\nLOCAL %{local_ip}:%{local_port}\n")
    assert out.returncode == 0, out.stderr
    body, _, trailer = out.stdout.rpartition(b"\nLOCAL ")
    assert body == dovecot.small_message
    ip, port = trailer.decode().strip().split(":")
    assert ip == CLIENT_IP
    assert login_line_for(dovecot, port)["rip"] == CLIENT_IP


def test_curl_starttls_fetch(proxy, dovecot):
    """curl with --ssl-reqd upgrades the plain listener with STARTTLS, then fetches."""
    out = curl(f"imap://127.0.0.1:{proxy.imap}/INBOX;UID=1", "--ssl-reqd")
    assert out.returncode == 0, out.stderr
    assert out.stdout == dovecot.small_message


# --- 5. a large message ------------------------------------------------------------------------


def test_large_message_byte_identical(proxy, dovecot):
    """A 10 MB message comes through the relay byte for byte."""
    want = hashlib.sha256(dovecot.big_message).hexdigest()
    assert len(dovecot.big_message) >= 10 * 1024 * 1024 - 100
    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps, timeout=30)
    m.login(*DEMO)
    m.select("INBOX", readonly=True)
    typ, data = m.uid("FETCH", "2", "(BODY.PEEK[])")
    assert typ == "OK"
    got = data[0][1]
    assert len(got) == len(dovecot.big_message)
    assert hashlib.sha256(got).hexdigest() == want
    m.logout()


# --- 6. failed logins --------------------------------------------------------------------------


def test_wrong_password_never_reaches_backend(proxy, dovecot):
    """A wrong password gets NO [AUTHENTICATIONFAILED] after the failure delay, no connection to
    Dovecot is made, and the stable fail2ban line is logged (reliability case 63)."""
    stable = "login failed: rip=127.0.0.2 user=<demo@example.test> protocol=imap listener=imaps reason=bad_credentials"
    before_lines = proxy.log().count(stable)
    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps)
    # The proxy's connections to Dovecot open now (other tests' sessions may linger): Dovecot
    # logs a connection only when it ends, so one opened and held would not show in its log.
    to_dovecot = lambda: {k for k in proxy_tcp_timers(proxy.pc.proc.pid) if k[1] == dovecot.imap_port}  # noqa: E731
    before = dovecot.settled_log()
    open_before = to_dovecot()
    t0 = time.monotonic()
    typ, data = m._simple_command("LOGIN", DEMO[0], "not-the-password")
    elapsed = time.monotonic() - t0
    assert (typ, data) == ("NO", [b"[AUTHENTICATIONFAILED] Authentication failed."])
    assert elapsed >= 0.18, elapsed  # limits.auth_failure_delay = 200ms
    time.sleep(0.5)
    assert dovecot.log() == before, "the failed login touched Dovecot"
    assert to_dovecot() <= open_before, "the failed login opened a connection to Dovecot"
    assert m.noop()[0] == "OK"  # still usable
    # The same guess as a SASL response: neither it nor its base64 is logged either.
    sasl = base64.b64encode(b"\0" + DEMO[0].encode() + b"\0not-the-password-either")
    typ, _ = m._simple_command("AUTHENTICATE", "PLAIN", sasl.decode())
    assert typ == "NO"
    m.shutdown()
    assert wait_for(lambda: proxy.log().count(stable) == before_lines + 2), proxy.log()
    log = proxy.log()
    assert "not-the-password" not in log and sasl.decode() not in log


def test_unknown_user_same_answer(proxy, dovecot):
    """An unknown user is answered exactly like a wrong password."""
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    c.send(b"a LOGIN nobody@example.test whatever\r\n")
    assert c.until_tagged(b"a") == [b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"]
    c.send(b"b LOGIN demo@example.test wrong\r\n")
    assert c.until_tagged(b"b") == [b"b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"]
    c.close()
    assert wait_for(
        lambda: "login failed: rip=127.0.0.2 user=<nobody@example.test> protocol=imap listener=imaps reason=bad_credentials"
        in proxy.log()
    ), proxy.log()


def test_log_line_cannot_be_forged_by_user_name(proxy):
    """A user name carrying log syntax cannot forge fields of the fail2ban line (case 63)."""
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    c.send(b'a LOGIN "x> rip=6.6.6.6 user=<y" pw\r\n')
    assert c.until_tagged(b"a")[-1].startswith(b"a NO [AUTHENTICATIONFAILED]")
    c.close()
    log = wait_for(lambda: (lambda t: t if "login failed: rip=127.0.0.2 user=<->" in t else "")(proxy.log()))
    assert log, proxy.log()
    assert "rip=6.6.6.6" not in log


def test_too_many_failed_logins_close(proxy):
    """The third failed login on one connection is answered, then `* BYE` and close (case 44)."""
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    for tag in (b"a", b"b"):
        c.send(tag + b" LOGIN demo@example.test wrong\r\n")
        assert c.until_tagged(tag)[-1].startswith(tag + b" NO [AUTHENTICATIONFAILED]")
    c.send(b"c LOGIN demo@example.test wrong\r\n")
    rest = c.read_to_close()
    assert rest.startswith(b"c NO [AUTHENTICATIONFAILED]"), rest
    assert b"* BYE" in rest, rest


def test_backend_rejects_credentials(proxy, dovecot):
    """The proxy's users file accepts the password but Dovecot does not: the client gets the same
    NO [AUTHENTICATIONFAILED] as for a wrong password and stays in the proxy's pre-auth state (no
    half-open session; reliability case 45). The proxy had verified the password, so this is no
    guess: no fail2ban line (a whole office behind one address would be banned for the proxy's
    configuration), but an error line. (That it is not counted by the throttle, which this shared
    proxy runs without, is `backend_rejecting_verified_credentials_is_not_throttled` in
    tests/imap_proxy.rs.) Dovecot saw the attempt from the client's address."""
    # From an address of its own: Dovecot's auth penalty would slow later logins from 127.0.0.2.
    c = RawClient(proxy.imaps, tls=True, source="127.0.0.3")
    c.line()
    c.send(b"a LOGIN " + DRIFT[0].encode() + b" " + DRIFT[1].encode() + b"\r\n")
    assert c.until_tagged(b"a") == [b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"]
    c.send(b"b NOOP\r\n")
    assert c.until_tagged(b"b") == [b"b OK NOOP completed.\r\n"]  # the proxy's own NOOP reply
    c.close()
    refused = "the backend refused credentials the proxy had verified"
    assert wait_for(lambda: [l for l in proxy.log().splitlines() if refused in l and "drift@example.test" in l]), proxy.log()
    assert "login failed: rip=127.0.0.3" not in proxy.log()
    assert wait_for(lambda: "passwd-file(drift@example.test,127.0.0.3," in dovecot.info_log()), dovecot.info_log()


def test_client_cannot_spoof_originating_ip(proxy, dovecot):
    """A client's own ID claiming x-originating-ip/port is stripped: Dovecot logs the real client
    address and port (reliability case 50)."""
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    rport = c.sock.getsockname()[1]
    c.send(b'i ID ("x-originating-ip" "6.6.6.6" "x-originating-port" "1" "X-Connected-IP" "6.6.6.7" "name" "e2e")\r\n')
    assert c.until_tagged(b"i") == [b"* ID NIL\r\n", b"i OK ID completed.\r\n"]
    c.send(b"a LOGIN demo@example.test demo\r\n")
    assert c.until_tagged(b"a")[-1].startswith(b"a OK")
    c.send(b"z LOGOUT\r\n")
    c.until_tagged(b"z")
    c.close()
    line = login_line_for(dovecot, rport)
    assert (line["rip"], line["lip"]) == (CLIENT_IP, "127.0.0.1")
    assert "6.6.6.6" not in dovecot.info_log() and "6.6.6.7" not in dovecot.info_log()


# --- 7. STARTTLS command injection -------------------------------------------------------------


def test_starttls_injection_rejected(proxy, dovecot):
    """`a STARTTLS` with a LOGIN pipelined behind it in the same segment: the proxy says BYE and
    closes, and nothing logs in (reliability case 1)."""
    before = len(dovecot.logins())
    c = RawClient(proxy.imap)
    assert c.line().startswith(b"* OK")
    c.send(b"a STARTTLS\r\nb LOGIN demo@example.test demo\r\n")
    rest = c.read_to_close()
    assert rest.startswith(b"* BYE"), rest
    assert b"a OK" not in rest and b"b " not in rest, rest
    time.sleep(0.5)
    assert len(dovecot.logins()) == before, dovecot.info_log()


def test_starttls_injection_in_second_segment(proxy, dovecot):
    """The injected LOGIN arrives in its own segment right after STARTTLS, before any ClientHello:
    it is never executed (reliability case 2). And a client that sends plaintext instead of a
    ClientHello after `OK Begin TLS` fails the handshake and is closed, with no plaintext
    fallback (case 8)."""
    before = len(dovecot.logins())
    c = RawClient(proxy.imap)
    c.line()
    c.send(b"a STARTTLS\r\n")
    c.send(b"b LOGIN demo@example.test demo\r\n")
    rest = c.read_to_close()
    assert b"b OK" not in rest and b"b NO" not in rest, rest

    c = RawClient(proxy.imap)
    c.line()
    c.send(b"a STARTTLS\r\n")
    assert c.line() == b"a OK Begin TLS negotiation now.\r\n"
    c.send(b"b LOGIN demo@example.test demo\r\n")
    rest = c.read_to_close()
    assert b"OK" not in rest and b"NO" not in rest and b"BAD" not in rest, rest
    time.sleep(0.5)
    assert len(dovecot.logins()) == before, dovecot.info_log()
    assert wait_for(lambda: 'result="tls_failed"' in proxy.log())


# --- 8. ALPN -----------------------------------------------------------------------------------


def test_alpn(proxy):
    """ALPN http/1.1 is refused with no_application_protocol (reliability case 15); imap, a list
    containing imap, or no ALPN at all are accepted (case 16)."""
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        RawClient(proxy.imaps, tls=True, alpn=["http/1.1"])
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        RawClient(proxy.imaps, tls=True, alpn=["h2"])
    for alpn, selected in ((["imap"], "imap"), (["h2", "imap"], "imap"), (None, None)):
        c = RawClient(proxy.imaps, tls=True, alpn=alpn)
        assert c.sock.selected_alpn_protocol() == selected
        assert c.line().startswith(b"* OK [CAPABILITY ")
        c.close()


def test_alpn_inside_starttls(proxy):
    """The same ALPN rules apply to the handshake after STARTTLS (reliability cases 15, 16)."""
    c = RawClient(proxy.imap)
    c.line()
    c.send(b"a STARTTLS\r\n")
    assert c.until_tagged(b"a")[-1].startswith(b"a OK")
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        c.starttls(alpn=["http/1.1"])
    c.close()


def test_openssl_s_client_starttls(proxy):
    """openssl s_client -starttls imap with ALPN imap: ALPN selected, login and logout work; with
    ALPN http/1.1 the handshake fails."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.imap}", "-starttls", "imap", "-ign_eof"]
    out = subprocess.run(
        cmd + ["-alpn", "imap"],
        input=b"a LOGIN demo@example.test demo\r\nb LOGOUT\r\n",
        capture_output=True,
        timeout=15,
    )
    text = out.stdout.decode(errors="replace")
    assert "ALPN protocol: imap" in text, text
    assert re.search(r"^a OK ", text, re.M), text
    assert re.search(r"^b OK ", text, re.M), text

    out = subprocess.run(cmd + ["-alpn", "http/1.1"], input=b"", capture_output=True, timeout=15)
    assert out.returncode != 0
    assert "no application protocol" in (out.stdout + out.stderr).decode(errors="replace")


def test_an_ecdsa_and_an_rsa_certificate_for_the_same_names(dovecot, tmp_path):
    """Two certificates for one host, ECDSA and RSA (as nginx and Dovecot allow): openssl
    s_client gets ECDSA by default, with SNI and without; RSA when it offers only RSA
    signatures (TLS 1.3) or only ECDHE-RSA suites (TLS 1.2, as old printers and scanners do).
    The login works on both; `portcullis check` refuses a second ECDSA one at its `cert` line."""
    from servers import Portcullis, imap_to_dovecot

    def make(name, newkey):
        subprocess.run(["openssl", "req", "-x509", *newkey, "-nodes", "-days", "2", "-subj", "/CN=mail.example.test",
                        "-addext", "subjectAltName=DNS:mail.example.test", "-keyout", str(tmp_path / f"{name}.key"),
                        "-out", str(tmp_path / f"{name}.pem")], check=True, capture_output=True)
        return f'[[tls.certificate]]\ncert = "{tmp_path / name}.pem"\nkey = "{tmp_path / name}.key"\nnames = ["mail.example.test"]\n'

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    certs = make("rsa", ["-newkey", "rsa:2048"]) + make("ecdsa", ec)
    port, tls_port = free_port(), free_port()
    listener = f'[[listener]]\nname = "imaps"\nbind = "127.0.0.1:{tls_port}"\nprotocol = "imap"\ntls = "implicit"\n\n'
    text = f"[tls]\n{certs}\n[auth]\nsource = \"backend\"\n\n" + listener + imap_to_dovecot(port, dovecot)
    pc = Portcullis(str(tmp_path), text)
    pc.start(wait_port=tls_port, tls=True)
    try:
        def served(*args):
            out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{tls_port}", "-ign_eof", *args],
                                 input=b"a LOGIN demo@example.test demo\r\nb LOGOUT\r\n", capture_output=True, timeout=15)
            text = out.stdout.decode(errors="replace")
            assert re.search(r"^a OK ", text, re.M), text
            key = re.search(r"Server public key is (\d+) bit", text)
            return {"256": "ECDSA", "2048": "RSA"}[key.group(1)] if key else text

        assert served("-servername", "mail.example.test") == "ECDSA"
        assert served("-noservername") == "ECDSA"
        assert served("-servername", "mail.example.test", "-sigalgs", "RSA-PSS+SHA256:RSA+SHA256") == "RSA"
        assert served("-noservername", "-sigalgs", "RSA-PSS+SHA256:RSA+SHA256") == "RSA"
        assert served("-servername", "mail.example.test", "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256") == "RSA"
        assert served("-servername", "mail.example.test", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDSA"
    finally:
        pc.stop()

    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("[auth]", make("ecdsa2", ec) + "\n[auth]"))
    out = subprocess.run([portcullis_binary(), "check", "--config", str(bad)], capture_output=True, text=True)
    line = bad.read_text().splitlines().index(f'cert = "{tmp_path / "ecdsa2"}.pem"') + 1
    assert out.returncode != 0 and f"{bad}:{line}:" in out.stderr, out.stderr
    assert "tls.certificate[2].cert" in out.stderr and "with an ECDSA key" in out.stderr, out.stderr


# --- 9. backend down ---------------------------------------------------------------------------


def test_backend_down_is_unavailable(proxy):
    """A user whose backend refuses connections gets NO [UNAVAILABLE], the connection stays
    usable, and it is not logged as a failed login (reliability cases 61, 64)."""
    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps)
    with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
        m.login(*DEAD)
    assert m.noop()[0] == "OK"
    typ, _ = m.login(*DEMO)  # another user on the same connection
    assert typ == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    assert wait_for(lambda: "backend login failed" in proxy.log() and "backend=dead" in proxy.log())
    assert "login failed: rip=127.0.0.2 user=<d@dead.test>" not in proxy.log()


# --- 10. master user and PROXY v2 backends -----------------------------------------------------


def test_master_user_backend(proxy, dovecot):
    """Routed to a backend with login = "master": Dovecot only knows a password the client never
    sends, so the login succeeds only if the proxy authenticated as the master user."""
    # Premise: the client's password is not Dovecot's. (Asked from an address of its own, so
    # Dovecot's auth penalty for this failure cannot slow other tests.)
    with IMAP4From("127.0.0.1", dovecot.imap_port, source="127.0.0.4") as direct:
        with pytest.raises(imaplib.IMAP4.error):
            direct.login(*MASTER)
    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps)
    rport = m.sock.getsockname()[1]
    typ, _ = m.login(*MASTER)
    assert typ == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    line = login_line_for(dovecot, rport)
    assert (line["user"], line["rip"]) == (MASTER[0], CLIENT_IP)
    assert wait_for(lambda: f"Master user logging in as {MASTER[0]}" in dovecot.info_log()), dovecot.info_log()


def test_proxy_v2_backend(proxy, dovecot):
    """Routed to Dovecot's haproxy listener with client_address = "proxy-v2": Dovecot takes the
    client's address and port from the PROXY header."""
    m = IMAP4SSLFrom("127.0.0.1", proxy.imaps)
    rport = m.sock.getsockname()[1]
    typ, _ = m.login(*HAPROXY)
    assert typ == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    line = login_line_for(dovecot, rport)
    assert (line["user"], line["rip"], line["lport"]) == (HAPROXY[0], CLIENT_IP, str(proxy.imaps))


# --- 11, 12. configuration reload (each test has its own proxy) --------------------------------


def test_hot_reload_adds_listener_keeps_sessions(own_proxy, dovecot):
    """A valid config change adds a listener within seconds; an existing session is untouched and
    the old listeners keep accepting (reliability case 75)."""
    p = own_proxy
    a = IMAP4SSLFrom("127.0.0.1", p.imaps)
    assert a.login(*DEMO)[0] == "OK"
    assert a.select("INBOX") == ("OK", [dovecot.inbox_count(*DEMO)])

    new_port = free_port()
    p.pc.write_config(p.setup.text(extra_listeners=[("imaps2", new_port, "implicit")]))
    wait_greeting(new_port, tls=True, timeout=5)
    assert wait_for(lambda: "configuration reloaded" in p.log()), p.log()

    b = IMAP4SSLFrom("127.0.0.1", new_port)
    rport = b.sock.getsockname()[1]
    assert b.login(*DEMO)[0] == "OK"
    b.logout()
    line = login_line_for(dovecot, rport)
    assert line["lport"] == str(new_port)

    c = IMAP4SSLFrom("127.0.0.1", p.imaps)  # the old listener still accepts
    assert c.login(*DEMO)[0] == "OK"
    c.logout()

    typ, data = a.uid("FETCH", "1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == dovecot.small_message
    logout_cleanly(a)


def test_broken_config_edit_keeps_running(dovecot, tmp_path):
    """Invalid TOML written over the config: the running config stays, the error is logged,
    `portcullis check` names the file and line, and the reload gauge says so until the file is
    put right (reliability case 76)."""
    admin = free_port()
    p = start_proxy(dovecot, str(tmp_path), admin_port=admin)
    try:
        reloaded = 'portcullis_config_last_reload_successful'
        assert metric_value(scrape_metrics(admin), reloaded) == 1
        good = p.setup.text()
        bad = good + "[[listener]\n"
        bad_line = good.count("\n") + 1
        p.pc.write_config(bad)
        assert wait_for(lambda: "configuration reload failed" in p.log(), timeout=3), p.log()
        time.sleep(0.3)
        assert metric_value(scrape_metrics(admin), reloaded) == 0

        m = IMAP4SSLFrom("127.0.0.1", p.imaps)
        assert m.login(*DEMO)[0] == "OK"
        m.logout()
        m = IMAP4From("127.0.0.1", p.imap, timeout=10)
        m.starttls(ssl_context=client_tls_context())
        assert m.login(*DEMO)[0] == "OK"
        m.logout()

        out = portcullis_check(p.pc.config)
        assert out.returncode == 1, out
        assert f"{p.pc.config}:{bad_line}:" in out.stderr, out.stderr

        p.pc.write_config(good)
        out = portcullis_check(p.pc.config)
        assert out.returncode == 0, out.stderr
        assert "OK (2 listeners, 4 backends)" in out.stdout
        # The file is again what runs: no reload is applied (nothing changed), and the gauge clears.
        assert wait_for(lambda: metric_value(scrape_metrics(admin), reloaded) == 1, timeout=10), p.log()
    finally:
        p.pc.stop()


def test_check_names_bad_field(dovecot, tmp_path):
    """`portcullis check` on a bad field value exits 1 and names file, line and field."""
    setup = ProxySetup(dovecot, str(tmp_path))
    text = setup.text()
    assert text.count('tls = "implicit"') == 1
    text = text.replace('tls = "implicit"', 'tls = "maybe"')
    line = text.split("\n").index('tls = "maybe"') + 1
    path = str(tmp_path / "bad.toml")
    with open(path, "w") as f:
        f.write(text)
    out = portcullis_check(path)
    assert out.returncode == 1, out
    assert f"{path}:{line}:" in out.stderr, out.stderr
    assert "listener[0].tls" in out.stderr, out.stderr
    assert "maybe" in out.stderr


# --- 14. abuse: protocol errors, HTTP --------------------------------------------------------------


def test_error_limit_closes(proxy):
    """Five invalid commands, one at a time and pipelined: five BADs, then `* BYE` and close
    (reliability case 54). The bad command text is never echoed (case 19)."""
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    for i in range(1, 5):
        c.send(b"e%d XJUNKCMD\r\n" % i)
        assert c.until_tagged(b"e%d" % i)[-1].startswith(b"e%d BAD" % i)
    c.send(b"e5 XJUNKCMD\r\n")
    rest = c.read_to_close()
    assert rest.startswith(b"e5 BAD") and b"* BYE" in rest, rest
    assert b"XJUNKCMD" not in rest

    c = RawClient(proxy.imap)
    c.line()
    c.send(b"".join(b"p%d XJUNKCMD\r\n" % i for i in range(1, 8)))
    rest = c.read_to_close()
    lines = rest.split(b"\r\n")
    assert [l.split(b" ")[1] for l in lines[:5]] == [b"BAD"] * 5, rest
    assert lines[5].startswith(b"* BYE"), rest
    assert b"p6" not in rest and b"p7" not in rest and b"XJUNKCMD" not in rest


def test_http_request_closes(proxy):
    """An HTTP request on the mail port closes the connection without echoing it (reliability
    case 18), in plaintext, inside implicit TLS and as the first command after STARTTLS."""
    c = RawClient(proxy.imap)
    c.line()
    c.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    rest = c.read_to_close()
    assert b"GET" not in rest and b"HTTP" not in rest, rest

    c = RawClient(proxy.imaps, tls=True)
    c.line()
    c.send(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    rest = c.read_to_close()
    assert b"POST" not in rest and b"HTTP" not in rest, rest

    # The case's own point: as the first command after STARTTLS (a cross-protocol attack puts
    # the mail port under a browser's TLS session).
    c = RawClient(proxy.imap)
    c.line()
    c.send(b"a STARTTLS\r\n")
    assert c.until_tagged(b"a")[-1].startswith(b"a OK")
    c.starttls()
    c.send(b"GET /secret HTTP/1.1\r\nHost: mail.example.test\r\n\r\n")
    rest = c.read_to_close()
    assert b"GET" not in rest and b"HTTP" not in rest and b"secret" not in rest, rest


# (reliability case, chunks sent with a pause between them, reply line prefixes in order).
# Every case ends with `z NOOP`, so the exact reply sequence also proves no extra line (no stray
# `+`, no second BAD) and that the connection is still in step.
PREAUTH_CASES = [
    ("24 pipelined pre-auth", [b"a01 INVALID\r\na02 NOOP\r\n"], [b"a01 BAD", b"a02 OK"]),
    ("22 split command", [b"a NO", b"OP\r\n"], [b"a OK"]),
    ("23 split invalid command", [b"a FO", b"O BAR\r\n"], [b"a BAD"]),
    ("28 bare LF", [b"a NOOP\nb NOOP\r\n"], [b"a BAD", b"b OK"]),
    ("29 huge literal", [b"a LOGIN {4294967295}\r\n"], [b"a BAD"]),
    ("29 overflowing literal", [b"a LOGIN {99999999999999999999}\r\n"], [b"a BAD"]),
    ("30 literal password", [b'a LOGIN "x@example.test" {5}\r\n', b"hello\r\n"], [b"+ ", b"a NO [AUTHENTICATIONFAILED]"]),
    # The 8-byte literal is "b NOOP\r\n": data, never a command of its own.
    ("31 literal is not a command", [b"a FOOBAR {8+}\r\nb NOOP\r\n\r\nc NOOP\r\n"], [b"a BAD", b"c OK"]),
    ("32 junk after literal", [b"a LOGIN {3}\r\n", b"abcX\r\n"], [b"+ ", b"a BAD"]),
    ("34 NUL in command", [b"a NO\x00OP\r\n"], [b"a BAD"]),
    ("34 NUL in password", [b'a LOGIN demo@example.test "de\x00mo"\r\n'], [b"a BAD"]),
    ("37 foreign authzid", [b"a AUTHENTICATE PLAIN YWRtaW4AZGVtb0BleGFtcGxlLnRlc3QAZGVtbw==\r\n"], [b"a NO [AUTHENTICATIONFAILED]"]),
    ("39 bad base64", [b"a AUTHENTICATE PLAIN\r\n", b"!!!\r\n"], [b"+ ", b"a BAD"]),
    ("40 SASL cancel", [b"a AUTHENTICATE PLAIN\r\n", b"*\r\n"], [b"+ ", b"a BAD"]),
    ("42 unknown mechanism", [b"a AUTHENTICATE CRAM-MD5\r\n"], [b"a NO"]),
    ("pre-auth SELECT", [b"a SELECT INBOX\r\n"], [b"a BAD"]),
]


@pytest.mark.parametrize("case,chunks,want", PREAUTH_CASES, ids=[c[0] for c in PREAUTH_CASES])
def test_preauth_parser(proxy, dovecot, case, chunks, want):
    """The pre-auth parser answers each malformed or awkward input exactly once, in order, with
    fixed text (never the client's bytes), and nothing reaches Dovecot."""
    before = len(dovecot.logins())
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    for i, chunk in enumerate(chunks):
        if i:
            time.sleep(0.15)
        c.send(chunk)
    c.send(b"z NOOP\r\n")
    got = c.until_tagged(b"z")
    c.close()
    assert len(got) == len(want) + 1, got
    for line, prefix in zip(got, want):
        assert line.startswith(prefix), got
    assert got[-1] == b"z OK NOOP completed.\r\n"
    for junk in (b"FOO", b"INVALID", b"abcX", b"hello"):
        assert not any(junk in l for l in got), got
    assert len(dovecot.logins()) == before


def test_overlong_line_closes(proxy):
    """A command line over max_line_length (8192) ends in `* BYE` and close (reliability case 27)."""
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    c.send(b"a NOOP " + b"x" * 9000 + b"\r\n")
    rest = c.read_to_close(3)
    assert rest.startswith(b"* BYE"), rest
    assert b"xxx" not in rest


def test_endless_line_without_crlf_closes(proxy):
    """64 KiB with no line end at all, eight times max_line_length: the proxy must not wait for a
    CRLF that never comes; it answers `* BYE` and closes (reliability case 28: "bounded buffer,
    close")."""
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    try:
        for _ in range(64):
            c.send(b"A" * 1024)
    except OSError:
        pass  # closed while we were still sending: fine, what matters is the close
    try:
        rest = c.read_to_close(3)
    except TimeoutError:
        pytest.fail("after 64 KiB without CRLF the proxy neither answered nor closed within 3 s")
    assert rest.startswith(b"* BYE"), rest


# --- 15. pipelining after login ------------------------------------------------------------


def test_pipelined_login(proxy, dovecot):
    """LOGIN, SELECT and LOGOUT in one write: all three are answered, in order (case 25)."""
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    c.send(b"a LOGIN demo@example.test demo\r\nb SELECT INBOX\r\nc LOGOUT\r\n")
    rest = c.read_to_close()
    tagged = [l for l in rest.split(b"\r\n") if l[:2] in (b"a ", b"b ", b"c ")]
    assert [t[:4] for t in tagged] == [b"a OK", b"b OK", b"c OK"], rest
    assert b"* %s EXISTS" % dovecot.inbox_count(*DEMO) in rest and b"* BYE" in rest, rest


def test_pipelined_after_failed_login_stays_local(proxy, dovecot):
    """After a failed pipelined LOGIN, the commands behind it are answered by the proxy (not a
    backend) and nothing logs in (case 25, second half)."""
    before = len(dovecot.logins())
    c = RawClient(proxy.imaps, tls=True)
    c.line()
    c.send(b"a LOGIN demo@example.test wrong\r\nb SELECT INBOX\r\nc LOGOUT\r\n")
    rest = c.read_to_close()
    tagged = [l for l in rest.split(b"\r\n") if l[:2] in (b"a ", b"b ", b"c ")]
    assert [t[:5] for t in tagged] == [b"a NO ", b"b BAD", b"c OK "], rest
    time.sleep(0.3)
    assert len(dovecot.logins()) == before


# --- timeouts, shutdown, more reload (each test has its own proxy) -------------------------------


def port_refuses(port):
    try:
        RawClient(port, timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def reload_with(p, text):
    n = p.log().count("configuration reloaded")
    p.pc.write_config(text)
    assert wait_for(lambda: p.log().count("configuration reloaded") > n), p.log()


def test_preauth_idle_and_handshake_timeouts(own_proxy):
    """An idle client before login is told `* BYE` and dropped after preauth_idle_timeout; a TCP
    connection that never sends a ClientHello is dropped after tls_handshake_timeout (reliability
    case 58). Also shows that a reload's new limits apply to new sessions (case 75)."""
    p = own_proxy
    reload_with(p, p.setup.text(limits={"preauth_idle_timeout": '"1s"', "tls_handshake_timeout": '"1s"'}))
    c = RawClient(p.imaps, tls=True)
    c.line()
    t0 = time.monotonic()
    rest = c.read_to_close(4)
    assert rest == b"* BYE Disconnected for inactivity.\r\n"
    assert 0.8 < time.monotonic() - t0 < 3

    raw = RawClient(p.imaps)  # TCP only, no TLS
    t0 = time.monotonic()
    assert raw.read_to_close(4) == b""
    assert 0.8 < time.monotonic() - t0 < 3


def test_log_settings_changed_by_a_reload_are_said_to_need_a_restart(own_proxy):
    """[log] is read at start only: a reload that changes it applies the rest and says so."""
    p = own_proxy
    warning = "[log] format and level are read at start only"
    reload_with(p, p.setup.text(limits={"login_timeout": '"100s"'}))
    assert warning not in p.log()
    reload_with(p, p.setup.text().replace('level = "info"', 'level = "debug"'))
    assert warning in p.log()


def test_login_timeout_says_bye(own_proxy):
    """A client that stays busy (NOOP every 0.3 s) but never logs in is cut off at login_timeout,
    and like every other close it is told so with `* BYE` first (reliability case 58; "Close" in
    reliability.md: send a final protocol error where the protocol has one, then close)."""
    p = own_proxy
    reload_with(p, p.setup.text(limits={"login_timeout": '"1500ms"'}))
    c = RawClient(p.imaps, tls=True)
    c.line()
    t0 = time.monotonic()
    lines = []
    try:
        while time.monotonic() - t0 < 5:
            c.send(b"n NOOP\r\n")
            lines.append(c.line())
            if lines[-1] != b"n OK NOOP completed.\r\n":
                break
            time.sleep(0.3)
    except (EOFError, OSError):
        pass
    elapsed = time.monotonic() - t0
    assert 1.2 < elapsed < 3, elapsed
    last = c.read_to_close(2)
    assert wait_for(lambda: 'result="login_timeout"' in p.log()), p.log()
    got = b"".join(lines) + last
    assert b"\r\n* BYE " in got, f"closed at login_timeout without a BYE; last bytes {got[-60:]!r}"


def test_graceful_shutdown(own_proxy):
    """SIGTERM: a client still logging in gets `* BYE` and is closed, new connections are refused,
    a logged-in session keeps working until it logs out, then the process exits 0 (reliability
    case 80)."""
    p = own_proxy
    a = IMAP4SSLFrom("127.0.0.1", p.imaps)
    assert a.login(*DEMO)[0] == "OK"
    assert a.select("INBOX")[0] == "OK"
    pre = RawClient(p.imap)
    pre.line()

    p.pc.proc.send_signal(signal.SIGTERM)
    rest = pre.read_to_close(3)
    assert rest.startswith(b"* BYE"), rest

    assert wait_for(lambda: port_refuses(p.imaps), timeout=3)
    assert p.pc.proc.poll() is None  # still draining the logged-in session
    assert a.noop()[0] == "OK"
    logout_cleanly(a)
    assert p.pc.proc.wait(5) == 0
    assert 'result="shutdown"' in p.log()


def test_sighup_reload(own_proxy):
    """SIGHUP reloads even when no file changed, and service goes on."""
    p = own_proxy
    n = p.log().count("configuration reloaded")
    p.pc.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: p.log().count("configuration reloaded") == n + 1), p.log()
    m = IMAP4SSLFrom("127.0.0.1", p.imaps)
    assert m.login(*DEMO)[0] == "OK"
    m.logout()


def proxy_tcp_timers(pid):
    """The proxy's established TCP connections as {(local port, remote port): (timer, seconds)},
    read from /proc: timer 2 is the socket timer that a connection with keepalive has armed
    while it is quiet, 0 none; seconds is how long until it fires."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                fields = row.split()
                if fields[9] not in inodes or fields[3] != "01":  # ESTABLISHED
                    continue
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
                timer, when = fields[5].split(":")
                out[(local, remote)] = (int(timer, 16), int(when, 16) / 100)
    return out


def test_tcp_keepalive_on_client_and_backend_connections(own_proxy, dovecot):
    """A logged-in session's two connections, the client's and Dovecot's, have keepalive armed
    (by default: first probe after 2 minutes of quiet), so a client that vanished without a FIN
    frees its backend connection within minutes instead of at idle_timeout (30 minutes). The
    client's gets it from the listening socket, so a reload's change reaches the connections
    accepted after it on the socket it keeps; 0 turns it off."""
    p = own_proxy

    def session_timers():
        m = IMAP4SSLFrom("127.0.0.1", p.imaps)
        assert m.login(*DEMO)[0] == "OK"
        assert m.select("INBOX")[0] == "OK"
        time.sleep(0.3)  # quiet, so no retransmit or delayed-ACK state is in the way
        timers = proxy_tcp_timers(p.pc.proc.pid)
        logout_cleanly(m)
        client = [t for (local, _), t in timers.items() if local == p.imaps]
        backend = [t for (_, remote), t in timers.items() if remote == dovecot.imap_port]
        assert len(client) == 1 and len(backend) == 1, timers
        return client[0], backend[0]

    for timer, seconds in session_timers():
        assert timer == 2 and 100 < seconds <= 120, (timer, seconds)
    reload_with(p, p.setup.text(limits={"tcp_keepalive": '"45s"'}))
    for timer, seconds in session_timers():
        assert timer == 2 and 30 < seconds <= 45, (timer, seconds)
    reload_with(p, p.setup.text(limits={"tcp_keepalive": '"0s"'}))
    assert session_timers() == ((0, 0), (0, 0))


def test_reload_removes_listener_and_rereads_users(own_proxy, dovecot):
    """A reload that drops a listener and a user: the port stops accepting, a session that came in
    through it keeps working (reliability case 77), and the removed user can no longer log in."""
    p = own_proxy
    s = IMAP4From("127.0.0.1", p.imap, timeout=10)
    s.starttls(ssl_context=client_tls_context())
    assert s.login(*DEMO)[0] == "OK"
    assert s.select("INBOX")[0] == "OK"

    tmp = p.setup.users_path + ".new"
    write_users_file(tmp, skip=(QUOTED[0],))
    os.replace(tmp, p.setup.users_path)
    reload_with(p, p.setup.text(drop_listeners=("imap",)))

    assert wait_for(lambda: port_refuses(p.imap), timeout=3)
    m = IMAP4SSLFrom("127.0.0.1", p.imaps)
    typ, data = m._simple_command("LOGIN", m._quote(QUOTED[0]), m._quote(QUOTED[1]))
    assert (typ, data) == ("NO", [b"[AUTHENTICATIONFAILED] Authentication failed."])
    assert m.login(*DEMO)[0] == "OK"
    m.logout()

    typ, data = s.uid("FETCH", "1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == dovecot.small_message
    logout_cleanly(s)


def test_a_failed_reload_is_not_repeated_for_files_that_do_not_matter(own_proxy):
    """After a reload fails (the config is half-edited), other files changing beside it (an
    editor's swap file, a busy directory) are not another failed reload each, with an error
    line and a count; the fixed config is picked up as usual."""
    p = own_proxy
    n = p.log().count("configuration reload failed")
    p.pc.write_config(p.setup.text() + "\n[limits\n")
    assert wait_for(lambda: p.log().count("configuration reload failed") == n + 1), p.log()[-2000:]
    d = os.path.dirname(p.pc.config)
    for i in range(5):
        with open(os.path.join(d, f".portcullis.toml.swp{i}"), "w") as f:
            f.write("x")
        time.sleep(0.3)
    time.sleep(2.5)  # the watcher's 2 s timer too
    assert p.log().count("configuration reload failed") == n + 1, p.log()[-3000:]
    reload_with(p, p.setup.text(limits={"preauth_idle_timeout": '"30s"'}))
