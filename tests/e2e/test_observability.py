"""Observability end to end: the Grafana dashboards (dashboards/*.json) and the Prometheus rules
(deploy/prometheus/alerts.yml) against a real Prometheus scraping the real binary's admin server,
with real IMAP, POP3 and submission traffic through Dovecot and Postfix.

- promtool validates the rule file, its unit tests and the example scrape config;
- every PromQL expression of every dashboard target and every alert rule must parse and run;
  the core panels must return data;
- every portcullis_* name they use must exist in the proxy's /metrics (or in Prometheus);
- the dashboards must be importable as-is: schemaVersion 39, a datasource variable, no
  hard-coded datasource UID, instance/listener/backend variables, each used by a panel.

A missing prometheus or promtool is a failure, not a skip (apt-get install prometheus).
"""

import imaplib
import json
import os
import poplib
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from conftest import DEAD, DEMO, DRIFT, start_proxy
from servers import CLIENT_IP, ROOT, IMAP4From, IMAP4SSLFrom, client_socket, client_tls_context, free_port, wait_for

DASHBOARDS = [os.path.join(ROOT, "dashboards", n) for n in ("portcullis-overview.json", "portcullis-backends.json")]
PROM_DIR = os.path.join(ROOT, "deploy", "prometheus")
ALERTS = os.path.join(PROM_DIR, "alerts.yml")
ALERT_TESTS = os.path.join(PROM_DIR, "alerts.test.yml")
EXAMPLE_CONFIG = os.path.join(PROM_DIR, "prometheus.yml")

# Panels whose queries must return data once traffic has gone through (dashboard file -> titles).
CORE_PANELS = {
    "portcullis-overview.json": [
        "Connections accepted / s",
        "Active connections",
        "Logins / s by protocol and result",
        "Active sessions (relayed)",
        "Relayed bytes / s",
        "Certificate days left",
    ],
    "portcullis-backends.json": [
        "Backend up",
        "Sessions per backend",
    ],
}

