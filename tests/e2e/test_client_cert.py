"""Client certificates (nginx's ssl_verify_client; reliability case 21), end to end: certificates
made with the openssl command, Python's ssl/imaplib/poplib/smtplib as clients, the real Dovecot
behind the proxy, and an auth_http service that records the Auth-SSL-* headers it is sent.

Case 21: no certificate, an untrusted one, or an expired one is refused with nginx's line for the
protocol (`* BYE No required SSL certificate`, `* BYE SSL certificate error`, ...) and the
connection closes before any greeting; `optional_no_ca` lets an unknown issuer through and tells
the auth service so.
"""

import http.server
import imaplib
import os
import poplib
import smtplib
import subprocess
import threading
import urllib.parse

import pytest

from conftest import DEMO
from servers import Portcullis, RawClient, client_tls_context, free_port, wait_for


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def issue(d, name, ca, serial, ext, days="30", cn=None):
    """d/name.key and d/name.pem for /O=Example/CN=<cn or name>, issued by the CA at ca.pem and
    ca.key (a path without the suffix), with the extensions in the file ext."""
    openssl("req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/O=Example/CN={cn or name}",
            cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-set_serial", serial,
            "-days", days, "-extfile", ext, "-out", f"{name}.pem", cwd=d)


def dovecot_proxy_config(dovecot, listeners, admin=None):
    """A config with implicit-TLS IMAP listeners, {name: (port, [extra lines])}, in front of
    Dovecot, which checks the passwords (auth.source = "backend")."""
    out = ['[tls]', 'self_signed_names = ["localhost"]', '']
    if admin is not None:
        out += ['[admin]', f'bind = "127.0.0.1:{admin}"', '']
    for name, (port, extra) in listeners.items():
        out += ['[[listener]]', f'name = "{name}"', f'bind = "127.0.0.1:{port}"', 'protocol = "imap"',
                'tls = "implicit"', *extra, '']
    out += ['[auth]', 'source = "backend"', '', '[[backend]]', 'name = "dovecot"',
            f'address = "127.0.0.1:{dovecot.imap_port}"', 'health = { enabled = false }', '',
            '[routing.imap]', 'default = "dovecot"', '']
    return "\n".join(out)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca.pem (trusted by the proxy), alice (issued by it), mallory (issued by another CA),
    expired (issued by the trusted CA, no longer valid) and self (self-signed)."""
    d = str(tmp_path_factory.mktemp("pki"))
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *EC_KEY, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "30",
                "-subj", f"/O=Example/CN={ca} root", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    with open(os.path.join(d, "client.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for name, ca, days in (("alice", "ca", "30"), ("mallory", "other-ca", "30"), ("expired", "ca", "-1")):
        issue(d, name, ca, "0x1F42", "client.ext", days=days)
    openssl("req", "-x509", *EC_KEY, "-keyout", "self.key", "-out", "self.pem", "-days", "30", "-subj", "/CN=self", cwd=d)
    fingerprint = subprocess.run(["openssl", "x509", "-in", "alice.pem", "-noout", "-fingerprint", "-sha1"],
                                 cwd=d, check=True, capture_output=True, text=True).stdout
    return {"dir": d, "alice_sha1": fingerprint.split("=", 1)[1].strip().replace(":", "").lower()}


def ctx_with(pki, name=None):
    ctx = client_tls_context()
    if name:
        ctx.load_cert_chain(os.path.join(pki["dir"], f"{name}.pem"), os.path.join(pki["dir"], f"{name}.key"))
    return ctx


class AuthHandler(http.server.BaseHTTPRequestHandler):
    """auth_http: demo's password is good; every request's headers are kept."""

    backend = None
    pop3 = None
    seen = []

    def do_GET(self):
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        user = urllib.parse.unquote(self.headers.get("Auth-User", ""))
        if self.headers.get("Auth-Method") == "external":
            # SASL EXTERNAL: alice's certificate speaks for demo; the service knows demo's
            # password for a replayed login (POP3, IMAP) and names the XCLIENT backend for SMTP.
            trusted = (self.headers.get("Auth-SSL-Verify") == "SUCCESS"
                       and self.headers.get("Auth-SSL-Subject") == "CN=alice,O=Example")
            if trusted and user == DEMO[0]:
                self.send_header("Auth-Status", "OK")
                protocol = self.headers.get("Auth-Protocol")
                if protocol == "smtp":
                    self.send_header("Auth-Server", "postfix")
                else:
                    self.send_header("Auth-Server", "127.0.0.1")
                    self.send_header("Auth-Port", str(self.pop3 if protocol == "pop3" else self.backend))
                    self.send_header("Auth-Pass", DEMO[1])
            elif trusted and user == "nopass@example.test":
                self.send_header("Auth-Status", "OK")
                self.send_header("Auth-Server", "127.0.0.1")
                self.send_header("Auth-Port", str(self.backend))
            else:
                self.send_header("Auth-Status", "Certificate not accepted for this user")
        elif (user, urllib.parse.unquote(self.headers.get("Auth-Pass", ""))) == DEMO:
            self.send_header("Auth-Status", "OK")
            self.send_header("Auth-Server", "127.0.0.1")
            self.send_header("Auth-Port", str(self.backend))
        else:
            self.send_header("Auth-Status", "Invalid login or password")
        self.end_headers()

    def log_message(self, *args):
        pass


LISTENERS = [
    # name, protocol, tls, verify_client, with the CA file
    ("imaps", "imap", "implicit", "on", True),
    ("imap", "imap", "starttls", "on", True),
    ("pop3s", "pop3", "implicit", "on", True),
    ("submissions", "smtp", "implicit", "on", True),
    ("imaps-optional", "imap", "implicit", "optional", True),
    ("imaps-noca", "imap", "implicit", "optional_no_ca", False),
    ("imaps-plain", "imap", "implicit", "off", False),
]


@pytest.fixture(scope="module")
def cert_proxy(dovecot, postfix, pki, tmp_path_factory):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    AuthHandler.backend = dovecot.imap_port
    AuthHandler.pop3 = dovecot.pop3_port
    ports = {name: free_port() for name, *_ in LISTENERS}
    admin = free_port()
    out = ['[tls]', 'self_signed_names = ["localhost"]', '', '[admin]', f'bind = "127.0.0.1:{admin}"', '']
    for name, protocol, tls, verify, with_ca in LISTENERS:
        out += ['[[listener]]', f'name = "{name}"', f'bind = "127.0.0.1:{ports[name]}"', f'protocol = "{protocol}"',
                f'tls = "{tls}"']
        if verify != "off":
            out.append(f'verify_client = "{verify}"')
        if with_ca:
            out.append('client_ca_file = "../ca.pem"')
        out.append('')
    out += ['[auth]', 'source = "http"', '[auth.http]', f'urls = ["http://127.0.0.1:{server.server_address[1]}/auth"]',
            'pass_client_cert = true', '',
            '[throttle]', 'enabled = false', '',
            '[[backend]]', 'name = "dovecot"', f'address = "127.0.0.1:{dovecot.imap_port}"', 'health = { enabled = false }', '',
            '[[backend]]', 'name = "nowhere-pop3"', 'protocol = "pop3"', f'address = "127.0.0.1:{free_port()}"',
            'health = { enabled = false }', '',
            '[[backend]]', 'name = "nowhere-smtp"', 'protocol = "smtp"', f'address = "127.0.0.1:{free_port()}"',
            'health = { enabled = false }', '',
            '[[backend]]', 'name = "postfix"', 'protocol = "smtp"', f'address = "127.0.0.1:{postfix.port}"',
            'client_address = "xclient"', 'login = "xclient"', 'health = { enabled = false }', '',
            '[routing.imap]', 'default = "dovecot"', '[routing.pop3]', 'default = "nowhere-pop3"',
            '[routing.smtp]', 'default = "nowhere-smtp"', '']
    # The CA file is named relative to the config file (portcullis/../ca.pem = the pki dir).
    pc = Portcullis(pki["dir"], "\n".join(out))
    pc.start(wait_port=ports["imaps-plain"], tls=True)
    pc.ports = ports
    pc.admin = admin
    try:
        yield pc
    finally:
        pc.stop()
        server.shutdown()
        server.server_close()


def tls_lines(port, ctx):
    """Everything an implicit-TLS listener sends before it closes, read as raw bytes."""
    c = RawClient(port, tls=True, ctx=ctx)
    try:
        return c.read_to_close()
    finally:
        c.close()


def tls_lines_first(port, ctx):
    """The first line an implicit-TLS listener sends."""
    c = RawClient(port, tls=True, ctx=ctx)
    try:
        return c.line()
    finally:
        c.close()


def test_required_certificate_refusals_per_protocol(cert_proxy, pki, dovecot):
    """Case 21: none / untrusted / expired, in IMAP, POP3 and SMTP words, nothing else sent."""
    p = cert_proxy.ports
    before = len(dovecot.logins())
    assert tls_lines(p["imaps"], ctx_with(pki)) == b"* BYE No required SSL certificate\r\n"
    assert tls_lines(p["imaps"], ctx_with(pki, "mallory")) == b"* BYE SSL certificate error\r\n"
    assert tls_lines(p["imaps"], ctx_with(pki, "expired")) == b"* BYE SSL certificate error\r\n"
    assert tls_lines(p["imaps"], ctx_with(pki, "self")) == b"* BYE SSL certificate error\r\n"
    assert tls_lines(p["pop3s"], ctx_with(pki)) == b"-ERR No required SSL certificate\r\n"
    assert tls_lines(p["pop3s"], ctx_with(pki, "mallory")) == b"-ERR SSL certificate error\r\n"
    assert tls_lines(p["submissions"], ctx_with(pki)) == b"421 4.7.1 No required SSL certificate\r\n"
    assert tls_lines(p["submissions"], ctx_with(pki, "mallory")) == b"421 4.7.1 SSL certificate error\r\n"
    log = cert_proxy.log()
    assert "client certificate refused" in log and "unable to get local issuer certificate" in log
    assert "certificate has expired" in log
    assert len(dovecot.logins()) == before
    # The trusted certificate gets each protocol's greeting.
    assert tls_lines_first(p["pop3s"], ctx_with(pki, "alice")).startswith(b"+OK")
    assert tls_lines_first(p["submissions"], ctx_with(pki, "alice")).startswith(b"220 ")
    # Counted by verdict, per listener.
    m = client_certificate_counts(cert_proxy.admin)
    assert m[("imaps", "missing")] >= 1 and m[("imaps", "refused")] >= 3, m
    assert m[("pop3s", "missing")] >= 1 and m[("pop3s", "verified")] >= 1, m
    assert m[("submissions", "refused")] >= 1 and m[("submissions", "verified")] >= 1, m
    assert not any(listener == "imaps-plain" for listener, _ in m), m


def client_certificate_counts(admin_port):
    """portcullis_client_certificates_total from /metrics, as {(listener, verdict): count}."""
    import re
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("portcullis_client_certificates_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out[(labels["listener"], labels["verdict"])] = float(line.rsplit(" ", 1)[1])
    return out


def test_trusted_certificate_logs_in_and_auth_service_sees_it(cert_proxy, pki, dovecot):
    AuthHandler.seen.clear()
    m = imaplib.IMAP4_SSL("127.0.0.1", cert_proxy.ports["imaps"], ssl_context=ctx_with(pki, "alice"), timeout=10)
    assert m.login(*DEMO)[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    h = AuthHandler.seen[-1]
    assert h["auth-ssl"] == "on"
    assert h["auth-ssl-verify"] == "SUCCESS"
    assert h["auth-ssl-subject"] == "CN=alice,O=Example"
    assert h["auth-ssl-issuer"] == "CN=ca root,O=Example"
    assert h["auth-ssl-serial"] == "1F42"
    assert h["auth-ssl-fingerprint"] == pki["alice_sha1"]
    pem = urllib.parse.unquote(h["auth-ssl-cert"])
    with open(os.path.join(pki["dir"], "alice.pem")) as f:
        assert pem.strip() == f.read().strip()


def test_starttls_listener_checks_after_the_upgrade(cert_proxy, pki):
    port = cert_proxy.ports["imap"]
    c = RawClient(port)
    try:
        assert c.line().startswith(b"* OK")
        c.send(b"a STARTTLS\r\n")
        assert c.line().startswith(b"a OK")
        c.starttls()  # no certificate
        assert c.read_to_close() == b"* BYE No required SSL certificate\r\n"
    finally:
        c.close()
    m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    m.starttls(ssl_context=ctx_with(pki, "alice"))
    assert m.login(*DEMO)[0] == "OK"
    m.logout()


def test_optional_and_optional_no_ca(cert_proxy, pki):
    p = cert_proxy.ports
    AuthHandler.seen.clear()
    # optional: no certificate is fine (Auth-SSL-Verify: NONE); an untrusted one is not.
    m = imaplib.IMAP4_SSL("127.0.0.1", p["imaps-optional"], ssl_context=ctx_with(pki), timeout=10)
    assert m.login(*DEMO)[0] == "OK"
    m.logout()
    assert AuthHandler.seen[-1]["auth-ssl-verify"] == "NONE"
    assert "auth-ssl-subject" not in AuthHandler.seen[-1]
    assert tls_lines(p["imaps-optional"], ctx_with(pki, "mallory")) == b"* BYE SSL certificate error\r\n"
    # optional_no_ca: an issuer nobody vouches for passes, and the service is told.
    m = imaplib.IMAP4_SSL("127.0.0.1", p["imaps-noca"], ssl_context=ctx_with(pki, "self"), timeout=10)
    assert m.login(*DEMO)[0] == "OK"
    m.logout()
    assert AuthHandler.seen[-1]["auth-ssl-verify"] == "FAILED:self-signed certificate"
    assert AuthHandler.seen[-1]["auth-ssl-subject"] == "CN=self"
    m = imaplib.IMAP4_SSL("127.0.0.1", p["imaps-noca"], ssl_context=ctx_with(pki, "mallory"), timeout=10)
    assert m.login(*DEMO)[0] == "OK"
    m.logout()
    assert AuthHandler.seen[-1]["auth-ssl-verify"] == "FAILED:unable to get local issuer certificate"
    m = client_certificate_counts(cert_proxy.admin)
    assert m[("imaps-noca", "unverified")] >= 2 and m[("imaps-optional", "none")] >= 1, m
    # ... but not an expired certificate.
    assert tls_lines(p["imaps-noca"], ctx_with(pki, "expired")) == b"* BYE SSL certificate error\r\n"
    # A listener without verify_client sends none of these headers.
    m = imaplib.IMAP4_SSL("127.0.0.1", p["imaps-plain"], ssl_context=ctx_with(pki, "alice"), timeout=10)
    assert m.login(*DEMO)[0] == "OK"
    m.logout()
    assert "auth-ssl-verify" not in AuthHandler.seen[-1] and AuthHandler.seen[-1]["auth-ssl"] == "on"


def test_pop3_and_smtp_clients_with_certificates(cert_proxy, pki):
    """poplib and smtplib see nginx's refusal as their protocols' errors."""
    with pytest.raises(poplib.error_proto, match="No required SSL certificate"):
        poplib.POP3_SSL("127.0.0.1", cert_proxy.ports["pop3s"], context=ctx_with(pki), timeout=10)
    with pytest.raises(smtplib.SMTPConnectError) as e:
        smtplib.SMTP_SSL("127.0.0.1", cert_proxy.ports["submissions"], context=ctx_with(pki, "mallory"), timeout=10)
    assert e.value.smtp_code == 421 and b"SSL certificate error" in e.value.smtp_error


def test_check_names_the_ca_file(tmp_path):
    """`portcullis check`: a missing CA file is reported with the file, line and field."""
    from servers import portcullis_binary
    cfg = tmp_path / "p.toml"
    cfg.write_text('[tls]\nself_signed_names = ["localhost"]\n[[listener]]\nname = "imaps"\nbind = "127.0.0.1:1"\n'
                   'protocol = "imap"\ntls = "implicit"\nverify_client = "on"\nclient_ca_file = "missing.pem"\n'
                   '[auth]\nsource = "backend"\n[[backend]]\nname = "b"\naddress = "127.0.0.1:2"\n[routing.imap]\ndefault = "b"\n')
    r = subprocess.run([portcullis_binary(), "check", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode != 0
    assert f"{cfg}:9:" in r.stderr + r.stdout and "listener[0].client_ca_file" in r.stderr + r.stdout
    assert str(tmp_path / "missing.pem") in r.stderr + r.stdout


def test_resumed_sessions_are_judged_again(cert_proxy, pki):
    """A TLS session resumed on a verify_client listener is judged by the certificate stored with
    it: alice's resumes and is served. A session from another listener (one that asked for no
    certificate, or trusts another CA) does not resume here at all: each listener that asks for
    client certificates keeps its own sessions, so the client does a full handshake and is
    judged by what it presents now."""
    p = cert_proxy.ports

    def greet(port, ctx, session=None):
        c = RawClient(port, tls=True, ctx=ctx, session=session)
        try:
            first = c.line()
            # A reply after the greeting: by then the TLS 1.3 ticket has arrived too.
            c.send(b"a NOOP\r\n")
            assert c.until_tagged(b"a")[-1].startswith(b"a OK")
            return first, c.sock.session, c.sock.session_reused
        finally:
            c.close()

    alice = ctx_with(pki, "alice")
    first, session, reused = greet(p["imaps"], alice)
    assert first.startswith(b"* OK") and not reused
    first, _, reused = greet(p["imaps"], alice, session)
    assert first.startswith(b"* OK") and reused
    # A session from the listener without verify_client would carry no certificate, and one
    # from the optional_no_ca listener a certificate this listener does not trust: neither
    # resumes, and both clients are refused.
    for source, ctx, refusal in (
        ("imaps-plain", ctx_with(pki), b"* BYE No required SSL certificate\r\n"),
        ("imaps-noca", ctx_with(pki, "self"), b"* BYE SSL certificate error\r\n"),
    ):
        first, session, _ = greet(p[source], ctx)
        assert first.startswith(b"* OK")
        c = RawClient(p["imaps"], tls=True, ctx=ctx, session=session)
        try:
            assert c.read_to_close() == refusal
            assert not c.sock.session_reused, source
        finally:
            c.close()


def test_replaced_ca_file_applies_to_new_sessions(dovecot, pki, tmp_path):
    """The client CA file is watched like the certificates: replacing it applies to the next
    handshake, and a session already logged in goes on."""
    import shutil
    ca = tmp_path / "client-ca.pem"
    shutil.copy(os.path.join(pki["dir"], "ca.pem"), ca)
    port = free_port()
    cfg = dovecot_proxy_config(dovecot, {"imaps": (port, ['verify_client = "on"', f'client_ca_file = "{ca}"'])})
    pc = Portcullis(str(tmp_path), cfg).start()
    try:
        assert wait_for_greeting(port, ctx_with(pki, "alice"))
        held = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx_with(pki, "alice"), timeout=10)
        assert held.login(*DEMO)[0] == "OK"
        tmp = tmp_path / "client-ca.pem.new"
        shutil.copy(os.path.join(pki["dir"], "other-ca.pem"), tmp)
        os.replace(tmp, ca)
        wait_for(lambda: tls_lines_first(port, ctx_with(pki, "mallory")).startswith(b"* OK"), timeout=10, interval=0.1)
        assert tls_lines_first(port, ctx_with(pki, "mallory")).startswith(b"* OK")
        assert tls_lines(port, ctx_with(pki, "alice")) == b"* BYE SSL certificate error\r\n"
        assert held.noop()[0] == "OK"
        held.logout()
    finally:
        pc.stop()


def wait_for_greeting(port, ctx, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return tls_lines_first(port, ctx).startswith(b"* OK")
        except OSError:
            time.sleep(0.1)
    return False


def test_sasl_external_with_a_trusted_certificate(cert_proxy, pki, dovecot):
    """SASL EXTERNAL (nginx's `auth external`): offered only with an accepted client certificate
    and an auth service; the service sees Auth-Method external and the certificate, and gives the
    password to replay (IMAP, POP3) or names an XCLIENT backend (SMTP)."""
    import base64
    p = cert_proxy.ports
    AuthHandler.seen.clear()
    m = imaplib.IMAP4_SSL("127.0.0.1", p["imaps"], ssl_context=ctx_with(pki, "alice"), timeout=10)
    assert "AUTH=EXTERNAL" in m.capabilities
    before = sum(1 for f in dovecot.logins() if f.get("user") == DEMO[0])
    assert m.authenticate("EXTERNAL", lambda _: DEMO[0].encode())[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    h = AuthHandler.seen[-1]
    assert (h["auth-method"], h["auth-user"], h["auth-pass"]) == ("external", DEMO[0], "")
    assert wait_for(lambda: sum(1 for f in dovecot.logins() if f.get("user") == DEMO[0]) > before)
    # Another certificate for the same user: the service's refusal, in its own words.
    m = imaplib.IMAP4_SSL("127.0.0.1", p["imaps-noca"], ssl_context=ctx_with(pki, "self"), timeout=10)
    assert "AUTH=EXTERNAL" in m.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="Certificate not accepted"):
        m.authenticate("EXTERNAL", lambda _: DEMO[0].encode())
    # The service said OK but gave no password to replay: a temporary failure, not a login.
    m = imaplib.IMAP4_SSL("127.0.0.1", p["imaps"], ssl_context=ctx_with(pki, "alice"), timeout=10)
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        m.authenticate("EXTERNAL", lambda _: b"nopass@example.test")
    m.logout()
    # No certificate (optional), or no verify_client: not offered, and refused if tried.
    for port, ctx in ((p["imaps-optional"], ctx_with(pki)), (p["imaps-plain"], ctx_with(pki, "alice"))):
        m = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=10)
        assert "AUTH=EXTERNAL" not in m.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="Unsupported authentication mechanism"):
            m.authenticate("EXTERNAL", lambda _: DEMO[0].encode())
        m.logout()
    # POP3: AUTH EXTERNAL, then the mailbox.
    c = RawClient(p["pop3s"], tls=True, ctx=ctx_with(pki, "alice"))
    try:
        assert c.line().startswith(b"+OK")
        c.send(b"CAPA\r\n")
        capa = b""
        while not capa.endswith(b"\r\n.\r\n"):
            capa += c.line()
        assert b"SASL PLAIN LOGIN EXTERNAL\r\n" in capa
        c.send(b"AUTH EXTERNAL " + base64.b64encode(DEMO[0].encode()) + b"\r\n")
        assert c.line().startswith(b"+OK"), "POP3 EXTERNAL login"
        c.send(b"STAT\r\n")
        assert c.line().startswith(b"+OK ")
    finally:
        c.close()
    # SMTP: AUTH EXTERNAL, then XCLIENT LOGIN= to Postfix, which now relays for the client
    # (permit_sasl_authenticated; an unauthenticated client gets "Relay access denied"). No
    # message is sent: the shared Dovecot's INBOX counts belong to other tests.
    s = smtplib.SMTP_SSL("127.0.0.1", p["submissions"], context=ctx_with(pki, "alice"), timeout=10)
    s.ehlo("client.example")
    assert "EXTERNAL" in s.esmtp_features.get("auth", "").split()
    code, _ = s.docmd("AUTH", "EXTERNAL " + base64.b64encode(DEMO[0].encode()).decode())
    assert code == 235
    assert s.mail(DEMO[0])[0] == 250
    assert s.rcpt("someone@elsewhere.test")[0] == 250
    s.rset()
    s.quit()


def make_crl(pki, d, revoke):
    """A CRL from the trusted CA revoking the certificates in `revoke` (PEM paths), made the way
    a CA operator makes one: `openssl ca -revoke`, then `openssl ca -gencrl`."""
    d.mkdir(exist_ok=True)
    (d / "ca.cnf").write_text("[ca]\ndefault_ca = ca_default\n[ca_default]\ndatabase = index.txt\n"
                              "crlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 7\n")
    (d / "index.txt").write_text("")
    (d / "crlnumber").write_text("01\n")
    ca = ["-config", "ca.cnf", "-cert", os.path.join(pki["dir"], "ca.pem"), "-keyfile", os.path.join(pki["dir"], "ca.key")]
    for pem in revoke:
        openssl("ca", *ca, "-revoke", pem, cwd=d)
    openssl("ca", *ca, "-gencrl", "-out", "crl.pem", cwd=d)
    return d / "crl.pem"


def next_update(crl):
    import ssl
    out = subprocess.run(["openssl", "crl", "-in", str(crl), "-noout", "-nextupdate"], check=True,
                         capture_output=True, text=True).stdout
    return ssl.cert_time_to_seconds(out.split("=", 1)[1].strip())


def crl_next_update(admin_port):
    """portcullis_client_crl_next_update_timestamp_seconds from /metrics, by listener."""
    import re
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    return {re.search(r'listener="([^"]*)"', line).group(1): float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("portcullis_client_crl_next_update_timestamp_seconds{")}


def test_revoked_certificates_are_refused(dovecot, pki, tmp_path):
    """nginx's ssl_crl: a certificate the CA revoked gets nginx's error line, before any greeting
    and before Dovecot hears of it; a replaced CRL applies to the next handshake, while a session
    already logged in goes on; `portcullis check` names a CRL file that holds no CRL."""
    import shutil
    d = pki["dir"]
    issue(tmp_path, "bob", f"{d}/ca", "0x0B0B", f"{d}/client.ext")
    bob = client_tls_context()
    bob.load_cert_chain(str(tmp_path / "bob.pem"), str(tmp_path / "bob.key"))
    crl = tmp_path / "crl.pem"
    shutil.copy(make_crl(pki, tmp_path / "ca1", [str(tmp_path / "bob.pem")]), crl)
    port, admin = free_port(), free_port()
    settings = ['verify_client = "on"', f'client_ca_file = "{d}/ca.pem"', f'client_crl_file = "{crl}"']
    cfg = dovecot_proxy_config(dovecot, {"imaps": (port, settings)}, admin=admin)
    pc = Portcullis(str(tmp_path), cfg).start()
    try:
        assert wait_for_greeting(port, ctx_with(pki, "alice"))
        before = len(dovecot.logins())
        assert tls_lines(port, bob) == b"* BYE SSL certificate error\r\n"
        assert "certificate revoked" in pc.log()
        assert len(dovecot.logins()) == before
        # When the CRL runs out, for an alert before every certificate is refused.
        assert crl_next_update(admin) == {"imaps": next_update(crl)}
        held = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx_with(pki, "alice"), timeout=10)
        assert held.login(*DEMO)[0] == "OK"
        # The CA revokes alice too; the new CRL is swapped in under the proxy.
        tmp = tmp_path / "crl.pem.new"
        shutil.copy(make_crl(pki, tmp_path / "ca2", [str(tmp_path / "bob.pem"), os.path.join(d, "alice.pem")]), tmp)
        os.replace(tmp, crl)
        wait_for(lambda: tls_lines_first(port, ctx_with(pki, "alice")).startswith(b"* BYE"), timeout=10, interval=0.1)
        assert tls_lines(port, ctx_with(pki, "alice")) == b"* BYE SSL certificate error\r\n"
        assert held.noop()[0] == "OK"
        held.logout()
    finally:
        pc.stop()
    from servers import portcullis_binary
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.replace(f'client_crl_file = "{crl}"', f'client_crl_file = "{d}/ca.pem"'))
    r = subprocess.run([portcullis_binary(), "check", "--config", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    line = cfg.splitlines().index(f'client_crl_file = "{crl}"') + 1
    assert f"{bad}:{line}:" in r.stderr + r.stdout and "listener[0].client_crl_file" in r.stderr + r.stdout, r.stderr
    assert "no CRLs" in r.stderr + r.stdout


def test_verify_depth_limits_intermediates(dovecot, pki, tmp_path):
    """nginx's ssl_verify_depth, counted as OpenSSL 1.1+ does, default 1: a certificate from an
    intermediate CA (sent by the client with its own) passes by default and is refused where
    the listener allows no intermediate (depth 0)."""
    d = pki["dir"]
    (tmp_path / "int.ext").write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n")
    issue(tmp_path, "int", f"{d}/ca", "0x33", "int.ext", cn="intermediate")
    issue(tmp_path, "carol", "int", "0x44", f"{d}/client.ext")
    (tmp_path / "carol-chain.pem").write_text((tmp_path / "carol.pem").read_text() + (tmp_path / "int.pem").read_text())
    carol = client_tls_context()
    carol.load_cert_chain(str(tmp_path / "carol-chain.pem"), str(tmp_path / "carol.key"))
    ports = {"imaps": free_port(), "imaps-depth0": free_port()}
    settings = ['verify_client = "on"', f'client_ca_file = "{d}/ca.pem"']
    cfg = dovecot_proxy_config(dovecot, {"imaps": (ports["imaps"], settings),
                                         "imaps-depth0": (ports["imaps-depth0"], settings + ["client_verify_depth = 0"])})
    pc = Portcullis(str(tmp_path), cfg).start()
    try:
        assert wait_for_greeting(ports["imaps"], ctx_with(pki, "alice"))
        m = imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=carol, timeout=10)
        assert m.login(*DEMO)[0] == "OK"
        m.logout()
        assert tls_lines_first(ports["imaps-depth0"], ctx_with(pki, "alice")).startswith(b"* OK")
        assert tls_lines(ports["imaps-depth0"], carol) == b"* BYE SSL certificate error\r\n"
        assert "certificate chain too long" in pc.log()
    finally:
        pc.stop()
