"""POP3 and SMTP submission through the real binary, in front of a real Dovecot (POP3) and a real
Postfix (submission, XCLIENT from loopback, delivering into Dovecot's mailboxes).

Clients: poplib, smtplib, swaks, curl. The client side binds 127.0.0.2 so its address differs
from the proxy's own and can be found in the backends' logs and headers.
"""

import base64
import contextlib
import hashlib
import os
import poplib
import smtplib
import socket
import subprocess
import time

import pytest

from conftest import DEMO, QUOTED
from servers import CLIENT_IP, RawClient, child_pids, client_tls_context, wait_for


def body_of(message):
    """Everything after the header/body separator, CRLF line ends."""
    message = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return message.split(b"\r\n\r\n", 1)[1]


def make_message(tag):
    """A message with 8-bit UTF-8 text and lines longer than 998 octets (RFC 5322 limit; reliability
    case 49: relayed byte for byte, never buffered whole)."""
    long_line = ("x" * 40 + " ").encode() * 37
    body = (
        "Grüße aus Köln — ünïcödé ✓\r\n".encode()
        + long_line
        + b"\r\n"
        + b".leading dot survives transparency\r\n"
        + os.urandom(8).hex().encode()
        + b"\r\n"
    )
    head = (
        f"From: {DEMO[0]}\r\nTo: {DEMO[0]}\r\nSubject: e2e {tag}\r\nMessage-ID: <{tag}@e2e.example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode()
    return head + body


class SMTPFrom(smtplib.SMTP):
    def _get_socket(self, host, port, timeout):
        return socket.create_connection((host, port), timeout, source_address=(CLIENT_IP, 0))


class SMTPSSLFrom(smtplib.SMTP_SSL):
    def _get_socket(self, host, port, timeout):
        s = socket.create_connection((host, port), timeout, source_address=(CLIENT_IP, 0))
        return self.context.wrap_socket(s, server_hostname=host)


class POP3SSLFrom(poplib.POP3_SSL):
    def _create_socket(self, timeout):
        s = socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT_IP, 0))
        return self.context.wrap_socket(s, server_hostname=self.host)


def delivered_with(postfix, tag, timeout=10.0, user=DEMO[0]):
    """The delivered file holding Message-ID <tag@...>, in `user`'s mailbox."""
    found = []

    def look():
        for path in postfix.delivered(user):
            with open(path, "rb") as f:
                data = f.read()
            if f"<{tag}@e2e.example.test>".encode() in data:
                found.append(data)
                return True
        return False

    assert wait_for(look, timeout=timeout), f"message {tag} not delivered:\n{postfix.log()[-3000:]}"
    return found[0]


def test_submission_465_delivers_byte_identical_with_client_address(mail_proxy):
    msg = make_message("s465")
    with SMTPSSLFrom("127.0.0.1", mail_proxy.setup.port("submissions"), context=client_tls_context(), timeout=10) as s:
        s.ehlo("client.example")
        assert s.has_extn("auth") and not s.has_extn("starttls")
        # Honest EHLO: Postfix's own extensions come through, its XCLIENT and VRFY do not.
        assert s.has_extn("8bitmime") and s.has_extn("size") and s.has_extn("smtputf8")
        assert not s.has_extn("xclient") and not s.has_extn("vrfy")
        s.login(*DEMO)
        refused = s.sendmail(DEMO[0], [DEMO[0]], msg, mail_options=["BODY=8BITMIME"])
        assert refused == {}
    data = delivered_with(mail_proxy.postfix, "s465")
    assert hashlib.sha256(body_of(data)).hexdigest() == hashlib.sha256(body_of(msg)).hexdigest()
    # XCLIENT carried the client's address, HELO name and login to Postfix.
    received = data.split(b"\nReceived: ", 1)[1].split(b"\n\t(Authenticated", 1)[0]
    assert b"[127.0.0.2]" in received and received.startswith(b"from client.example"), data[:400]
    assert b"(Authenticated sender: demo@example.test)" in data
    assert b"with ESMTPA" in data or b"with ESMTPSA" in data