METRIC_NAME = re.compile(r"\bportcullis_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def tool(name):
    path = shutil.which(name)
    assert path, f"{name} is not installed (apt-get install prometheus): this test fails rather than skips"
    return path


# ---------------------------------------------------------------------------------------------
# Expressions under test


def load_dashboards():
    out = {}
    for path in DASHBOARDS:
        with open(path, encoding="utf-8") as f:
            out[os.path.basename(path)] = json.load(f)
    return out


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def dashboard_targets():
    """(dashboard, panel title, refId, expr) for every target of every panel."""
    out = []
    for name, d in load_dashboards().items():
        for p in all_panels(d["panels"]):
            for t in p.get("targets", []):
                out.append((name, p.get("title", ""), t.get("refId", ""), t["expr"]))
    return out


def alert_rules():
    """(group, alert name, expr) for every rule of alerts.yml."""
    with open(ALERTS, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return [(g["name"], r.get("alert") or r.get("record"), r["expr"]) for g in doc["groups"] for r in g["rules"]]


def template_queries():
    """(dashboard, variable, query) for the label_values() variables."""
    out = []
    for name, d in load_dashboards().items():
        for v in d["templating"]["list"]:
            if v.get("type") == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                out.append((name, v["name"], q))
    return out


GRAFANA_VARS = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def substitute(expr, rate_interval="1m"):
    """Grafana's variables as the All value / fixed intervals, so Prometheus can run the query."""
    fixed = {
        "__rate_interval": rate_interval,
        "__interval": "15s",
        "__range": "5m",
        "__range_s": "300",
        "instance": ".*",
        "listener": ".*",
        "backend": ".*",
    }

    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in fixed, f"unknown Grafana variable ${name} in {expr!r}"
        return fixed[name]

    out = GRAFANA_VARS.sub(repl, expr)
    assert "$" not in out, out
    return out


# ---------------------------------------------------------------------------------------------
# Prometheus


class Prometheus:
    def __init__(self, workdir, admin_port):
        self.dir = os.path.join(workdir, "prometheus")
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = os.path.join(self.dir, "prometheus.yml")
        with open(self.config, "w") as f:
            f.write(
                "global:\n"
                "  scrape_interval: 1s\n"
                "  scrape_timeout: 1s\n"
                "  evaluation_interval: 1s\n"
                "rule_files:\n"
                f"  - {json.dumps(ALERTS)}\n"
                "scrape_configs:\n"
                "  - job_name: portcullis\n"
                "    static_configs:\n"
                f"      - targets: ['127.0.0.1:{admin_port}']\n"
            )
        self.log_path = os.path.join(self.dir, "prometheus.log")
        self.proc = None

    def start(self):
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log_file,
            stderr=self.log_file,
        )
        if not wait_for(self._ready, timeout=10, interval=0.1):
            self.stop()
            raise RuntimeError("prometheus did not become ready:\n" + self.log())
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError("prometheus exited:\n" + self.log())
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def api(self, path, **params):
        """GET /api/v1/<path>; returns the decoded JSON (also for 4xx answers, which carry the error)."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def query(self, expr):
        body = urllib.parse.urlencode({"query": expr}).encode()
        req = urllib.request.Request(f"{self.url}/api/v1/query", data=body)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def result(self, expr):
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def value(self, expr):
        """The single value of `expr`, or None when it has none."""
        r = self.result(expr)
        assert len(r) <= 1, r
        return float(r[0]["value"][1]) if r else None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def http_get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


# ---------------------------------------------------------------------------------------------
# Traffic


class POP3SSLFrom(poplib.POP3_SSL):
    def _create_socket(self, timeout):
        s = socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT_IP, 0))
        return self.context.wrap_socket(s, server_hostname=self.host)


class SMTPSSLFrom(smtplib.SMTP_SSL):
    def _get_socket(self, host, port, timeout):
        s = socket.create_connection((host, port), timeout, source_address=(CLIENT_IP, 0))
        return self.context.wrap_socket(s, server_hostname=host)


class IMAP4SSLFromOther(IMAP4SSLFrom):
    """imaplib over implicit TLS from 127.0.0.3."""

    def _create_socket(self, timeout):
        sock = client_socket(self.port, timeout=timeout or 10.0, source="127.0.0.3")
        return self.ssl_context.wrap_socket(sock, server_hostname="localhost")


def generate_traffic(proxy):
    """Good and bad logins on every protocol, a relayed fetch, a delivery and a failed TLS handshake."""
    setup = proxy.setup
    # IMAP over implicit TLS: a good login and a fetch (relayed bytes, backend latency).
    with IMAP4SSLFrom("127.0.0.1", setup.port("imaps")) as m:
        m.login(*DEMO)
        typ, _ = m.select("INBOX", readonly=True)
        assert typ == "OK"
        typ, data = m.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and b"fetched through the proxy" in data[0][1]
        m.logout()
    # IMAP with STARTTLS (starttls_upgrades_total), then a good login.
    m = IMAP4From("127.0.0.1", setup.port("imap"))
    m.starttls(ssl_context=client_tls_context())
    m.login(*DEMO)
    m.logout()
    # Bad passwords: logins_total{result="bad_credentials"}.
    with IMAP4SSLFrom("127.0.0.1", setup.port("imaps")) as m:
        for _ in range(2):
            with pytest.raises(imaplib.IMAP4.error):
                m.login(DEMO[0], "wrong password")
        m.logout()
    # A backend nobody listens on: backend_errors_total{backend="dead", reason="connect"}, and
    # after `fall` (3) failures the backend is marked down.
    with IMAP4SSLFrom("127.0.0.1", setup.port("imaps")) as m:
        for _ in range(3):
            with pytest.raises(imaplib.IMAP4.error):
                m.login(*DEAD)
        m.logout()
    # POP3 over implicit TLS.
    p = POP3SSLFrom("127.0.0.1", setup.port("pop3s"), context=client_tls_context(), timeout=10)
    p.user(DEMO[0])
    p.pass_(DEMO[1])
    count, _ = p.stat()
    assert count >= 1
    p.retr(1)
    p.quit()
    # Submission over implicit TLS, delivered by Postfix.
    msg = (
        f"From: {DEMO[0]}\r\nTo: {DEMO[0]}\r\nSubject: observability\r\n"
        "Message-ID: <observability@e2e.example.test>\r\n\r\nmetrics\r\n"
    ).encode()
    with SMTPSSLFrom("127.0.0.1", setup.port("submissions"), context=client_tls_context(), timeout=10) as s:
        s.ehlo("client.example")
        s.login(*DEMO)
        assert s.sendmail(DEMO[0], [DEMO[0]], msg) == {}
    # Not TLS on the implicit-TLS port: tls_handshakes_total{result="failure"}.
    s = socket.create_connection(("127.0.0.1", setup.port("imaps")), timeout=5, source_address=(CLIENT_IP, 0))
    try:
        s.sendall(b"a1 LOGIN plain text on a TLS port\r\n" * 8)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, socket.timeout):
            pass
    finally:
        s.close()
    # A session left open until the end: backend_sessions{backend="dovecot"} = 1.
    held = IMAP4SSLFrom("127.0.0.1", setup.port("imaps"))
    held.login(*DEMO)
    held.select("INBOX", readonly=True)
    # The proxy accepts the password, Dovecot does not: backend_errors_total{reason="rejected"},
    # logins_total{result="backend_rejected"}.
    # From another client address and last: Dovecot delays the next login from the address it
    # rejected (by 4 s), which would slow this and every later test down.
    with IMAP4SSLFromOther("127.0.0.1", setup.port("imaps")) as m:
        with pytest.raises(imaplib.IMAP4.error):
            m.login(*DRIFT)
        m.logout()
    return held


# ---------------------------------------------------------------------------------------------
# Fixture: proxy with an admin server, Prometheus scraping it, traffic through it


class Stack:
    pass


@pytest.fixture(scope="module")
def stack(dovecot, postfix, tmp_path_factory):
    tool("prometheus")
    workdir = str(tmp_path_factory.mktemp("observability"))
    admin_port = free_port()
    proxy = start_proxy(dovecot, workdir, postfix=postfix, admin_port=admin_port)
    prom = None
    held = None
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        assert wait_for(lambda: _get_ok(admin + "/healthz"), timeout=5), "admin server not answering:\n" + proxy.log()
        prom = Prometheus(workdir, admin_port).start()
        held = generate_traffic(proxy)
        st = Stack()
        st.proxy, st.prom, st.admin, st.held = proxy, prom, admin, held
        st.instance = f"127.0.0.1:{admin_port}"
        # First sample, then a scrape that saw all the traffic (the held session is open).
        assert wait_for(lambda: prom.result("portcullis_build_info"), timeout=20, interval=0.2), (
            "prometheus has no portcullis_build_info after 20 s:\n" + prom.log()[-3000:]
        )
        wait_for(
            lambda: prom.value('sum(portcullis_backend_sessions{backend="dovecot"})') == 1
            and (prom.value('sum(count_over_time(portcullis_tls_handshakes_total{result="failure"}[1m]))') or 0) >= 2,
            timeout=15,
            interval=0.2,
        )
        st.metrics_text = http_get(admin + "/metrics")[1]
        yield st
    finally:
        if held is not None:
            try:
                held.logout()
            except (OSError, imaplib.IMAP4.error):
                pass
        if prom is not None:
            prom.stop()
        proxy.pc.stop()


def _get_ok(url):
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


def exposed_names(text):
    """Sample names and histogram families in a Prometheus text exposition."""
    samples, histograms = set(), set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            if kind.strip() == "histogram":
                histograms.add(name)
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, 1)[0])
    return samples, histograms


# ---------------------------------------------------------------------------------------------
# Static checks (no servers)


def test_promtool_checks_rules_and_example_config():
    promtool = tool("promtool")
    r = subprocess.run([promtool, "check", "rules", ALERTS], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # The example config names alerts.yml relatively; promtool resolves it from the config's dir.
    r = subprocess.run([promtool, "check", "config", EXAMPLE_CONFIG], capture_output=True, text=True, cwd=PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    # Alert semantics (thresholds, `for`, draining/volume exclusions) on synthetic series.
    r = subprocess.run([promtool, "test", "rules", os.path.basename(ALERT_TESTS)], capture_output=True, text=True, cwd=PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    """check rules really fails on a bad expression (so the check above means something)."""
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(portcullis_logins_total[5m]\n")
    r = subprocess.run([tool("promtool"), "check", "rules", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr


def test_alert_rules_have_for_severity_and_annotations():
    with open(ALERTS, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    alerts = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
    expected = {
        "PortcullisDown",
        "PortcullisCertificateExpiringSoon",
        "PortcullisCertificateExpiryCritical",
        "PortcullisAcmeOrderFailing",
        "PortcullisBackendDown",
        "PortcullisNoHealthyBackend",
        "PortcullisLoginFailureRatioHigh",
        "PortcullisBackendRejectsVerifiedLogins",
        "PortcullisConfigReloadFailed",
        "PortcullisClientCrlExpiringSoon",
        "PortcullisClientCrlExpired",
    }
    assert expected <= set(alerts), sorted(expected - set(alerts))
    for name, r in alerts.items():
        assert "for" in r, name
        assert r.get("labels", {}).get("severity") in ("warning", "critical"), name
        assert r.get("annotations", {}).get("summary") and r["annotations"].get("description"), name
    assert alerts["PortcullisCertificateExpiringSoon"]["labels"]["severity"] == "warning"
    assert alerts["PortcullisCertificateExpiryCritical"]["labels"]["severity"] == "critical"
    assert 'job=~".*portcullis.*"' in alerts["PortcullisDown"]["expr"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=os.path.basename)
def test_dashboard_structure(path):
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    assert d["schemaVersion"] == 39
    assert d.get("uid") and d.get("title")
    assert d.get("id") is None, "an exported dashboard must not carry a database id"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", ds
    # Every selector filters something: a panel's query uses it. The listener one only where a
    # panel's metric has that label (the backends' have none).
    def all_panels(panels):
        for p in panels:
            yield p
            yield from all_panels(p.get("panels", []))

    exprs = " ".join(t.get("expr", "") for p in all_panels(d["panels"]) for t in p.get("targets", []))
    for name in variables:
        assert name == "datasource" or f"${name}" in exprs, f"template variable {name} filters no panel"
    wanted = ("instance", "listener", "backend") if "overview" in path else ("instance", "backend")
    for name in wanted:
        v = variables.get(name)
        assert v, f"template variable {name} missing"
        assert v["type"] == "query" and v["multi"] and v["includeAll"] and v["allValue"] == ".*", v
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, v
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        assert re.fullmatch(rf"label_values\(portcullis_\w+(\{{.*\}})?, {name}\)", q), q

    expected_ds = {"type": "prometheus", "uid": "${datasource}"}
    ids = set()
    targets = 0

    def walk(node, where):
        # Any datasource reference anywhere in a panel must be the variable.
        if isinstance(node, dict):
            if "datasource" in node and node["datasource"] is not None:
                assert node["datasource"] == expected_ds, f"{where}: hard-coded datasource {node['datasource']!r}"
            for k, v in node.items():
                walk(v, where)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    for p in all_panels(d["panels"]):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        assert p.get("id") not in ids, f"duplicate id: {where}"
        ids.add(p.get("id"))
        assert {"x", "y", "w", "h"} <= set(p.get("gridPos", {})), where
        walk(p, where)
        if p["type"] != "row":
            assert p.get("datasource") == expected_ds, where
            assert p.get("targets"), f"{where} has no targets"
        for t in p.get("targets", []):
            targets += 1
            assert t.get("datasource") == expected_ds, where
            assert t.get("expr") and t.get("refId"), where
            expr = t["expr"]
            # rate()/increase() windows follow Grafana's scrape-aware interval.
            for m in re.finditer(r"\b(rate|increase|irate)\(", expr):
                assert "[$__rate_interval]" in expr, f"{where}: {expr}"
            for label in ("listener", "backend"):
                if re.search(rf"\b{label}=~", expr):
                    assert f'{label}=~"${label}"' in expr, f"{where}: {expr}"
            if "portcullis_" in expr:
                assert 'instance=~"$instance"' in expr, f"{where}: {expr}"
    assert targets >= 10


def test_dashboard_panels_cover_the_brief():
    """The panels the dashboards promise, by the metrics they read."""
    exprs = {name: " ".join(e for n, _, _, e in dashboard_targets() if n == name) for name in CORE_PANELS}
    overview, backends = exprs["portcullis-overview.json"], exprs["portcullis-backends.json"]
    for needle in (
        "rate(portcullis_connections_accepted_total",
        "portcullis_connections_active",
        "portcullis_logins_total",
        'result=~"bad_credentials|denied|throttled"',
        "portcullis_backend_sessions",
        "rate(portcullis_relayed_bytes_total",
        "portcullis_config_reloads_total",
        "time() - portcullis_config_last_reload_success_timestamp_seconds",
        "portcullis_certificate_not_after_timestamp_seconds",
        "/ 86400",
        "portcullis_tls_handshakes_total",
    ):
        assert needle in overview, needle
    for needle in (
        "portcullis_backend_up",
        "portcullis_backend_draining",
        "portcullis_backend_sessions",
        "histogram_quantile(0.95, sum by (le, backend) (rate(portcullis_backend_connect_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, backend) (rate(portcullis_backend_login_duration_seconds_bucket",
        "portcullis_backend_errors_total",
        "portcullis_health_checks_total",
    ):
        assert needle in backends, needle
    titles = {n: {t for dn, t, _, _ in dashboard_targets() if dn == n} for n in CORE_PANELS}
    for name, core in CORE_PANELS.items():
        assert set(core) <= titles[name], sorted(set(core) - titles[name])


def test_substitute():
    assert substitute('rate(x{instance=~"$instance", backend=~"${backend}"}[$__rate_interval])') == (
        'rate(x{instance=~".*", backend=~".*"}[1m])'
    )
    assert substitute("rate(x[$__rate_interval])", "30s") == "rate(x[30s])"


# ---------------------------------------------------------------------------------------------
# Against the running stack


def test_admin_endpoints(stack):
    status, body = http_get(stack.admin + "/healthz")
    assert status == 200 and body == "ok\n"
    status, body = http_get(stack.admin + "/metrics")
    assert status == 200 and "portcullis_build_info{" in body
    up = stack.prom.result('up{job="portcullis"}')
    assert [float(r["value"][1]) for r in up] == [1.0], up


def test_every_expression_parses_and_runs(stack):
    failures = []
    exprs = [(f"{d} / {title} / {ref}", e) for d, title, ref, e in dashboard_targets()]
    exprs += [(f"alerts.yml / {g} / {name}", e) for g, name, e in alert_rules()]
    assert len(exprs) > 30
    for where, expr in exprs:
        for interval in ("1m", "30s"):
            q = substitute(expr, interval)
            answer = stack.prom.query(q)
            if answer.get("status") != "success":
                failures.append(f"{where}: {q}\n    {answer.get('errorType')}: {answer.get('error')}")
    assert not failures, "\n".join(failures)


def test_core_panels_have_data(stack):
    empty = []
    checked = 0
    for d, title, ref, expr in dashboard_targets():
        if title not in CORE_PANELS[d]:
            continue
        checked += 1
        q = substitute(expr)
        if not wait_for(lambda: stack.prom.result(q), timeout=5, interval=0.2):
            empty.append(f"{d} / {title} / {ref}: {q}")
    assert checked >= len(CORE_PANELS["portcullis-overview.json"]) + len(CORE_PANELS["portcullis-backends.json"])
    assert not empty, "core panels without data:\n" + "\n".join(empty)


def test_every_panel_has_data_after_traffic(stack):
    """The traffic touches every metric family, so every target returns some series (a metric
    the proxy never sets would leave a panel empty forever)."""
    empty = []
    for d, title, ref, expr in dashboard_targets():
        q = substitute(expr)
        if not wait_for(lambda: stack.prom.result(q), timeout=3, interval=0.2):
            empty.append(f"{d} / {title} / {ref}: {q}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_template_variables_have_values(stack):
    for d, name, q in template_queries():
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", q)
        assert m, q
        selector, label = substitute(m.group(1)), m.group(2)
        answer = stack.prom.api(f"label/{label}/values", **{"match[]": selector})
        assert answer["status"] == "success" and answer["data"], f"{d} ${name}: {q} -> {answer}"
    answer = stack.prom.api("label/instance/values", **{"match[]": "portcullis_build_info"})
    assert answer["data"] == [stack.instance]
    listeners = stack.prom.api("label/listener/values", **{"match[]": "portcullis_connections_accepted_total"})["data"]
    assert {"imaps", "imap", "pop3s", "submissions"} <= set(listeners), listeners
    backends = stack.prom.api("label/backend/values", **{"match[]": "portcullis_backend_up"})["data"]
    assert {"dovecot", "dead", "dovecot-pop3", "postfix"} <= set(backends), backends


# Exported only where a feature is configured, which this stack does not: each is asserted by
# the feature's own test instead.
CONFIGURED_ONLY = {
    "portcullis_client_crl_next_update_timestamp_seconds",  # client_crl_file: test_client_cert.py
    "portcullis_acme_consecutive_failures",  # [[acme.certificate]]: test_acme.py
}


def test_every_metric_name_exists(stack):
    """A dashboard or rule naming a metric the proxy does not export fails here."""
    samples, histograms = exposed_names(stack.metrics_text)
    assert "portcullis_build_info" in samples
    in_prometheus = set(stack.prom.api("label/__name__/values")["data"])
    used = {}
    sources = [(f"{d} / {t}", e) for d, t, _, e in dashboard_targets()]
    sources += [(f"alerts.yml / {n}", e) for _, n, e in alert_rules()]
    sources += [(f"{d} ${n}", q) for d, n, q in template_queries()]
    for where, expr in sources:
        for name in METRIC_NAME.findall(expr):
            used.setdefault(name, where)
    missing = []
    for name, where in sorted(used.items()):
        if name in histograms:
            # A histogram is queried through its _bucket/_sum/_count series, never by the bare family.
            missing.append(f"{name} (used in {where}) is a histogram family: query {name}_bucket/_sum/_count")
        elif name.endswith(HISTOGRAM_SUFFIXES) and name.rsplit("_", 1)[0] in histograms:
            continue
        elif name in CONFIGURED_ONLY:
            continue
        elif name not in samples and name not in in_prometheus:
            missing.append(f"{name} (first used in {where})")
    assert not missing, "metrics used but not exported:\n" + "\n".join(missing)
    assert len(used) >= 20, sorted(used)


def test_traffic_is_counted(stack):
    """Spot checks that the numbers behind the panels reflect what the clients did."""
    p = stack.prom
    v = p.value

    def at_least(expr, n):
        got = wait_for(lambda: (v(expr) or 0) >= n and v(expr), timeout=5, interval=0.2)
        assert got, f"{expr} = {v(expr)}, expected >= {n}"

    at_least('sum(portcullis_logins_total{protocol="imap", result="success"})', 3)
    at_least('sum(portcullis_logins_total{protocol="imap", result="bad_credentials"})', 2)
    # The password the proxy verified and Dovecot refused.
    at_least('sum(portcullis_logins_total{protocol="imap", result="backend_rejected"})', 1)
    at_least('sum(portcullis_logins_total{protocol="imap", result="backend_unavailable"})', 3)
    at_least('sum(portcullis_logins_total{protocol="pop3", result="success"})', 1)
    at_least('sum(portcullis_logins_total{protocol="smtp", result="success"})', 1)
    at_least('sum(portcullis_connections_accepted_total{listener="imaps"})', 6)
    at_least('sum(portcullis_starttls_upgrades_total{listener="imap"})', 1)
    at_least('sum(portcullis_tls_handshakes_total{listener="imaps", result="failure"})', 1)
    at_least('sum(portcullis_tls_handshakes_total{listener="imaps", result="success"})', 5)
    at_least('sum(portcullis_connections_rejected_total{listener="imaps", reason="tls"})', 1)
    at_least('sum(portcullis_relayed_bytes_total{protocol="imap", direction="backend_to_client"})', 100)
    at_least('sum(portcullis_relayed_bytes_total{protocol="pop3", direction="backend_to_client"})', 50)
    at_least('sum(portcullis_relayed_bytes_total{protocol="smtp", direction="client_to_backend"})', 50)
    at_least('sum(portcullis_backend_errors_total{backend="dovecot", reason="rejected"})', 1)
    # Down after `fall` failures (the first health check counts too), then skipped.
    at_least('sum(portcullis_backend_errors_total{backend="dead", reason="connect"})', 1)
    at_least('sum(portcullis_health_checks_total{backend="dead", result="failure"})', 1)
    at_least('sum(portcullis_backend_login_duration_seconds_count{backend="dovecot"})', 3)
    at_least('sum(portcullis_backend_connect_duration_seconds_count{backend="postfix"})', 1)
    at_least('sum(portcullis_session_duration_seconds_count{protocol="imap"})', 5)
    # The held IMAP session.
    at_least('sum(portcullis_backend_sessions{backend="dovecot"})', 1)
    at_least('sum(portcullis_connections_active{listener="imaps"})', 1)
    assert v('portcullis_backend_up{backend="dovecot"}') == 1
    assert wait_for(lambda: v('portcullis_backend_up{backend="dead"}') == 0, timeout=5, interval=0.2)
    days = v("min((portcullis_certificate_not_after_timestamp_seconds - time()) / 86400)")
    assert days is not None and days > 14, days
    age = v("max(time() - portcullis_config_last_reload_success_timestamp_seconds)")
    assert age is not None and 0 <= age < 300, age
    assert v('sum(portcullis_config_reloads_total{result="error"})') == 0


def test_rules_load_and_evaluate(stack):
    """Prometheus loaded alerts.yml and evaluates every rule without error; the dead backend
    already has PortcullisBackendDown pending (for: 2m), the healthy ones do not."""

    def evaluated():
        groups = stack.prom.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = all(r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown" for r in rules)
        return rules if rules and done else None

    rules = wait_for(evaluated, timeout=10, interval=0.2)
    assert rules, stack.prom.api("rules")
    assert {r["name"] for r in rules} == {n for _, n, _ in alert_rules()}
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad

    def dead_pending():
        alerts = stack.prom.api("alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "PortcullisBackendDown"]

    down = wait_for(dead_pending, timeout=10, interval=0.2)
    assert [a["labels"]["backend"] for a in down] == ["dead"], down
    assert down[0]["state"] in ("pending", "firing") and down[0]["labels"]["severity"] == "warning"
    firing_now = {a["labels"]["alertname"] for a in stack.prom.api("alerts")["data"]["alerts"]}
    assert "PortcullisDown" not in firing_now and "PortcullisNoHealthyBackend" not in firing_now, firing_now
