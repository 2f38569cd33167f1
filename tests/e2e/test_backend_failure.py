"""A backend that goes away under logged-in clients (reliability case 74): with
`limits.backend_disconnect_spread`, each client gets what Dovecot said last at once; beyond the
first second's share of the backend's sessions (sessions / spread), each connection is closed
after a random delay up to the spread, so the clients of a failed backend do not all reconnect
in the same instant.
"""

import imaplib
import threading
import time

from conftest import DEMO
from servers import Dovecot, Portcullis, free_port, imap_to_dovecot

SPREAD = 5.0
CLIENTS = 30


def config(port, dovecot):
    return imap_to_dovecot(port, dovecot, f"""
[auth]
source = "backend"

[throttle]
enabled = false

[limits]
backend_disconnect_spread = "{SPREAD}s"
max_sessions_per_user = 0
max_connections_per_ip = 0
""")


def test_clients_of_a_stopped_backend_are_closed_spread_out(tmp_path):
    # One user, many sessions from one address: above Dovecot's default of 10 per user and IP.
    dv = Dovecot(str(tmp_path / "dovecot"), {DEMO[0]: DEMO[1]}, extra_conf="mail_max_userip_connections = 100\n").start()
    port = free_port()
    pc = Portcullis(str(tmp_path), config(port, dv)).start(wait_port=port)
    try:
        sessions = []
        for _ in range(CLIENTS):
            m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
            m.login(*DEMO)
            m.select("INBOX")
            m.sock.settimeout(SPREAD + 30)
            sessions.append(m)
        first_bytes, closed = [None] * CLIENTS, [None] * CLIENTS

        def watch(i, sock):
            while True:
                data = sock.recv(4096)
                now = time.monotonic()
                if data and first_bytes[i] is None:
                    first_bytes[i] = (now, data)
                if not data:
                    closed[i] = now
                    return

        threads = [threading.Thread(target=watch, args=(i, m.sock)) for i, m in enumerate(sessions)]
        for t in threads:
            t.start()
        dv.stop()  # Dovecot ends its imap processes: every backend connection closes
        for t in threads:
            t.join(SPREAD + 40)
        assert all(c is not None for c in closed), closed
        # Dovecot's farewell comes through; each close follows it within the spread, and the
        # closes are spread over it rather than all at once. (Dovecot's imap processes send
        # their BYE some seconds after the master has gone, so times are taken from the BYE.)
        held = []
        for (at, data), c in zip(first_bytes, closed):
            assert b"* BYE" in data, data
            held.append(c - at)
        held.sort()
        assert held[-1] < SPREAD + 0.5, held
        assert held[-1] - held[0] > SPREAD / 3, held
        # About 7 (31 / 5) may close at once; most of the rest are held.
        assert sum(1 for h in held if h > 0.3) >= CLIENTS // 3, held
        for m in sessions:
            m.sock.close()
    finally:
        pc.stop()
        dv.stop()