def test_submission_587_starttls_then_auth(mail_proxy):
    msg = make_message("s587")
    with SMTPFrom("127.0.0.1", mail_proxy.setup.port("submission"), timeout=10) as s:
        s.ehlo("client.example")
        # Reliability case 6: STARTTLS offered, AUTH not, before TLS.
        assert s.has_extn("starttls") and not s.has_extn("auth")
        code, _ = s.docmd("AUTH", "PLAIN AGRlbW9AZXhhbXBsZS50ZXN0AGRlbW8=")
        assert code == 538
        code, _ = s.docmd("MAIL", "FROM:<demo@example.test>")
        assert code == 530
        s.starttls(context=client_tls_context())
        # Case 5: pre-TLS state forgotten: the EHLO too.
        code, _ = s.docmd("MAIL", "FROM:<demo@example.test>")
        assert code == 503
        s.ehlo("client.example")
        # AUTH now offered, STARTTLS not.
        assert s.has_extn("auth") and not s.has_extn("starttls")
        s.login(*DEMO)
        assert s.sendmail(DEMO[0], [DEMO[0]], msg, mail_options=["BODY=8BITMIME"]) == {}
    data = delivered_with(mail_proxy.postfix, "s587")
    assert body_of(data) == body_of(msg)


def test_wrong_password_535_and_nothing_reaches_postfix(mail_proxy):
    before = mail_proxy.postfix.log().count("connect from")
    with SMTPSSLFrom("127.0.0.1", mail_proxy.setup.port("submissions"), context=client_tls_context(), timeout=10) as s:
        s.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login(DEMO[0], "wrong")
        assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")
        # Reliability case 25: after a failed AUTH a transaction gets 530, locally.
        code, _ = s.docmd("MAIL", "FROM:<demo@example.test>")
        assert code == 530
    time.sleep(0.5)
    assert mail_proxy.postfix.log().count("connect from") == before
    assert "login failed: rip=127.0.0.2 user=<demo@example.test> protocol=smtp listener=submissions reason=bad_credentials" in mail_proxy.log()


def test_ehlo_names_cannot_break_the_proxys_xclient(mail_proxy):
    """Against the real Postfix: an EHLO name whose xtext is over 255 bytes (Postfix refuses such
    an XCLIENT attribute) and one ending in a backslash (Postfix's tokenizer would take the
    space after it, and the LOGIN= that follows, into the HELO= value) still give an
    authenticated session: the message arrives marked ESMTPA/ESMTPSA."""
    for i, name in enumerate(["+" * 86, "x\\"]):
        tag = f"odd-ehlo-{i}"
        msg = make_message(tag)
        with SMTPSSLFrom("127.0.0.1", mail_proxy.setup.port("submissions"), context=client_tls_context(), timeout=10) as s:
            s.ehlo(name)
            s.login(*DEMO)
            assert s.sendmail(DEMO[0], [DEMO[0]], msg) == {}
        data = delivered_with(mail_proxy.postfix, tag)
        assert b"with ESMTPA" in data or b"with ESMTPSA" in data, data[:600]


def test_client_xclient_is_refused(mail_proxy):
    with SMTPSSLFrom("127.0.0.1", mail_proxy.setup.port("submissions"), context=client_tls_context(), timeout=10) as s:
        s.ehlo("client.example")
        # Reliability case 50.
        code, text = s.docmd("XCLIENT", "ADDR=6.6.6.6")
        assert code == 550 and b"6.6.6.6" not in text


