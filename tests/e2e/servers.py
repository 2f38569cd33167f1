"""Real servers for the end-to-end tests and the quickstart, started on loopback high ports in
a temporary directory: Dovecot (IMAP, POP3), Postfix (submission) and portcullis itself (Pebble
and its challenge server are in acme_servers.py).

Used as a library by the pytest suite and as a command by ./scripts/quickstart:

    python3 tests/e2e/servers.py backends --dir DIR --imap-port 20143 --pop3-port 20110 \
        --smtp-port 20587 --user demo@example.test:demo
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def open_up(path):
    """Let the servers' unprivileged users (dovecot, dovenull, postfix, nobody) traverse the
    temp directories leading to `path` (mktemp and pytest make them 0700)."""
    p = path
    while p not in ("/", ""):
        if p.startswith("/tmp/") or p == path:
            os.chmod(p, 0o755)
        p = os.path.dirname(p)


_next_port = [20000 + (os.getpid() % 400) * 25]


def free_port():
    """A free loopback port below the kernel's ephemeral range (32768-60999), so no outgoing
    connection can take it between now and the server's bind."""
    while True:
        port = _next_port[0]
        _next_port[0] = 20000 + (port - 20000 + 1) % 12000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def imap_to_dovecot(port, dovecot, tables=""):
    """A portcullis config: one plaintext IMAP listener on `port` (logins allowed) in front of
    `dovecot`, without health checks, plus `tables` (auth, limits, throttle, admin ...)."""
    return f"""{tables}

[[listener]]
name = "imap"
bind = "127.0.0.1:{port}"
protocol = "imap"
tls = "none"
allow_plaintext_auth = true

{dovecot_imap_route(dovecot)}"""


def dovecot_imap_route(dovecot):
    """Config lines: backend "dovecot" (IMAP, no health checks) and the IMAP route to it."""
    return f"""[[backend]]
name = "dovecot"
address = "127.0.0.1:{dovecot.imap_port}"
health = {{ enabled = false }}

[routing.imap]
default = "dovecot"
"""


