"""Load balancing end to end: two real Dovecot instances as one pool behind the real binary, and
an nginx-style auth_http service written as nginx's documentation describes one.

Which Dovecot served a login is read from that Dovecot's own log (`Login: user=<...>`).
"""

import http.server
import imaplib
import threading
import time
import urllib.parse

import pytest

from servers import Dovecot, IMAP4SSLFrom, Portcullis, free_port, wait_for

USERS = {f"u{i}@example.test": "pw" for i in range(24)}


@pytest.fixture(scope="module")
def dovecots(tmp_path_factory):
    d1 = Dovecot(str(tmp_path_factory.mktemp("d1")), USERS).start()
    d2 = Dovecot(str(tmp_path_factory.mktemp("d2")), USERS).start()
    try:
        yield d1, d2
    finally:
        d1.stop()
        d2.stop()


def logins(dv, user):
    return sum(1 for f in dv.logins() if f.get("user") == user)


def where(d1, d2, user):
    return [name for name, dv in (("d1", d1), ("d2", d2)) if logins(dv, user)]


def pool_config(d1, d2, port, users_path, d1_state="up", extra=""):
    return f"""
[tls]
self_signed_names = ["localhost"]

[[listener]]
name = "imaps"
bind = "127.0.0.1:{port}"
protocol = "imap"
tls = "implicit"

[auth]
passwd_file = "{users_path}"

[limits]
auth_failure_delay = "100ms"
backend_connect_timeout = "1s"

[[backend]]
name = "d1"
address = "127.0.0.1:{d1.imap_port}"
state = "{d1_state}"
[backend.health]
interval = "300ms"
timeout = "1s"
rise = 2
fall = 1

[[backend]]
name = "d2"
address = "127.0.0.1:{d2.imap_port}"
[backend.health]
interval = "300ms"
timeout = "1s"
rise = 2
fall = 1

[[pool]]
name = "dovecots"
backends = ["d1", "d2"]

[routing]
default = "dovecots"
{extra}
"""


@pytest.fixture
def pool_proxy(dovecots, tmp_path):
    d1, d2 = dovecots
    users_path = tmp_path / "users"
    users_path.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in USERS.items()))
    port = free_port()
    pc = Portcullis(str(tmp_path), pool_config(d1, d2, port, users_path))
    pc.start(wait_port=port, tls=True)
    pc.port = port
    pc.users_path = users_path
    try:
        yield pc
    finally:
        pc.stop()


def login(port, user, password="pw"):
    m = IMAP4SSLFrom("127.0.0.1", port)
    m.login(user, password)
    return m


def test_each_user_lands_consistently_on_one_backend(dovecots, pool_proxy):
    d1, d2 = dovecots
    homes = {}
    for user in USERS:
        for _ in range(2):
            login(pool_proxy.port, user).logout()
        assert wait_for(lambda: logins(d1, user) + logins(d2, user) >= 2)
        seen = where(d1, d2, user)
        assert len(seen) == 1, f"{user} landed on {seen}"
        homes[user] = seen[0]
    assert set(homes.values()) == {"d1", "d2"}, homes


def test_failover_and_return(dovecots, pool_proxy):
    d1, d2 = dovecots
    # Where does each user live now?
    homes = {}
    for user in USERS:
        before = (logins(d1, user), logins(d2, user))
        login(pool_proxy.port, user).logout()
        assert wait_for(lambda: (logins(d1, user), logins(d2, user)) != before)
        homes[user] = "d1" if logins(d1, user) > before[0] else "d2"
    d1_users = [u for u, h in homes.items() if h == "d1"]
    d2_users = [u for u, h in homes.items() if h == "d2"]
    assert d1_users and d2_users
    d1.stop()
    try:
        # Its users' next logins succeed on d2, before the client sees any error.
        for user in d1_users[:4] + d2_users[:2]:
            before = logins(d2, user)
            m = login(pool_proxy.port, user)
            assert m.select("INBOX")[0] == "OK"
            m.logout()
            assert wait_for(lambda: logins(d2, user) > before)
    finally:
        d1.start()
    # Back up: after the health checks see it (rise = 2), its users return.
    user = d1_users[0]

    def returned():
        before = logins(d1, user)
        login(pool_proxy.port, user).logout()
        return wait_for(lambda: logins(d1, user) > before, timeout=1.0)

    assert wait_for(returned, timeout=15.0, interval=0.3)
    assert "backend is down" in pool_proxy.log() and "backend is up" in pool_proxy.log()


def lands_on(dv, port, user):
    """Log `user` in and out through the proxy; whether this login reached `dv`."""
    before = logins(dv, user)
    login(port, user).logout()
    return wait_for(lambda: logins(dv, user) > before, timeout=2)


