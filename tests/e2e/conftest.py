"""Fixtures for the end-to-end suite: one real Dovecot and one real portcullis for the whole run,
plus a fresh portcullis per test for the tests that rewrite its configuration.

Everything listens on 127.0.0.1 high ports from free_port() and lives under pytest's temp dirs.
A missing Dovecot or binary is an error (the fixture raises), never a skip.
"""

import base64
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers  # noqa: E402
from servers import Dovecot, Portcullis, Postfix, free_port, portcullis_binary  # noqa: E402


@pytest.fixture(autouse=True)
def stop_what_the_test_started():
    """Every Dovecot and portcullis a test started is stopped (by PID) when it ends, also when
    it failed before its own try/finally: a leaked Dovecot keeps its ports and processes.
    Servers of module and session fixtures, set up before this, are left to their fixtures,
    also when the test restarted them."""
    n = len(servers.RUNNING)
    yield
    # Not a fixture's server the test restarted (test_pools restarts a module's Dovecot).
    started = [s for s in servers.RUNNING[n:] if not any(s is t for t in servers.RUNNING[:n])]
    del servers.RUNNING[n:]
    for server in reversed(started):
        server.stop()

# Users as the proxy knows them (user -> password the client types).
DEMO = ("demo@example.test", "demo")
WEIRD = ("weird@example.test", 'wei"rd \\ pa ss w\u00f6rd')
QUOTED = ("quoted@example.test", 'q"uo\\ted pass')
DEAD = ("d@dead.test", "deadpw")
MASTER = ("m@master.test", "mpw")
HAPROXY = ("h@haproxy.test", "hpw")
# The proxy accepts this password, Dovecot does not (their user files disagree).
DRIFT = ("drift@example.test", "proxy-side-pw")

# Dovecot's own users. m@master.test has a password there that no client knows: a login only
# succeeds if the proxy logs in as the master user.
DOVECOT_USERS = {
    DEMO[0]: DEMO[1],
    WEIRD[0]: WEIRD[1],
    QUOTED[0]: QUOTED[1],
    MASTER[0]: "only-the-master-gets-in",
    HAPROXY[0]: HAPROXY[1],
    DRIFT[0]: "dovecot-side-pw",
}

SMALL_MESSAGE = (
    b"From: welcome@example.test\r\n"
    b"To: demo@example.test\r\n"
    b"Subject: small e2e message\r\n"
    b"Message-ID: <small@e2e.example.test>\r\n"
    b"\r\n"
    b"This message was fetched through the proxy.\r\n"
)


