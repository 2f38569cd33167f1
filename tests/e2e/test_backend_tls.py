"""TLS to the backend: portcullis upgrades its IMAP (STARTTLS) and POP3 (STLS) connections to a
real Dovecot that refuses logins without TLS (`ssl = required`), verifying Dovecot's certificate
against a CA file. Dovecot's login log says each login arrived over TLS.

Clients talk plaintext to the proxy here (a loopback test listener with allow_plaintext_auth):
what is under test is the proxy's own backend leg.
"""

import imaplib
import poplib

import pytest

from acme_servers import make_ca
from conftest import DEMO
from servers import Dovecot, Portcullis, free_port, wait_for


@pytest.fixture
def tls_dovecot(tmp_path):
    d = str(tmp_path)
    ca, cert, key = make_ca(d)  # a CA and a leaf for localhost
    # No login without TLS: ssl = required, and loopback is no longer a trusted network. Dovecot
    # also counts a connection whose two ends have the same address as secure, so the proxy
    # reaches this Dovecot on listeners at 127.0.0.2 (its connections come from 127.0.0.1).
    far_imap, far_pop3 = free_port(), free_port()
    extra = f"""ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
login_trusted_networks =
service imap-login {{
  inet_listener imap_far {{
    address = 127.0.0.2
    port = {far_imap}
  }}
}}
service pop3-login {{
  inet_listener pop3_far {{
    address = 127.0.0.2
    port = {far_pop3}
  }}
}}
"""
    dv = Dovecot(d, {DEMO[0]: DEMO[1]}, extra_conf=extra).start()
    dv.ca, dv.far_imap, dv.far_pop3 = ca, far_imap, far_pop3
    try:
        yield dv
    finally:
        dv.stop()


def proxy_config(dv, imap_port, pop3_port, server_name="localhost", ca=True):
    def backend(name, protocol, port):
        return "\n".join([
            "[[backend]]",
            f'name = "{name}"',
            f'protocol = "{protocol}"',
            f'address = "127.0.0.2:{port}"',
            'transport = "starttls"',
            f'tls_ca_file = "{dv.ca}"' if ca else "",
            f'tls_server_name = "{server_name}"',
            'client_address = "none"',
            'login = "replay"',
            "health = { enabled = false }",
            "",
        ])

    listeners = []
    for name, port, protocol in (("imap", imap_port, "imap"), ("pop3", pop3_port, "pop3")):
        listeners += [
            "[[listener]]",
            f'name = "{name}"',
            f'bind = "127.0.0.1:{port}"',
            f'protocol = "{protocol}"',
            'tls = "none"',
            "allow_plaintext_auth = true",
            "",
        ]
    return "\n".join([
        "[log]", 'format = "text"', 'level = "info"', "",
        "[tls]", 'self_signed_names = ["localhost"]', "",
        *listeners,
        "[auth]", 'source = "backend"', "",
        "[throttle]", "enabled = false", "",
        backend("dovecot-imap", "imap", dv.far_imap),
        backend("dovecot-pop3", "pop3", dv.far_pop3),
        "[routing.imap]", 'default = "dovecot-imap"', "",
        "[routing.pop3]", 'default = "dovecot-pop3"', "",
    ])


def test_backend_starttls_and_stls_to_dovecot(tls_dovecot, tmp_path):
    dv = tls_dovecot
    # Without TLS this Dovecot refuses the login, so a proxy login below can only work over TLS.
    with imaplib.IMAP4("127.0.0.2", dv.far_imap, timeout=10) as m:
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            m.login(*DEMO)
    p = poplib.POP3("127.0.0.2", dv.far_pop3, timeout=10)
    with pytest.raises(poplib.error_proto, match="Plaintext authentication disallowed"):
        p.user(DEMO[0])  # Dovecot refuses USER itself here
    p.quit()
    imap_port, pop3_port = free_port(), free_port()
    pc = Portcullis(str(tmp_path), proxy_config(dv, imap_port, pop3_port))
    pc.start(wait_port=imap_port)
    try:
        with imaplib.IMAP4("127.0.0.1", imap_port, timeout=10) as m:
            typ, _ = m.login(*DEMO)
            assert typ == "OK"
            typ, data = m.select("INBOX")
            assert typ == "OK", data
            m.logout()
        p = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
        p.user(DEMO[0])
        assert p.pass_(DEMO[1]).startswith(b"+OK")
        assert p.stat() == (0, 0)
        p.quit()
        logins = wait_for(lambda: len(dv.logins()) >= 2 and dv.logins(), timeout=10)
        assert [(l["service"], l["user"], l.get("TLS")) for l in logins] == [
            ("imap-login", DEMO[0], True),
            ("pop3-login", DEMO[0], True),
        ], dv.info_log()
    finally:
        pc.stop()


@pytest.mark.parametrize("server_name,ca", [("wrong.example", True), ("localhost", False)], ids=["wrong name", "untrusted CA"])
def test_backend_certificate_that_does_not_verify_fails_closed(tls_dovecot, tmp_path, server_name, ca):
    """Reliability cases 14 and 72: a backend certificate for another name, or from a CA the proxy
    does not trust (system roots only), ends the login attempt with a temporary failure; nothing
    is sent in plaintext instead, and Dovecot sees no login."""
    dv = tls_dovecot
    imap_port, pop3_port = free_port(), free_port()
    pc = Portcullis(str(tmp_path), proxy_config(dv, imap_port, pop3_port, server_name, ca))
    pc.start(wait_port=imap_port)
    try:
        before = len(pc.log())
        with imaplib.IMAP4("127.0.0.1", imap_port, timeout=10) as m:
            with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
                m.login(*DEMO)
        p = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
        p.user(DEMO[0])
        with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
            p.pass_(DEMO[1])
        p.quit()
        # The proxy says why: the certificate check, for this name or this issuer.
        why = {"wrong.example": "not valid for name \"wrong.example\"", "localhost": "UnknownIssuer"}[server_name]
        logged = wait_for(lambda: pc.log()[before:].count("invalid peer certificate") >= 2 and pc.log()[before:], timeout=10)
        assert logged and "backend login failed" in logged and why in logged, pc.log()[before:]
        assert dv.logins() == []
        # And Dovecot's side: this Dovecot refuses a plaintext login anyway, so the replies above
        # would be the same had the proxy gone on without TLS. Each of the proxy's connections
        # (one IMAP, one POP3; there is no other client of these ports) ended in the handshake,
        # having sent nothing else.
        def far_lines():
            lines = [l for l in dv.log().splitlines() if "Disconnected" in l and "lip=127.0.0.2" in l]
            return len(lines) >= 2 and lines
        lines = wait_for(far_lines, timeout=10)
        assert lines and len(lines) == 2, dv.log()
        assert all("TLS handshaking" in l and "no auth attempts" in l for l in lines), lines
        assert [f"lport={port}" in l for l, port in zip(lines, (dv.far_imap, dv.far_pop3))] == [True, True], lines
    finally:
        pc.stop()