def test_running_out_of_descriptors_is_not_the_backends_fault(tmp_path):
    """A proxy at its open-file limit cannot open the backend connection (EMFILE). That is
    the proxy's own shortage: the login gets a temporary failure, the error is counted as
    `local_resources`, and the backend is not marked down for everyone else (with health
    checks off, `fall` (3) session failures would mark it down)."""
    import os
    import subprocess

    from servers import RawClient, metric_value, open_files_limit, portcullis_binary, scrape_metrics, wait_for

    nofile = 64
    dv = Dovecot(str(tmp_path / "dovecot"), {DEMO[0]: DEMO[1]}).start()
    port, admin = free_port(), free_port()
    text = imap_to_dovecot(port, dv, f"""
[admin]
bind = "127.0.0.1:{admin}"

[auth]
source = "backend"

[throttle]
enabled = false

[limits]
max_connections = 1000
max_connections_per_ip = 0
""")
    pc = Portcullis(str(tmp_path), text)
    # `check` runs under the operator's shell: the server's limit is not its to judge.
    checked = subprocess.run([portcullis_binary(), "check", "--config", pc.config], capture_output=True, text=True,
                             preexec_fn=open_files_limit(nofile))
    assert checked.returncode == 0, checked.stderr
    assert "open-file limit" not in checked.stdout + checked.stderr
    pc.start(wait_port=port, nofile=nofile)
    held = []
    try:
        assert "max_connections is above what the open-file limit allows" in pc.log()
        login = b"a LOGIN " + DEMO[0].encode() + b" " + DEMO[1].encode() + b"\r\n"

        def greeted(c, timeout):
            c.sock.settimeout(timeout)
            try:
                return c.line().startswith(b"* OK")
            except (TimeoutError, OSError, EOFError):
                return False

        def descriptors():
            return len(os.listdir(f"/proc/{pc.proc.pid}/fd"))

        # Take every descriptor: the first client the proxy can no longer accept waits in
        # the listen queue. A greeting that is only slow (a loaded machine) is told apart by
        # the proxy's count of open descriptors.
        while True:
            assert len(held) < nofile, "the proxy kept accepting past its open-file limit"
            c = RawClient(port)
            if not greeted(c, 1.5):
                if descriptors() < nofile:
                    assert greeted(c, 10), "no greeting, with descriptors left"
                elif not greeted(c, 3):
                    waiting = c
                    break
            held.append(c)

        # The waiting client makes every accept fail (EMFILE). The failure is waited out, 5 ms
        # doubling to 1 s, not retried in a loop that would take a core and fill the log.
        def cpu_seconds():
            fields = open(f"/proc/{pc.proc.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        cpu, logged = cpu_seconds(), pc.log().count("accept failed")
        time.sleep(3)
        cpu, logged = cpu_seconds() - cpu, pc.log().count("accept failed") - logged
        assert cpu < 0.5 and 1 <= logged <= 15, f"{cpu:.2f} s of CPU and {logged} accept failures logged in 3 s"
        # One descriptor freed: the waiting client takes it, none is left for the backend. Each
        # client after it takes the descriptor the one before gave back.
        held.pop().close()
        failures = 0
        for _ in range(4):
            assert greeted(waiting, 5), "the waiting client was not accepted"
            waiting.sock.settimeout(10)
            waiting.send(login)
            reply = waiting.until_tagged(b"a")[-1]
            assert reply.startswith(b"a NO [UNAVAILABLE]"), reply
            failures += 1
            waiting.close()
            waiting = RawClient(port)
        for c in held:
            c.close()
        held.clear()
        assert greeted(waiting, 5)
        waiting.close()

        metrics = wait_for(lambda: scrape_metrics(admin), timeout=10)
        local = metric_value(metrics, 'portcullis_backend_errors_total{backend="dovecot",reason="local_resources"}')
        assert local is not None and local >= failures, metrics
        accept_errors = metric_value(metrics, 'portcullis_accept_errors_total{listener="imap"}')
        assert accept_errors is not None and accept_errors >= logged, metrics
        assert metric_value(metrics, 'portcullis_backend_up{backend="dovecot"}') == 1, metrics
        assert "backend is down" not in pc.log()
        m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        m.login(*DEMO)
        m.logout()
    finally:
        for c in held:
            c.close()
        pc.stop()
        dv.stop()


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path, dovecot):
    """Started with the usual soft limit below the hard one (a shell, another supervisor), the
    proxy raises its soft limit to the hard limit before it derives anything from it, so its
    descriptor cap (and the default max_connections) follows what the system allows."""
    port = free_port()
    text = imap_to_dovecot(port, dovecot, """
[auth]
source = "backend"

[limits]
max_connections = 1000
""")
    pc = Portcullis(str(tmp_path), text)
    # 256 allows (256 - 32) / 2 = 112 sessions, so 1000 would be warned about; 4096 allows 1920.
    pc.start(wait_port=port, nofile=(256, 4096))
    try:
        limits = open(f"/proc/{pc.proc.pid}/limits").read()
        line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
        assert "open-file limit raised to the hard limit" in pc.log(), pc.log()
        assert "max_connections is above what the open-file limit allows" not in pc.log(), pc.log()
        m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        m.login(*DEMO)
        m.logout()
    finally:
        pc.stop()


def test_health_check_logins_pass_at_a_real_dovecot(tmp_path, dovecot):
    """Health checks with a test login (`login_user`), IMAP and POP3, against Dovecot as the
    proxy's sessions reach it (the client's address by ID and by XCLIENT): the check is the
    proxy's own connection and tells no client address, so Dovecot takes it and both backends
    stay up. A check that sent a client address of 127.0.0.1 port 0 had POP3's XCLIENT refused
    ("Invalid parameters": Dovecot takes no port 0), and every check failed."""
    from servers import metric_value, scrape_metrics, wait_for

    imaps, pop3s, admin = free_port(), free_port(), free_port()
    health = f"""[backend.health]
interval = "300ms"
timeout = "3s"
rise = 1
fall = 1
login_user = "{DEMO[0]}"
login_password = "{DEMO[1]}"
"""
    text = f"""
[admin]
bind = "127.0.0.1:{admin}"

[tls]
self_signed_names = ["localhost"]

[[listener]]
name = "imaps"
bind = "127.0.0.1:{imaps}"
protocol = "imap"
tls = "implicit"

[[listener]]
name = "pop3s"
bind = "127.0.0.1:{pop3s}"
protocol = "pop3"
tls = "implicit"

[auth]
source = "backend"

[[backend]]
name = "imap-checked"
address = "127.0.0.1:{dovecot.imap_port}"
client_address = "imap-id"
{health}
[[backend]]
name = "pop3-checked"
protocol = "pop3"
address = "127.0.0.1:{dovecot.pop3_port}"
client_address = "xclient"
{health}
[routing.imap]
default = "imap-checked"

[routing.pop3]
default = "pop3-checked"
"""
    seen_before = len(dovecot.logins())
    pc = Portcullis(str(tmp_path), text)
    pc.start(wait_port=imaps, tls=True)
    try:
        def checked(backend):
            page = scrape_metrics(admin)
            ok = metric_value(page, f'portcullis_health_checks_total{{backend="{backend}",result="success"}}')
            return ok is not None and ok >= 3 and page

        for backend in ("imap-checked", "pop3-checked"):
            page = wait_for(lambda: checked(backend), timeout=10)
            assert page, (backend, scrape_metrics(admin), pc.log()[-3000:], dovecot.log()[-3000:])
            failures = metric_value(page, f'portcullis_health_checks_total{{backend="{backend}",result="failure"}}')
            assert not failures, (backend, failures, dovecot.log()[-3000:])
            assert metric_value(page, f'portcullis_backend_up{{backend="{backend}"}}') == 1
        # The checks logged in (Dovecot's own log since this proxy started), over IMAP and POP3.
        services = {f.get("service") for f in dovecot.logins()[seen_before:] if f.get("user") == DEMO[0]}
        assert {"imap-login", "pop3-login"} <= services, services
    finally:
        pc.stop()
