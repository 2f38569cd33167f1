"""The auth_http request portcullis sends, compared with the one nginx's mail module sends for
the same login, both captured by one HTTP server (issue: "request encoding byte-for-byte against
captured nginx requests"). The request line, the headers' order and every value must be
identical; header names are compared case-insensitively (HTTP says they are). Two differences
are by design and named below: HTTP/1.1 (the service's connections are kept alive; nginx's
HTTP/1.0 opens one per login), and a Host header with the URL's port, as RFC 9110 asks (nginx
leaves the port out).
"""

import http.server
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

from servers import CLIENT_IP, Portcullis, free_port, open_up, wait_greeting

USER = "alice@example.test"
PASSWORD = "p w%\u00e9\"x"
COMPARED = ["auth-method", "auth-user", "auth-pass", "auth-protocol", "auth-login-attempt", "client-ip", "x-auth-key"]


class Capture(http.server.BaseHTTPRequestHandler):
    seen = []

    def do_GET(self):
        self.seen.append((self.requestline, [(k, v) for k, v in self.headers.items()]))
        self.send_response(200)
        self.send_header("Auth-Status", "Invalid login or password")
        self.end_headers()

    def log_message(self, *args):
        pass


def login_once(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT_IP, 0))
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK")
    quoted = '"' + PASSWORD.replace("\\", "\\\\").replace('"', '\\"') + '"'
    s.sendall(f"a LOGIN {USER} {quoted}\r\n".encode())
    reply = f.readline()
    s.close()
    return reply


def test_request_matches_nginx(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    module = "/usr/lib/nginx/modules/ngx_mail_module.so"
    assert os.path.exists(nginx) and os.path.exists(module), "nginx and libnginx-mod-mail are needed"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cap = server.server_address[1]
    Capture.seen = []
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    open_up(str(prefix))
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
load_module {module};
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
mail {{
    server_name localhost;
    auth_http 127.0.0.1:{cap}/auth;
    auth_http_header X-Auth-Key "k";
    server {{
        listen 127.0.0.1:{port};
        protocol imap;
        imap_auth plain login;
    }}
}}
""")
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(prefix)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_greeting(port)
        reply = login_once(port)
        assert b"Invalid login or password" in reply, reply
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()  # its PID; the workers exit with their master
            proc.wait(5)
    nginx_line, nginx_headers = Capture.seen[-1]
    nginx_req = dict((k.lower(), v) for k, v in nginx_headers)

    pport = free_port()
    pc = Portcullis(str(tmp_path), f"""
[[listener]]
name = "imap"
bind = "127.0.0.1:{pport}"
protocol = "imap"
tls = "none"
allow_plaintext_auth = true

[auth]
source = "http"
[auth.http]
urls = ["http://127.0.0.1:{cap}/auth"]
headers = {{ "X-Auth-Key" = "k" }}

[[backend]]
name = "unused"
address = "127.0.0.1:1"
health = {{ enabled = false }}

[routing.imap]
default = "unused"
""").start(wait_port=pport)
    try:
        reply = login_once(pport)
        assert b"Invalid login or password" in reply, reply
    finally:
        pc.stop()
        server.shutdown()
    our_line, our_headers = Capture.seen[-1]
    ours = dict((k.lower(), v) for k, v in our_headers)
    assert nginx_line == "GET /auth HTTP/1.0" and our_line == "GET /auth HTTP/1.1", (nginx_line, our_line)
    # The same headers in the same order, nothing more, nothing less.
    assert [k.lower() for k, _ in our_headers] == [k.lower() for k, _ in nginx_headers], (our_headers, nginx_headers)
    assert (nginx_req["host"], ours["host"]) == ("127.0.0.1", f"127.0.0.1:{cap}")
    assert sorted(COMPARED) == sorted(set(ours) - {"host"})
    for name in COMPARED:
        assert name in nginx_req and name in ours, (name, sorted(nginx_req), sorted(ours))
        assert ours[name] == nginx_req[name], (name, ours[name], nginx_req[name])
    # The password really went through nginx's escaping: space and % escaped, UTF-8 sent raw
    # (http.server decodes header bytes as Latin-1, hence the two characters for é).
    assert nginx_req["auth-pass"] == "p%20w%25\u00c3\u00a9\"x"
