"""deploy/: the systemd unit verifies, the Kubernetes manifests pass a schema check, and the
configuration they ship is accepted by `portcullis check`."""

import glob
import os
import subprocess

import pytest
import yaml

from servers import ROOT, portcullis_binary

DEPLOY = os.path.join(ROOT, "deploy")
# Kinds whose schema comes from a CRD (cert-manager, Prometheus Operator): checked by shape.
CRD_KINDS = {"Certificate": "cert-manager.io/v1", "ServiceMonitor": "monitoring.coreos.com/v1"}


def manifests():
    for path in sorted(glob.glob(os.path.join(DEPLOY, "kubernetes", "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    yield path, doc


def test_kubernetes_manifests_pass_schema_validation(tmp_path):
    builtin = []
    for path, doc in manifests():
        kind = doc["kind"]
        if kind in CRD_KINDS:
            assert doc["apiVersion"] == CRD_KINDS[kind], path
            assert doc["metadata"]["name"] and doc["spec"], path
            continue
        out = tmp_path / f"{len(builtin)}-{kind}.yaml"
        out.write_text(yaml.safe_dump(doc))
        builtin.append(str(out))
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= {
        yaml.safe_load(open(p))["kind"] for p in builtin
    }
    result = subprocess.run(
        ["kubernetes-validate", "--strict", "--quiet", *builtin], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_config_is_accepted_by_check(tmp_path):
    config = next(doc for _, doc in manifests() if doc["kind"] == "ConfigMap")["data"]["portcullis.toml"]
    # The pod's paths, rooted in a temp dir, with a certificate and users file made for the test.
    root = str(tmp_path)
    config = config.replace("/etc/portcullis/", root + "/")
    os.makedirs(os.path.join(root, "tls"))
    os.makedirs(os.path.join(root, "users"))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
         "-subj", "/CN=mail.example.org", "-addext", "subjectAltName=DNS:mail.example.org", "-keyout", os.path.join(root, "tls", "tls.key"),
         "-out", os.path.join(root, "tls", "tls.crt")],
        check=True, capture_output=True,
    )
    with open(os.path.join(root, "users", "users"), "w") as f:
        f.write("demo@example.org:{PLAIN}x\n")
    path = tmp_path / "portcullis.toml"
    path.write_text(config)
    result = subprocess.run([portcullis_binary(), "check", "--config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "4 listeners, 6 backends" in result.stdout


def test_systemd_unit_verifies(tmp_path):
    unit = open(os.path.join(DEPLOY, "systemd", "portcullis.service")).read()
    binary = portcullis_binary()
    assert "ExecStart=/usr/local/bin/portcullis run" in unit and "Type=notify" in unit
    # `systemctl reload` fails on a broken config instead of reporting success: check first.
    reloads = [l.split("=", 1)[1] for l in unit.splitlines() if l.startswith("ExecReload=")]
    assert len(reloads) == 2 and reloads[0].startswith("/usr/local/bin/portcullis check"), reloads
    assert "kill -HUP $MAINPID" in reloads[1], reloads
    unit = unit.replace("/usr/local/bin/portcullis", binary)
    path = tmp_path / "portcullis.service"
    path.write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    # systemd-analyze prints problems on stderr; unrelated host units may warn, ours must not.
    ours = [l for l in result.stderr.splitlines() if "portcullis.service" in l]
    assert result.returncode == 0 and not ours, result.stderr


@pytest.mark.parametrize("name", ["Containerfile"])
def test_container_build_file_is_multi_stage_and_non_root(name):
    text = open(os.path.join(DEPLOY, "container", name)).read()
    assert text.count("FROM ") == 2 and "AS build" in text
    assert "USER nonroot" in text and "cargo build --release --locked" in text


def test_systemd_hears_of_start_reloads_and_stop_only(tmp_path, dovecot):
    """The `Type=notify` protocol as the shipped unit's systemd sees it, through a
    NOTIFY_SOCKET of the test's own: READY=1 once listening; RELOADING=1 (with MONOTONIC_USEC)
    then READY=1 for a SIGHUP and for a config whose contents changed; nothing for a file event
    that changes nothing (the same text saved again); STOPPING=1 at SIGTERM."""
    import signal
    import socket

    from servers import Portcullis, free_port, imap_to_dovecot

    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)

    def next_state():
        return sock.recv(4096).decode()

    def nothing_for(seconds):
        sock.settimeout(seconds)
        try:
            got = sock.recv(4096).decode()
        except TimeoutError:
            return True
        finally:
            sock.settimeout(15)
        raise AssertionError(f"unexpected notification: {got!r}")

    def reloaded():
        first = next_state().split("\n")
        assert first[0] == "RELOADING=1" and first[1].startswith("MONOTONIC_USEC="), first
        assert int(first[1].split("=", 1)[1]) > 0, first
        assert next_state() == "READY=1"

    port = free_port()
    text = imap_to_dovecot(port, dovecot, '[auth]\nsource = "backend"\n')
    pc = Portcullis(str(tmp_path), text)
    pc.start(wait_port=port, env={"NOTIFY_SOCKET": path})
    try:
        assert next_state() == "READY=1"
        # The same contents written again (write and rename: a file event): no reload.
        pc.write_config(text)
        assert nothing_for(3)
        pc.write_config(text + "\n# changed\n")
        reloaded()
        pc.proc.send_signal(signal.SIGHUP)
        reloaded()
        pc.proc.send_signal(signal.SIGTERM)
        assert next_state() == "STOPPING=1"
        assert pc.proc.wait(timeout=30) == 0
    finally:
        pc.stop()
        sock.close()