def wait_greeting(port, prefix=b"* OK", timeout=10.0, host="127.0.0.1", tls=False):
    """Readiness is the greeting, not an accepting port (Dovecot drops early connections)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        s = None
        try:
            s = socket.create_connection((host, port), timeout=1)
            if tls:
                import ssl
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                s = ctx.wrap_socket(s)
            data = s.recv(512)
            if data.startswith(prefix):
                return data
            last = data
        except OSError as e:
            last = repr(e)  # not the exception: its traceback would keep this frame's socket alive
        finally:
            # Close explicitly (the TLS socket is a different object from the TCP one), so the
            # server sees this probe end now rather than at the next garbage collection.
            if s is not None:
                s.close()
        time.sleep(0.05)
    raise RuntimeError(f"no greeting on port {port}: {last!r}")


DOVECOT_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot-info.log
listen = 127.0.0.1
protocols = imap pop3
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
auth_verbose = yes
auth_master_user_separator = *
login_trusted_networks = 127.0.0.0/8
haproxy_trusted_networks = 127.0.0.0/8
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{{session}}> rport=%{{rport}} lport=%{{lport}}
mail_location = maildir:~/Maildir
mail_fsync = never
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {dir}/masters
  master = yes
  result_success = continue
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {dir}/users
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={dir}/mail/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  inet_listener imap_haproxy {{
    address = 127.0.0.1
    port = {haproxy_port}
    haproxy = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


# Every Dovecot and portcullis started, in order: the suite's conftest stops those a test
# started when it ends, also when the test fails before its own cleanup would run.
RUNNING = []


class Dovecot:
    """A private Dovecot with passwd-file users and a master user `master` / `masterpw`."""

    def __init__(self, workdir, users, imap_port=None, haproxy_port=None, pop3_port=None, extra_conf=""):
        self.dir = os.path.join(workdir, "dovecot")
        # Appended to the configuration; a setting given again there replaces the one above.
        self.extra_conf = extra_conf
        self.imap_port = imap_port or free_port()
        self.haproxy_port = haproxy_port or free_port()
        self.pop3_port = pop3_port or free_port()
        self.users = users
        self.proc = None

    def start(self):
        binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
        if not os.path.exists(binary):
            raise RuntimeError("dovecot is not installed (apt-get install dovecot-imapd)")
        for d in ("run", "state", "mail"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        open_up(self.dir)
        os.chown(os.path.join(self.dir, "mail"), 65534, 65534)
        with open(os.path.join(self.dir, "users"), "w") as f:
            for user, password in self.users.items():
                f.write(f"{user}:{{PLAIN}}{password}\n")
        with open(os.path.join(self.dir, "masters"), "w") as f:
            f.write("master:{PLAIN}masterpw\n")
        self.conf = os.path.join(self.dir, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write(DOVECOT_CONF.format(dir=self.dir, imap_port=self.imap_port, haproxy_port=self.haproxy_port, pop3_port=self.pop3_port))
            f.write(self.extra_conf)
        self.proc = subprocess.Popen([binary, "-F", "-c", self.conf], stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "stderr.log"), "w"))
        RUNNING.append(self)
        try:
            wait_greeting(self.imap_port)
            wait_greeting(self.pop3_port, prefix=b"+OK")
        except RuntimeError:
            self.stop()
            raise RuntimeError("dovecot did not start: " + self.log())
        return self

    @property
    def mail_root(self):
        return os.path.join(self.dir, "mail")

    def deliver(self, user, message, name="1.test"):
        """Put a message into the user's INBOX (a Maildir file owned by nobody)."""
        local, _, domain = user.partition("@")
        base = os.path.join(self.dir, "mail", domain, local, "Maildir")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        path = os.path.join(base, "new", f"{int(time.time())}.{name}")
        with open(path, "wb") as f:
            f.write(message)
        for dirpath, _, files in os.walk(os.path.join(self.dir, "mail")):
            os.chown(dirpath, 65534, 65534)
            for fn in files:
                os.chown(os.path.join(dirpath, fn), 65534, 65534)
        return path

    def inbox_count(self, user, password):
        """How many messages the user's INBOX holds, asked of Dovecot directly (other test files
        deliver to the same mailbox, so a count through the proxy is compared with this)."""
        import imaplib

        with imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10) as m:
            m.login(user, password)
            typ, data = m.select("INBOX", readonly=True)
            assert typ == "OK", data
            m.logout()
        return data[0]

    def log(self):
        out = ""
        for name in ("dovecot.log", "dovecot-info.log", "stderr.log"):
            try:
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    out += f.read()
            except OSError:
                pass
        return out

    def info_log(self):
        try:
            with open(os.path.join(self.dir, "dovecot-info.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def logins(self):
        """Every `Login:` line of the info log as a dict (user, method, rip, lip, rport, lport, ...),
        with `service` (`imap-login`, `pop3-login`) and flags such as `TLS` set to True."""
        out = []
        for line in self.info_log().splitlines():
            prefix, sep, rest = line.partition("Login: ")
            if not sep:
                continue
            fields = {"service": next((w.rstrip(":") for w in prefix.split() if w.endswith("-login:")), "")}
            for part in rest.split(", "):
                k, eq, v = part.partition("=")
                if eq:
                    fields[k] = v.strip("<>")
                elif part.strip():
                    fields[part.strip()] = True
            out.append(fields)
        return out

    def settled_log(self, quiet=0.3, timeout=5.0):
        """The whole log once it has stopped changing for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last = self.log()
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.log()
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= quiet:
                break
        return last

    def stop(self):
        """Stop the master, then the service processes it leaves behind (by PID). A login
        process can outlive the master for seconds, still holding the listening sockets, and a
        restart on the same ports would then fail with "Address already in use"."""
        if self.proc and self.proc.poll() is None:
            children = child_pids(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            end_processes(children)


def proc_stat(pid):
    """(state, parent PID, start time) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), fields[19]


def child_pids(pid):
    """The processes whose parent is `pid`, as (PID, start time): the start time tells a
    reused PID from the process it was."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            st = proc_stat(int(p))
            if st and st[1] == pid:
                out.append((int(p), st[2]))
    return out


def end_processes(procs, timeout=5.0):
    """SIGTERM each of `procs` (PID, start time) still running, wait for them to go, SIGKILL
    what is left. A PID now held by another process is left alone."""
    def running(p):
        st = proc_stat(p[0])
        return st is not None and st[2] == p[1] and st[0] != "Z"

    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for p in procs:
            if running(p):
                try:
                    os.kill(p[0], sig)
                    alive.append(p)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if running(p)]
            time.sleep(0.05)
        if not alive:
            return
        procs = alive


POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = backend.example.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
alias_maps =
alias_database =
virtual_mailbox_domains = example.test
virtual_mailbox_maps = texthash:{dir}/vmailbox
virtual_mailbox_base = {mail_root}
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_mailbox_limit = 0
message_size_limit = 52428800
default_transport = discard:outside domains are not delivered in tests
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_sasl_auth_enable = yes
smtpd_sasl_authenticated_header = yes
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
"""

POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix submission backend that trusts XCLIENT from loopback and delivers
    example.test mail into the Dovecot mail root (so POP3/IMAP can read it)."""

    def __init__(self, workdir, mail_root, users, port=None):
        self.dir = os.path.join(workdir, "postfix")
        self.port = port or free_port()
        self.mail_root = mail_root
        self.users = users

    def start(self):
        binary = shutil.which("postfix") or "/usr/sbin/postfix"
        if not os.path.exists(binary):
            raise RuntimeError("postfix is not installed (apt-get install postfix)")
        for d in ("queue", "data"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        open_up(self.dir)
        import pwd
        pw = pwd.getpwnam("postfix")
        os.chown(os.path.join(self.dir, "data"), pw.pw_uid, pw.pw_gid)
        with open(os.path.join(self.dir, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN_CF.format(dir=self.dir, mail_root=self.mail_root))
        with open(os.path.join(self.dir, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF.format(port=self.port))
        with open(os.path.join(self.dir, "vmailbox"), "w") as f:
            for user in self.users:
                local, _, domain = user.partition("@")
                f.write(f"{user} {domain}/{local}/Maildir/\n")
        out = subprocess.run([binary, "-c", self.dir, "start"], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError("postfix did not start: " + out.stdout + out.stderr + self.log())
        try:
            wait_greeting(self.port, prefix=b"220")
        except RuntimeError:
            self.stop()
            raise RuntimeError("postfix did not greet: " + self.log())
        return self

    def log(self):
        try:
            with open(os.path.join(self.dir, "maillog"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def delivered(self, user):
        """Paths of the messages delivered to `user`'s Maildir, oldest first."""
        local, _, domain = user.partition("@")
        out = []
        for sub in ("new", "cur"):
            d = os.path.join(self.mail_root, domain, local, "Maildir", sub)
            if os.path.isdir(d):
                out.extend(os.path.join(d, n) for n in os.listdir(d))
        return sorted(out, key=os.path.getmtime)

    def stop(self):
        binary = shutil.which("postfix") or "/usr/sbin/postfix"
        subprocess.run([binary, "-c", self.dir, "stop"], capture_output=True)


def portcullis_binary():
    """$PORTCULLIS_BIN, else the newest of target/{release,debug}/portcullis."""
    explicit = os.environ.get("PORTCULLIS_BIN")
    if explicit:
        return explicit
    built = [os.path.join(ROOT, "target", p, "portcullis") for p in ("release", "debug")]
    built = [p for p in built if os.path.exists(p)]
    if not built:
        raise RuntimeError("portcullis binary not built (cargo build)")
    return max(built, key=os.path.getmtime)


def open_files_limit(n):
    """A `preexec_fn` that sets the child's RLIMIT_NOFILE to `n`, soft and hard, or to a
    (soft, hard) pair (None: leave it)."""
    if n is None:
        return None
    import resource
    limits = n if isinstance(n, tuple) else (n, n)
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits)