def test_draining_by_reload(dovecots, pool_proxy):
    d1, d2 = dovecots
    # A user whose login lands on d1 now (not only in an earlier test's history).
    user = next(u for u in USERS if lands_on(d1, pool_proxy.port, u))
    before = logins(d1, user)
    early = login(pool_proxy.port, user)
    early.select("INBOX")
    assert wait_for(lambda: logins(d1, user) > before), "the early session is not on d1"
    reloads = pool_proxy.log().count("configuration reloaded")
    pool_proxy.write_config(pool_config(d1, d2, pool_proxy.port, pool_proxy.users_path, d1_state="draining"))
    assert wait_for(lambda: pool_proxy.log().count("configuration reloaded") > reloads), pool_proxy.log()[-2000:]
    before = logins(d2, user)
    m = login(pool_proxy.port, user)
    m.logout()
    assert wait_for(lambda: logins(d2, user) > before), "new session did not go to d2"
    # The session already on d1 goes on.
    assert early.noop()[0] == "OK"
    assert early.select("INBOX")[0] == "OK"
    early.logout()


class AuthHandler(http.server.BaseHTTPRequestHandler):
    """An auth_http service as nginx's docs describe: headers in, Auth-Status and friends out."""

    routes = {}
    seen = []

    def do_GET(self):
        user = urllib.parse.unquote(self.headers.get("Auth-User", ""))
        password = urllib.parse.unquote(self.headers.get("Auth-Pass", ""))
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        if user == "waiter@example.test":
            self.send_header("Auth-Status", "Temporary lockout")
            self.send_header("Auth-Wait", "1")
        elif USERS.get(user) == password:
            route = self.routes[user]
            self.send_header("Auth-Status", "OK")
            if isinstance(route, tuple):
                self.send_header("Auth-Server", route[0])
                self.send_header("Auth-Port", str(route[1]))
            else:
                self.send_header("Auth-Server", route)
        else:
            self.send_header("Auth-Status", "Invalid login or password")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_service():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthHandler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_auth_http_service_drives_logins_like_nginx(dovecots, auth_service, tmp_path):
    d1, d2 = dovecots
    port = free_port()
    cfg = pool_config(d1, d2, port, tmp_path / "unused").replace(
        f'[auth]\npasswd_file = "{tmp_path / "unused"}"',
        f'[auth]\nsource = "http"\n[auth.http]\nurls = ["http://127.0.0.1:{auth_service}/mail/auth"]\nheaders = {{ "X-Auth-Key" = "k" }}',
    )
    pc = Portcullis(str(tmp_path), cfg).start(wait_port=port, tls=True)
    try:
        users = list(USERS)
        AuthHandler.routes = {users[0]: ("127.0.0.1", d2.imap_port), users[1]: "dovecots"}
        # Auth-Server + Auth-Port: exactly that Dovecot.
        before = logins(d2, users[0])
        login(port, users[0]).logout()
        assert wait_for(lambda: logins(d2, users[0]) > before)
        # Auth-Server naming a pool: the rendezvous choice, healthy: one of the two, and the one
        # the same pool chose for this user in the tests before (if they ran), this login's.
        earlier = where(d1, d2, users[1])
        b1, b2 = logins(d1, users[1]), logins(d2, users[1])
        login(port, users[1]).logout()
        assert wait_for(lambda: logins(d1, users[1]) + logins(d2, users[1]) > b1 + b2)
        landed = [n for n, dv, b in (("d1", d1, b1), ("d2", d2, b2)) if logins(dv, users[1]) > b]
        assert len(landed) == 1, landed
        assert len(earlier) != 1 or earlier == landed, (earlier, landed)
        # A refusal: the service's text, then the connection closes (no Auth-Wait).
        m = IMAP4SSLFrom("127.0.0.1", port)
        with pytest.raises(imaplib.IMAP4.error, match="Invalid login or password"):
            m.login(users[2], "wrong")
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            m.noop()
        # Auth-Wait: the refusal comes after the wait, and the client may retry.
        m = IMAP4SSLFrom("127.0.0.1", port)
        start = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error, match="Temporary lockout"):
            m.login("waiter@example.test", "x")
        assert time.monotonic() - start >= 0.9
        assert m.noop()[0] == "OK"
        m.logout()
        req = AuthHandler.seen[0]
        assert req["auth-method"] == "plain" and req["auth-protocol"] == "imap"
        assert req["client-ip"] == "127.0.0.2" and req["x-auth-key"] == "k"
        assert req["auth-ssl"] == "on" and req["auth-ssl-protocol"].startswith("TLSv1.")
    finally:
        pc.stop()