def test_swaks_starttls_submission(mail_proxy):
    before = len(mail_proxy.log())
    out = subprocess.run(
        [
            "swaks", "--server", f"127.0.0.1:{mail_proxy.setup.port('submission')}", "--local-interface", CLIENT_IP,
            "-tls", "--auth", "LOGIN", "--auth-user", DEMO[0], "--auth-password", DEMO[1],
            "--from", DEMO[0], "--to", DEMO[0], "--header", "Message-ID: <swaks@e2e.example.test>",
            "--body", "sent by swaks", "--ehlo", "swaks.example", "--timeout", "10",
        ],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "235 2.7.0 Authentication successful" in out.stdout
    data = delivered_with(mail_proxy.postfix, "swaks")
    assert b"sent by swaks" in data and b"from swaks.example" in data
    # swaks closes its socket after QUIT without a TLS close_notify, as most clients do: once
    # Postfix has answered the QUIT and closed, that is an ordinary end of the session.
    ended = wait_for(lambda: [l for l in mail_proxy.log()[before:].splitlines()
                              if "session end" in l and "listener=submission " in l and f"client={CLIENT_IP}:" in l])
    assert ended and 'phase="relay" result="closed"' in ended[0], ended


def test_curl_smtps_and_smtp_starttls(mail_proxy, tmp_path):
    for tag, url, extra in (
        ("curl465", f"smtps://127.0.0.1:{mail_proxy.setup.port('submissions')}", []),
        ("curl587", f"smtp://127.0.0.1:{mail_proxy.setup.port('submission')}", ["--ssl-reqd"]),
    ):
        msg = make_message(tag)
        path = tmp_path / f"{tag}.eml"
        path.write_bytes(msg)
        out = subprocess.run(
            ["curl", "-sS", "-k", "--max-time", "20", url, *extra, "-u", f"{DEMO[0]}:{DEMO[1]}",
             "--mail-from", DEMO[0], "--mail-rcpt", DEMO[0], "-T", str(path)],
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert body_of(delivered_with(mail_proxy.postfix, tag)) == body_of(msg)


def test_pop3s_retr_returns_the_message_intact(mail_proxy):
    msg = make_message("pop3")
    with SMTPSSLFrom("127.0.0.1", mail_proxy.setup.port("submissions"), context=client_tls_context(), timeout=10) as s:
        s.login(*DEMO)
        s.sendmail(DEMO[0], [DEMO[0]], msg, mail_options=["BODY=8BITMIME"])
    delivered_with(mail_proxy.postfix, "pop3")
    p = POP3SSLFrom("127.0.0.1", mail_proxy.setup.port("pop3s"), context=client_tls_context(), timeout=10)
    rport = p.sock.getsockname()[1]
    try:
        assert p.getwelcome() == b"+OK POP3 proxy ready."
        p.user(DEMO[0])
        assert p.pass_(DEMO[1]).startswith(b"+OK")
        count, _ = p.stat()
        assert count >= 1
        found = None
        for i in range(1, count + 1):
            _, lines, _ = p.retr(i)
            raw = b"\r\n".join(lines) + b"\r\n"
            if b"<pop3@e2e.example.test>" in raw:
                found = raw
        assert found is not None
        # poplib undoes dot-stuffing; the body is what was submitted.
        assert body_of(found) == body_of(msg)
    finally:
        p.quit()
    # Dovecot's POP3 XCLIENT carried this client's address and port (the port tells this
    # login's line from other tests' logins from the same address).
    dovecot = mail_proxy.setup.dovecot
    found = wait_for(lambda: [l for l in dovecot.logins() if l.get("rport") == str(rport)])
    assert found, dovecot.info_log()[-2000:]
    assert (found[0]["service"], found[0]["user"], found[0]["rip"]) == ("pop3-login", DEMO[0], CLIENT_IP)


def test_pop3_stls_capabilities_and_login(mail_proxy):
    p = poplib.POP3("127.0.0.1", mail_proxy.setup.port("pop3"), timeout=10)
    try:
        caps = p.capa()
        # Reliability case 6: STLS offered, no USER/SASL before TLS.
        assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
        with pytest.raises(poplib.error_proto):
            p.user(DEMO[0])
        p.stls(context=client_tls_context())
        caps = p.capa()
        assert "USER" in caps and "SASL" in caps and "STLS" not in caps
        p.user(DEMO[0])
        assert p.pass_(DEMO[1]).startswith(b"+OK")
        count, size = p.stat()
        # Earlier tests delivered mail to demo's mailbox.
        assert count >= 1 and size > 0
    finally:
        p.quit()


def test_pop3_wrong_password(mail_proxy):
    p = POP3SSLFrom("127.0.0.1", mail_proxy.setup.port("pop3s"), context=client_tls_context(), timeout=10)
    try:
        p.user(DEMO[0])
        with pytest.raises(poplib.error_proto) as e:
            p.pass_("wrong")
        assert e.value.args[0] == b"-ERR [AUTH] Authentication failed."
    finally:
        p.close()


def test_stls_after_login_goes_nowhere(mail_proxy):
    """STLS after PASS (reliability case 4) is refused, and the session goes on (Dovecot's
    answer in the transaction state)."""
    c = RawClient(mail_proxy.setup.port("pop3s"), tls=True)
    assert c.line().startswith(b"+OK")
    c.send(b"USER " + DEMO[0].encode() + b"\r\n")
    assert c.line().startswith(b"+OK")
    c.send(b"PASS " + DEMO[1].encode() + b"\r\n")
    assert c.line().startswith(b"+OK")
    c.send(b"STLS\r\n")
    assert c.line().startswith(b"-ERR")
    c.send(b"NOOP\r\n")
    assert c.line().startswith(b"+OK")
    c.send(b"QUIT\r\n")
    assert c.line().startswith(b"+OK")
    c.close()


def test_curl_pop3s(mail_proxy):
    out = subprocess.run(
        ["curl", "-sS", "-k", "--max-time", "20", f"pop3s://127.0.0.1:{mail_proxy.setup.port('pop3s')}/",
         "-u", f"{DEMO[0]}:{DEMO[1]}"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    # A LIST of at least one message: "1 <size>".
    assert out.stdout.splitlines()[0].startswith("1 "), out.stdout


def test_pop3_and_smtp_alpn(mail_proxy):
    import ssl
    for name, good in (("pop3s", "pop3"), ("submissions", "smtp")):
        ctx = client_tls_context(alpn=["http/1.1"])
        with pytest.raises(ssl.SSLError):
            with socket.create_connection(("127.0.0.1", mail_proxy.setup.port(name)), timeout=5) as raw:
                ctx.wrap_socket(raw, server_hostname="localhost").recv(10)
        ctx = client_tls_context(alpn=[good])
        with socket.create_connection(("127.0.0.1", mail_proxy.setup.port(name)), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as t:
                assert t.selected_alpn_protocol() == good


# Reliability case 46: end-of-data look-alikes (SMTP smuggling, hannob/smtpsmug). Only CRLF.CRLF
# ends DATA; what a backend makes of the others is its own business (Postfix 3.7's
# smtpd_forbid_bare_newline is off by default). Case 47: a second message pipelined in the same
# DATA stream after a real CRLF.CRLF, which is legal after AUTH.
SMUGGLING_VARIANTS = [
    b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
    b"\r\n\0.\r\n", b"\r\n.\0\r\n", b"\r\r\n.\r\r\n", b"\r\n.\r\n",
]
# Delivered to a mailbox no other test counts (demo's INBOX is counted by the IMAP tests).
SMUGGLE_RCPT = QUOTED[0]


def smuggling_session(c, index, variant, path):
    """After login: one transaction whose message carries `variant` followed by a second
    transaction's commands and message, all in one write after the 354, then QUIT. Returns the
    final reply lines from MAIL FROM on, up to the server's close."""
    def tag(part):
        return f"smug{index}-{path}-{part}"

    def head(part):
        return (f"From: {DEMO[0]}\r\nTo: {SMUGGLE_RCPT}\r\nSubject: {tag(part)}\r\n"
                f"Message-ID: <{tag(part)}@e2e.example.test>\r\n\r\n").encode()

    envelope = f"MAIL FROM:<{DEMO[0]}>\r\nRCPT TO:<{SMUGGLE_RCPT}>\r\nDATA\r\n".encode()
    c.send(envelope)
    replies = [reply(c) for _ in range(3)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"354"], replies
    c.send(head("outer") + b"first part" + variant + envelope + head("inner") + b"smuggled part\r\n.\r\n")
    c.send(b"QUIT\r\n")
    # The last lines of every reply, up to the server's close.
    replies += [line for line in c.read_to_close(10).split(b"\r\n") if line[3:4] == b" "]
    assert replies[-1].startswith(b"221"), replies
    return replies


def reply(c):
    """The last line of the next (multi-line) SMTP reply, without its CRLF."""
    while True:
        line = c.line()
        if line[3:4] != b"-":
            return line[:-2]


def expect_reply(c, code):
    r = reply(c)
    assert r.startswith(code), r


def delivered_smuggling(postfix, path, queued, timeout=15.0):
    """{variant index: sorted [(parts found together in one delivered file, body)]} for `path`,
    once `queued` files have arrived."""
    marker = f"-{path}-".encode()

    def files():
        out = []
        for p in postfix.delivered(SMUGGLE_RCPT):
            with open(p, "rb") as f:
                data = f.read()
            if marker in data:
                out.append(data)
        return out

    assert wait_for(lambda: len(files()) >= queued, timeout=timeout), postfix.log()[-3000:]
    time.sleep(0.3)
    found = {}
    for data in files():
        parts = tuple(sorted(p for p in ("outer", "inner") if f"-{path}-{p}@".encode() in data))
        index = int(data.split(b"Subject: smug", 1)[1].split(b"-", 1)[0])
        found.setdefault(index, []).append((parts, body_of(data).replace(marker, b"-PATH-")))
    return {k: sorted(v) for k, v in found.items()}


def split_at(delivered, index):
    """The parts delivered together, per file, for one variant: [("inner",), ("outer",)] when
    the look-alike ended the first message, [("inner", "outer")] when it did not."""
    return [parts for parts, _ in delivered[index]]


def test_smuggling_look_alikes_reach_postfix_as_sent(mail_proxy):
    """Reliability cases 46 and 47: after AUTH the proxy relays the DATA stream and acts on none
    of the end-of-data look-alikes, so Postfix behind the proxy treats it as it treats a client
    talking to it directly: the same replies, the same messages delivered."""
    pf = mail_proxy.postfix
    replies = {"proxy": [], "direct": []}
    for index, variant in enumerate(SMUGGLING_VARIANTS):
        # Through the proxy: implicit TLS, AUTH PLAIN; the proxy logs in to Postfix with XCLIENT.
        with submission_login(mail_proxy) as s:
            replies["proxy"].append(smuggling_session(s, index, variant, "proxy"))
        # Directly: the same XCLIENT the proxy sends, then the same bytes.
        with postfix_login(pf) as c:
            replies["direct"].append(smuggling_session(c, index, variant, "direct"))
    codes = {path: [[r[:3] for r in session] for session in got] for path, got in replies.items()}
    assert codes["proxy"] == codes["direct"]
    queued = sum(b"queued as" in r for session in replies["proxy"] for r in session)
    through, direct = delivered_smuggling(pf, "proxy", queued), delivered_smuggling(pf, "direct", queued)
    assert through == direct
    # Not vacuous: every session delivered something, and a real CRLF.CRLF ends the first message
    # so the pipelined second is delivered on its own (case 47). Debian 12's Postfix also splits
    # at bare-LF look-alikes such as \n.\n. A proxy that stopped at a look-alike, dropped or
    # rewrote NULs or answered for the backend would differ from the direct session above; one
    # that turned bare LFs into CRLF would not (Postfix reads both as a line end), and is caught
    # by the normalize step below.
    assert split_at(through, len(SMUGGLING_VARIANTS) - 1) == [("inner",), ("outer",)], through
    assert len(through) == len(SMUGGLING_VARIANTS)
    bare_lf = SMUGGLING_VARIANTS.index(b"\n.\n")
    assert split_at(through, bare_lf) == [("inner",), ("outer",)], "Postfix's default changed?"

    def through_proxy(path):
        with submission_login(mail_proxy) as s:
            session = smuggling_session(s, bare_lf, SMUGGLING_VARIANTS[bare_lf], path)
        queued = sum(b"queued as" in r for r in session)
        return split_at(delivered_smuggling(pf, path, queued), bare_lf)

    # The setting README gives operators works behind the proxy: with smtpd_forbid_bare_newline
    # = normalize, \n.\n no longer ends the message. Its exclusions ($mynetworks: 127.0.0.1, the
    # proxy's address) are matched against the address XCLIENT forwarded (127.0.0.2): excluding
    # that one brings the split back.
    try:
        postfix_reconfigure(pf, set=["smtpd_forbid_bare_newline=normalize"])
        assert through_proxy("normalized") == [("inner", "outer")]
        postfix_reconfigure(pf, set=[f"smtpd_forbid_bare_newline_exclusions={CLIENT_IP}"])
        assert through_proxy("excluded") == [("inner",), ("outer",)]
    finally:
        postfix_reconfigure(pf, remove=["smtpd_forbid_bare_newline", "smtpd_forbid_bare_newline_exclusions"],
                            check=False)


@contextlib.contextmanager
def postfix_login(postfix):
    """A raw client straight to Postfix from the proxy's address, logged in as the demo user with
    the XCLIENT the proxy sends."""
    c = RawClient(postfix.port, source="127.0.0.1")
    try:
        expect_reply(c, b"220")
        c.send(b"EHLO proxy.example\r\n")
        expect_reply(c, b"250")
        c.send(f"XCLIENT ADDR={CLIENT_IP} PORT={c.sock.getsockname()[1]} NAME=[UNAVAILABLE] PROTO=ESMTP "
               f"HELO=client.example LOGIN={DEMO[0]}\r\n".encode())
        expect_reply(c, b"220")
        c.send(b"EHLO client.example\r\n")
        expect_reply(c, b"250")
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def submission_login(mail_proxy):
    """A raw client on the proxy's port 465 (implicit TLS), logged in as the demo user."""
    c = RawClient(mail_proxy.setup.port("submissions"), tls=True)
    try:
        expect_reply(c, b"220")
        c.send(b"EHLO client.example\r\n")
        expect_reply(c, b"250")
        c.send(b"AUTH PLAIN " + base64.b64encode(f"\0{DEMO[0]}\0{DEMO[1]}".encode()) + b"\r\n")
        expect_reply(c, b"235")
        yield c
    finally:
        c.close()


def postfix_reconfigure(postfix, set=(), remove=(), check=True):
    """Set or remove main.cf settings of the test Postfix and reload it. Returns once every
    smtpd process from before has gone: one idle at the reload keeps the old settings until it
    exits, a moment later, and only then is the next connection sure to get the new ones."""
    with open(os.path.join(postfix.dir, "queue", "pid", "master.pid")) as f:
        master = int(f.read().split()[0])
    def smtpds():
        out = []
        for pid, started in child_pids(master):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "smtpd":
                        out.append((pid, started))
            except OSError:
                pass
        return out

    old = smtpds()
    if set:
        subprocess.run(["postconf", "-c", postfix.dir, "-e", *set], check=check, capture_output=True)
    if remove:
        subprocess.run(["postconf", "-c", postfix.dir, "-X", *remove], check=check, capture_output=True)
    subprocess.run(["postfix", "-c", postfix.dir, "reload"], check=check, capture_output=True)
    gone = wait_for(lambda: not any(p in smtpds() for p in old), timeout=10)
    assert gone or not check, f"smtpd processes from before the reload still run:\n{postfix.log()[-2000:]}"


# Reliability case 50, after login: Postfix caches XCLIENT authorisation per connection, so a
# connection from the proxy may send XCLIENT again at any time, and a client's XCLIENT relayed
# after AUTH would take another user's login (LOGIN=) and address. Each stream below is one a
# client could send after AUTH; each makes Postfix take the forged login when sent on a
# connection that may use XCLIENT (checked below), and each is refused by the proxy.
FORGED = "mallory@example.test"


def forged_transaction(tag):
    """A transaction after a forged XCLIENT: its message's Received header names the login
    Postfix believed in."""
    return (f"EHLO forged.example\r\nMAIL FROM:<{FORGED}>\r\nRCPT TO:<{SMUGGLE_RCPT}>\r\nDATA\r\n"
            f"From: {FORGED}\r\nTo: {SMUGGLE_RCPT}\r\nSubject: {tag}\r\nMessage-ID: <{tag}@e2e.example.test>\r\n\r\n"
            f"forged\r\n.\r\nQUIT\r\n").encode()


XCLIENT_AFTER_LOGIN = {
    "plain": b"XCLIENT LOGIN=" + FORGED.encode() + b" ADDR=6.6.6.6\r\n",
    "leading space": b" XCLIENT LOGIN=" + FORGED.encode() + b"\r\n",
    "tab": b"XCLIENT\tLOGIN=" + FORGED.encode() + b"\r\n",
    # Postfix splits words on every isspace character and keeps a CR that does not end a line.
    "vertical tab": b"XCLIENT\x0bLOGIN=" + FORGED.encode() + b"\r\n",
    "form feed first": b"\x0cXCLIENT LOGIN=" + FORGED.encode() + b"\r\n",
    "CR inside the line": b"XCLIENT\rLOGIN=" + FORGED.encode() + b"\r\n",
    "lower case, bare LF": b"xclient login=" + FORGED.encode() + b" addr=6.6.6.6\n",
    "after another command": b"NOOP\r\nXCLIENT LOGIN=" + FORGED.encode() + b"\r\n",
    # DATA without a transaction is refused (503), so what follows is read as commands.
    "after a refused DATA": b"DATA\r\nXCLIENT LOGIN=" + FORGED.encode() + b"\r\n",
    # A BDAT chunk ends where its count says, mid-line: Postfix reads the XCLIENT right after
    # the two bytes "hi" as a command (CHUNKING is on in Debian 12's Postfix by default).
    "after a BDAT chunk": (
        f"MAIL FROM:<{DEMO[0]}>\r\nRCPT TO:<{SMUGGLE_RCPT}>\r\nBDAT 2 LAST\r\nhi"
        f"XCLIENT LOGIN={FORGED}\r\n").encode(),
    # Debian 12's Postfix ends a message at \n.\n (see the smuggling test above).
    "after an end-of-data look-alike": (
        f"MAIL FROM:<{DEMO[0]}>\r\nRCPT TO:<{SMUGGLE_RCPT}>\r\nDATA\r\nSubject: lookalike\r\n\r\nbody\n.\n"
        f"XCLIENT LOGIN={FORGED}\r\n").encode(),
}


def forged_logins(postfix, tags, timeout=15.0):
    """{tag: authenticated sender named in its delivered message}, once every tag has arrived."""
    found = {}

    def look():
        for p in postfix.delivered(SMUGGLE_RCPT):
            with open(p, "rb") as f:
                data = f.read()
            for tag in tags:
                if f"<{tag}@e2e.example.test>".encode() in data:
                    found[tag] = data.split(b"(Authenticated sender: ", 1)[1].split(b")", 1)[0].decode()
        return len(found) == len(tags)

    assert wait_for(look, timeout=timeout), (found, postfix.log()[-3000:])
    return found


def test_client_xclient_after_login_never_reaches_postfix(mail_proxy):
    pf = mail_proxy.postfix
    # Straight to Postfix from the proxy's address, each stream takes the forged login.
    direct = {}
    for i, (name, stream) in enumerate(XCLIENT_AFTER_LOGIN.items()):
        with postfix_login(pf) as c:
            c.send(stream + forged_transaction(f"forged-direct-{i}"))
            direct[f"forged-direct-{i}"] = name
            c.read_to_close(10)
    assert set(forged_logins(pf, direct).values()) == {FORGED}
    # Through the proxy, each is refused: the session is closed with a 421 and the forged
    # transaction never reaches Postfix. So is XFORWARD (a backend may trust the proxy for it
    # too), and a line after a bare CR (Postfix ends lines at LF only; other servers may not).
    streams = dict(XCLIENT_AFTER_LOGIN, xforward=b"XFORWARD ADDR=6.6.6.6 NAME=forged.example\r\n",
                   bare_cr=b"NOOP\rXCLIENT LOGIN=" + FORGED.encode() + b"\r\n")
    for i, (name, stream) in enumerate(streams.items()):
        with submission_login(mail_proxy) as s:
            s.send(stream + forged_transaction(f"forged-proxy-{i}"))
            assert_refused(s.read_to_close(10), name)
    # A message sent after them arrives on its own (with the real login); none of theirs did.
    with submission_login(mail_proxy) as s:
        s.send(forged_transaction("forged-after").replace(b"EHLO forged.example\r\n", b"").replace(
            f"<{FORGED}>".encode(), f"<{DEMO[0]}>".encode()))
        s.read_to_close(10)
    assert forged_logins(pf, ["forged-after"]) == {"forged-after": DEMO[0]}
    time.sleep(1)
    for p in pf.delivered(SMUGGLE_RCPT):
        with open(p, "rb") as f:
            assert b"forged-proxy-" not in f.read()


def test_client_starttls_after_login_never_reaches_postfix(mail_proxy, tmp_path):
    """Relayed, a client's STARTTLS to a backend that takes it would start TLS between the
    client and the backend inside the proxy's session, and the guard against XCLIENT and BDAT
    (case 50) would see only ciphertext from then on. Refused whether or not the backend offers
    it, also when a NUL ends the verb (Postfix reads a command line as a C string)."""
    pf = mail_proxy.postfix
    streams = (b"STARTTLS\r\n", b"NOOP\r\n starttls\n", b"STARTTLS\0 x\r\n")
    with submission_login(mail_proxy) as s:
        s.send(b"STARTTLS\r\n")
        assert_refused(s.read_to_close(10), "STARTTLS to a Postfix that does not offer it")
    with postfix_offering_starttls(pf, tmp_path):
        # Now, from the proxy's address and after XCLIENT's login, Postfix would start TLS.
        for stream in (b"STARTTLS\r\n", b"STARTTLS\0 x\r\n"):
            with postfix_login(pf) as c:
                c.send(stream)
                expect_reply(c, b"220")
        # Through the proxy (whose backend leg is plaintext here): refused, the session closed.
        for stream in streams:
            with submission_login(mail_proxy) as s:
                s.send(stream)
                assert_refused(s.read_to_close(10), stream)


@contextlib.contextmanager
def postfix_offering_starttls(pf, tmp_path):
    """The test Postfix with a certificate, so that it offers STARTTLS (to the proxy too)."""
    from acme_servers import make_ca
    _, cert, key = make_ca(str(tmp_path))
    tls = ["smtpd_tls_cert_file", "smtpd_tls_key_file", "smtpd_tls_security_level"]
    postfix_reconfigure(pf, set=[f"smtpd_tls_cert_file={cert}", f"smtpd_tls_key_file={key}",
                                 "smtpd_tls_security_level=may"])
    try:
        yield
    finally:
        postfix_reconfigure(pf, remove=tls)


def assert_refused(closing, what):
    """`closing`: what the proxy sent up to its close; it must end the session with the guard's
    421 and no reply from Postfix to the refused line (a 220 to STARTTLS, say)."""
    lines = closing.split(b"\r\n")
    assert b"421 4.7.0 Command not allowed after login, closing connection" in lines, (what, lines)
    assert not any(l.startswith(b"220") for l in lines), lines


# Lines a message may hold (a pasted SMTP transcript) that are refused as commands.
LOOK_ALIKE_LINES = (
    f"XCLIENT LOGIN={FORGED} ADDR=6.6.6.6\r\n xforward ADDR=6.6.6.6\r\nBDAT 2 LAST\r\nSTARTTLS\r\n"
    f"\tStartTLS\r\nDATA\r\n..XCLIENT dot-stuffed\r\n").encode()


def test_message_lines_that_look_like_refused_commands_are_delivered_as_sent(mail_proxy, tmp_path):
    """The guard follows Postfix's replies: after the 354 that answers DATA it lets message text
    through, whatever its lines start with, and after the message's end it refuses commands
    again, also after an end-of-data look-alike Postfix takes for the end (case 46)."""
    pf = mail_proxy.postfix
    envelope = f"MAIL FROM:<{DEMO[0]}>\r\nRCPT TO:<{SMUGGLE_RCPT}>\r\nDATA\r\n".encode()
    head = (f"From: {DEMO[0]}\r\nTo: {SMUGGLE_RCPT}\r\nSubject: transcript\r\n"
            f"Message-ID: <lookalike@e2e.example.test>\r\n\r\n").encode()
    with postfix_offering_starttls(pf, tmp_path):
        with submission_login(mail_proxy) as s:
            s.send(envelope)
            assert [reply(s)[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            s.send(head + LOOK_ALIKE_LINES + b"end\r\n.\r\n")
            expect_reply(s, b"250")
            # The session goes on, with commands checked again.
            s.send(b"NOOP\r\n")
            expect_reply(s, b"250")
            s.send(f"XCLIENT LOGIN={FORGED}\r\n".encode())
            assert_refused(s.read_to_close(10), "XCLIENT after the message")
        data = delivered_with(pf, "lookalike", user=SMUGGLE_RCPT)
        # Byte for byte (Postfix undoes the dot-stuffing), with the real login.
        assert body_of(data) == LOOK_ALIKE_LINES.replace(b"\r\n..", b"\r\n.") + b"end\r\n", data
        assert b"(Authenticated sender: demo@example.test)" in data
        # \n.\n after the 354 ends the message for Postfix 3.7 (see the smuggling test), and for
        # the guard: the XCLIENT after it is refused.
        with submission_login(mail_proxy) as s:
            s.send(envelope)
            assert [reply(s)[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            s.send(head.replace(b"lookalike@", b"smuggler@") + b"text\n.\n"
                   + f"XCLIENT LOGIN={FORGED}\r\n".encode())
            assert_refused(s.read_to_close(10), "XCLIENT after \\n.\\n")