class Portcullis:
    """The real binary, run with a config file written into a temp dir."""

    def __init__(self, workdir, config_text, name="portcullis.toml"):
        self.dir = os.path.join(workdir, "portcullis")
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, name)
        self.log_path = os.path.join(self.dir, "portcullis.log")
        self.write_config(config_text)
        self.proc = None

    def write_config(self, text):
        # Write then rename, as editors and config management do.
        tmp = self.config + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config)

    def start(self, wait_port=None, tls=False, nofile=None, env=None):
        """With `nofile`, the process's open-file limit is set to it (see `open_files_limit`);
        `env` adds to the environment."""
        env = dict(os.environ, RUST_LOG=os.environ.get("PORTCULLIS_LOG", "info"), **(env or {}))
        self.log_file = open(self.log_path, "a")
        self.proc = subprocess.Popen([portcullis_binary(), "run", "--config", self.config], stdout=self.log_file, stderr=self.log_file, env=env, preexec_fn=open_files_limit(nofile))
        RUNNING.append(self)
        if wait_port:
            try:
                wait_greeting(wait_port, tls=tls)
            except RuntimeError:
                self.stop()
                raise RuntimeError("portcullis did not start: " + self.log())
        return self

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Clients for the tests. Certificate checks are off (the proxy's certificate is self-signed) and
# the client socket is bound to CLIENT_IP, so the address the backend logs differs from the
# proxy's own 127.0.0.1.

CLIENT_IP = "127.0.0.2"


def client_tls_context(alpn=None):
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def client_socket(port, timeout=10.0, source=CLIENT_IP):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


import imaplib  # noqa: E402


class IMAP4From(imaplib.IMAP4):
    """imaplib over plain TCP (STARTTLS listeners), from CLIENT_IP (or `source`)."""

    def __init__(self, host, port, source=CLIENT_IP, **kw):
        self.source = source
        kw.setdefault("timeout", 10.0)
        super().__init__(host, port, **kw)

    def _create_socket(self, timeout):
        return client_socket(self.port, timeout=timeout or 10.0, source=self.source)


class IMAP4SSLFrom(imaplib.IMAP4_SSL):
    """imaplib over implicit TLS, from CLIENT_IP."""

    def __init__(self, host, port, **kw):
        kw.setdefault("ssl_context", client_tls_context())
        kw.setdefault("timeout", 10.0)
        super().__init__(host, port, **kw)

    def _create_socket(self, timeout):
        sock = client_socket(self.port, timeout=timeout or 10.0)
        return self.ssl_context.wrap_socket(sock, server_hostname="localhost")


class RawClient:
    """Bytes in, bytes out: for what imaplib would not send (pipelining, injection, junk)."""

    def __init__(self, port, tls=False, alpn=None, timeout=5.0, source=CLIENT_IP, ctx=None, session=None):
        """With `tls`: implicit TLS, with `ctx` (an ssl.SSLContext, e.g. holding a client
        certificate) or the default test context, resuming `session` if given."""
        self.sock = client_socket(port, timeout=timeout, source=source)
        if tls:
            ctx = ctx or client_tls_context(alpn)
            self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost", session=session)
        self.buf = b""

    def starttls(self, alpn=None):
        self.sock = client_tls_context(alpn).wrap_socket(self.sock, server_hostname="localhost")

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed; buffered {self.buf!r}")
        self.buf += chunk

    def line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def until_tagged(self, tag):
        """All lines up to and including the tagged reply for `tag`."""
        out = []
        while True:
            line = self.line()
            out.append(line)
            if line.startswith(tag + b" "):
                return out

    def read_to_close(self, timeout=5.0):
        """Everything until the peer closes; fails (socket.timeout) if it never does."""
        import ssl
        self.sock.settimeout(timeout)
        out = self.buf
        self.buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return out
            except ssl.SSLError as e:
                if "EOF" in str(e) or "UNEXPECTED_EOF" in str(e):
                    return out
                raise
            if not chunk:
                return out
            out += chunk

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def scrape_metrics(admin_port):
    """The proxy's /metrics page, or None when the admin server does not answer."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def metric_value(page, series):
    """The value of `series` (name and labels exactly as exported) on a /metrics page, or None."""
    for line in (page or "").splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return None


def wait_for(predicate, timeout=5.0, interval=0.05):
    """Poll until predicate() is truthy; return its value (or the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("backends", help="start a private Dovecot (IMAP, POP3) and Postfix (submission) until SIGTERM")
    d.add_argument("--dir", required=True)
    d.add_argument("--imap-port", type=int, required=True)
    d.add_argument("--pop3-port", type=int, required=True)
    d.add_argument("--smtp-port", type=int, required=True)
    d.add_argument("--user", action="append", default=[], help="user:password")
    args = ap.parse_args()
    users = dict(u.split(":", 1) for u in args.user)
    dv = Dovecot(args.dir, users, imap_port=args.imap_port, pop3_port=args.pop3_port).start()
    first = next(iter(users))
    dv.deliver(first, b"From: welcome@example.test\r\nTo: " + first.encode() + b"\r\nSubject: Welcome to portcullis\r\n\r\nThis message was fetched through the proxy.\r\n", name="welcome")
    try:
        pf = Postfix(args.dir, dv.mail_root, list(users), port=args.smtp_port).start()
    except RuntimeError:
        dv.stop()
        raise

    def stop(*_):
        pf.stop()
        dv.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"backends ready: dovecot imap 127.0.0.1:{dv.imap_port} pop3 127.0.0.1:{dv.pop3_port}, postfix 127.0.0.1:{pf.port}", flush=True)
    # Polled, not dv.proc.wait(): a signal arriving inside wait() runs `stop` while wait() holds
    # the Popen's lock, and stop's own wait on the same process then blocks for ever (Ctrl-C on
    # the quickstart hung instead of stopping).
    while dv.proc.poll() is None:
        time.sleep(0.5)
    pf.stop()
    sys.exit(1)


if __name__ == "__main__":
    main()
