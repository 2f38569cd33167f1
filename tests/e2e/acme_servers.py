"""Pebble (an ACME test CA) and pebble-challtestsrv (its DNS), from Debian, for the ACME tests.

The Debian package ships no test certificates, so the harness makes a CA and an API certificate
with openssl. Everything listens on 127.0.0.1; challtestsrv answers every name with 127.0.0.1, so
Pebble validates challenges against the proxy's responders on the ports given to it.
"""

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request

from servers import free_port, open_up


def make_ca(dir):
    """A CA and a leaf for 127.0.0.1/localhost; returns (ca.pem, leaf.pem, leaf.key)."""
    def run(*args):
        subprocess.run(args, check=True, capture_output=True, cwd=dir)

    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=portcullis test CA", "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "api.key", "-out", "api.csr")
    with open(os.path.join(dir, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", "api.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-out", "api.pem", "-extfile", "san.ext")
    return os.path.join(dir, "ca.pem"), os.path.join(dir, "api.pem"), os.path.join(dir, "api.key")


class Pebble:
    def __init__(self, workdir, http_port, tls_port, validity=3600, nonce_reject=0):
        self.dir = os.path.join(workdir, "pebble")
        os.makedirs(self.dir, exist_ok=True)
        open_up(self.dir)
        self.port = free_port()
        self.mgmt_port = free_port()
        self.dns_port = free_port()
        self.dns_mgmt_port = free_port()
        self.http_port = http_port
        self.tls_port = tls_port
        self.validity = validity
        self.nonce_reject = nonce_reject  # percent of valid nonces Pebble refuses with badNonce
        self.ca, self.api_cert, self.api_key = make_ca(self.dir)
        self.procs = []

    @property
    def directory(self):
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self):
        for binary in ("pebble", "pebble-challtestsrv"):
            if not shutil.which(binary):
                raise RuntimeError(f"{binary} is not installed (apt-get install pebble)")
        log = open(os.path.join(self.dir, "challtestsrv.log"), "a")
        self.procs.append(subprocess.Popen(
            ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
             "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-management", f"127.0.0.1:{self.dns_mgmt_port}"],
            stdout=log, stderr=log))
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": self.api_cert, "privateKey": self.api_key,
            "httpPort": self.http_port, "tlsPort": self.tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
            "domainBlocklist": [], "retryAfter": {"authz": 1, "order": 1},
            "certificateValidityPeriod": self.validity,
        }}
        path = os.path.join(self.dir, "pebble.json")
        with open(path, "w") as f:
            json.dump(config, f)
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_AUTHZREUSE="0", PEBBLE_WFE_NONCEREJECT=str(self.nonce_reject))
        log = open(os.path.join(self.dir, "pebble.log"), "a")
        try:
            self.pebble = subprocess.Popen(
                ["pebble", "-config", path, "-dnsserver", f"127.0.0.1:{self.dns_port}"], stdout=log, stderr=log, env=env)
        except OSError:
            self.stop()  # challtestsrv, already running
            raise
        self.procs.append(self.pebble)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.get(self.directory)
                return self
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pebble did not start: {e}\n{self.log()}")
                time.sleep(0.1)

    def get(self, url):
        ctx = ssl.create_default_context(cafile=self.ca)
        with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
            return r.read()

    def issuing_root(self):
        """Pebble's issuing root (new at every start), PEM."""
        return self.get(f"https://127.0.0.1:{self.mgmt_port}/roots/0")

    def log(self):
        out = ""
        for name in ("pebble.log", "challtestsrv.log"):
            try:
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    out += f.read()
            except OSError:
                pass
        return out

    def stop_pebble(self):
        if self.pebble.poll() is None:
            self.pebble.send_signal(signal.SIGTERM)
            self.pebble.wait(10)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


DNS_HOOK = """#!/usr/bin/env python3
# DNS-01 hook for portcullis: `hook add|remove NAME VALUE`, here talking to challtestsrv.
import json, sys, urllib.request
action, name, value = sys.argv[1:4]
path = "/set-txt" if action == "add" else "/clear-txt"
body = {"host": name.rstrip(".") + "."}
if action == "add":
    body["value"] = value
req = urllib.request.Request("http://127.0.0.1:%d" + path, data=json.dumps(body).encode(), method="POST")
urllib.request.urlopen(req, timeout=5).read()
"""