def big_message(size=10 * 1024 * 1024):
    """About `size` bytes: headers, then random printable 76-character lines, all CRLF."""
    head = (
        b"From: bulk@example.test\r\n"
        b"To: demo@example.test\r\n"
        b"Subject: big e2e message\r\n"
        b"Message-ID: <big@e2e.example.test>\r\n"
        b"\r\n"
    )
    raw = base64.b64encode(os.urandom(size * 3 // 4))
    lines = [raw[i : i + 76] for i in range(0, len(raw), 76)]
    body = b"\r\n".join(lines) + b"\r\n"
    return head + body[: size - len(head) - 2].rstrip(b"\r\n") + b"\r\n"


def write_users_file(path, skip=()):
    hashed = subprocess.run(
        [portcullis_binary(), "hash-password"], input=DEMO[1].encode(), capture_output=True, check=True
    ).stdout.decode().strip()
    assert hashed.startswith("{ARGON2ID}$argon2id$"), hashed
    lines = [f"{DEMO[0]}:{hashed}"]
    for user, pw in (WEIRD, QUOTED, DEAD, MASTER, HAPROXY, DRIFT):
        if user not in skip:
            lines.append(f"{user}:{{PLAIN}}{pw}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def toml_str(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ProxySetup:
    """A portcullis config: listener ports, backends, and the text that describes them."""

    def __init__(self, dovecot, workdir, listeners=None, postfix=None, admin_port=None):
        self.dovecot = dovecot
        self.postfix = postfix
        # With a port, the config gets an [admin] table (/metrics, /healthz, /readyz) on loopback.
        self.admin_port = admin_port
        self.dead_port = free_port()  # nothing listens here
        self.listeners = listeners or [
            ("imaps", free_port(), "implicit"),
            ("imap", free_port(), "starttls"),
        ]
        if postfix is not None and listeners is None:
            self.listeners += [
                ("pop3s", free_port(), "implicit", "pop3"),
                ("pop3", free_port(), "starttls", "pop3"),
                ("submissions", free_port(), "implicit", "smtp"),
                ("submission", free_port(), "starttls", "smtp"),
            ]
        self.users_path = os.path.join(workdir, "portcullis", "users")
        os.makedirs(os.path.dirname(self.users_path), exist_ok=True)
        write_users_file(self.users_path)

    def port(self, name):
        return next(entry[1] for entry in self.listeners if entry[0] == name)

    def text(self, extra_listeners=(), limits=None, drop_listeners=()):
        out = [
            "[log]",
            'format = "text"',
            'level = "info"',
            "",
            "[tls]",
            'self_signed_names = ["localhost"]',
            "",
        ]
        out = ["[server]", 'hostname = "proxy.example.test"', ""] + out
        if self.admin_port is not None:
            out += ["[admin]", f'bind = "127.0.0.1:{self.admin_port}"', ""]
        for name, port, tls, *proto in list(self.listeners) + list(extra_listeners):
            if name in drop_listeners:
                continue
            out += [
                "[[listener]]",
                f"name = {toml_str(name)}",
                f'bind = "127.0.0.1:{port}"',
                f"protocol = {toml_str(proto[0] if proto else 'imap')}",
                f"tls = {toml_str(tls)}",
                "",
            ]
        dv = self.dovecot
        out += [
            "[auth]",
            'source = "passwd-file"',
            f"passwd_file = {toml_str(self.users_path)}",
            "",
            # The suite fails logins from 127.0.0.2 on purpose, many times: throttling has its
            # own tests (test_abuse.py).
            "[throttle]",
            "enabled = false",
            "",
            "[limits]",
            'auth_failure_delay = "200ms"',
            *[f"{k} = {v}" for k, v in (limits or {}).items()],
            "",
            "[[backend]]",
            'name = "dovecot"',
            'health = { enabled = false }',
            f'address = "127.0.0.1:{dv.imap_port}"',
            'transport = "plain"',
            'client_address = "imap-id"',
            'login = "replay"',
            "",
            "[[backend]]",
            'name = "dead"',
            f'address = "127.0.0.1:{self.dead_port}"',
            "",
            "[[backend]]",
            'name = "master"',
            'health = { enabled = false }',
            f'address = "127.0.0.1:{dv.imap_port}"',
            'login = "master"',
            'master_user = "master"',
            'master_password = "masterpw"',
            "",
            "[[backend]]",
            'name = "haproxy"',
            'health = { enabled = false }',
            f'address = "127.0.0.1:{dv.haproxy_port}"',
            'client_address = "proxy-v2"',
            "",
            # A pool of one, so pool metrics exist (nothing routes through it).
            "[[pool]]",
            'name = "imap-pool"',
            'backends = ["dovecot"]',
            "",
            "[routing.imap]",
            'default = "dovecot"',
            'domains = { "dead.test" = "dead", "master.test" = "master", "haproxy.test" = "haproxy" }',
            "",
        ]
        if self.postfix is not None:
            out += [
                "[[backend]]",
                'name = "dovecot-pop3"',
            'health = { enabled = false }',
                'protocol = "pop3"',
                f'address = "127.0.0.1:{dv.pop3_port}"',
                'client_address = "xclient"',
                'login = "replay"',
                "",
                "[[backend]]",
                'name = "postfix"',
            'health = { enabled = false }',
                'protocol = "smtp"',
                f'address = "127.0.0.1:{self.postfix.port}"',
                'client_address = "xclient"',
                'login = "xclient"',
                "",
                "[routing.pop3]",
                'default = "dovecot-pop3"',
                "",
                "[routing.smtp]",
                'default = "postfix"',
                "",
            ]
        return "\n".join(out)


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory):
    dv = Dovecot(str(tmp_path_factory.mktemp("dovecot")), DOVECOT_USERS).start()
    try:
        dv.deliver(DEMO[0], SMALL_MESSAGE, name="small")
        # Let Dovecot give the small message UID 1 before the big one arrives.
        import imaplib

        with imaplib.IMAP4("127.0.0.1", dv.imap_port, timeout=10) as m:
            m.login(*DEMO)
            typ, data = m.select("INBOX")
            assert typ == "OK" and data == [b"1"], data
            m.logout()
        dv.big_message = big_message()
        dv.deliver(DEMO[0], dv.big_message, name="big")
        dv.small_message = SMALL_MESSAGE
        yield dv
    finally:
        dv.stop()


class RunningProxy:
    def __init__(self, setup, pc):
        self.setup = setup
        self.pc = pc
        self.imaps = setup.port("imaps")
        self.imap = setup.port("imap")

    def log(self):
        return self.pc.log()


def start_proxy(dovecot, workdir, postfix=None, admin_port=None):
    setup = ProxySetup(dovecot, workdir, postfix=postfix, admin_port=admin_port)
    pc = Portcullis(workdir, setup.text())
    pc.start(wait_port=setup.port("imaps"), tls=True)
    return RunningProxy(setup, pc)


@pytest.fixture(scope="session")
def proxy(dovecot, tmp_path_factory):
    """The shared proxy. Tests must not change its configuration."""
    p = start_proxy(dovecot, str(tmp_path_factory.mktemp("proxy")))
    try:
        yield p
    finally:
        p.pc.stop()


@pytest.fixture
def own_proxy(dovecot, tmp_path):
    """A proxy of the test's own, for tests that rewrite the configuration."""
    p = start_proxy(dovecot, str(tmp_path))
    try:
        yield p
    finally:
        p.pc.stop()


@pytest.fixture(scope="session")
def postfix(dovecot, tmp_path_factory):
    """A real Postfix submission backend delivering into the Dovecot mail root."""
    pf = Postfix(str(tmp_path_factory.mktemp("postfix")), dovecot.mail_root, list(DOVECOT_USERS)).start()
    try:
        yield pf
    finally:
        pf.stop()


@pytest.fixture(scope="session")
def mail_proxy(dovecot, postfix, tmp_path_factory):
    """A proxy with IMAP, POP3 and submission listeners in front of Dovecot and Postfix."""
    p = start_proxy(dovecot, str(tmp_path_factory.mktemp("mailproxy")), postfix=postfix)
    p.postfix = postfix
    try:
        yield p
    finally:
        p.pc.stop()
