"""Webhooks cannot be aimed inside the deployment, are signed per task, and end on time.

Through a live gateway (uvicorn, tiny model, real Redis) for uploads, and against real HTTP(S)
receivers on loopback for deliveries.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import socket
import ssl
import threading
import time
import uuid

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gateway_helpers import running_gateway, tiny_settings

from sculptor.records import JobRecord, TaskRecord
from sculptor.webhooks import check_target, notify_terminal, verify
from tests.webhook_receiver import receivers  # noqa: F401  (the fixture)

EXAMPLES = [{"prompt": f"say {i}", "completion": str(i)} for i in range(12)]
JOB = JobRecord(job_id="job_1", task_id="task_1", status="promoted", parent_version="v0", candidate_version="v1")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path_factory.mktemp("hooks"), redis_url, tiny_model_dir,
                             rate_limit_uploads_per_min=0, webhook_allow_hosts=["127.0.0.2"])
    with running_gateway(settings) as (url, ctx):
        yield url, ctx


def upload(url: str, webhook_url: str, multipart: bool = False) -> httpx.Response:
    if multipart:
        jsonl = "\n".join(json.dumps(e) for e in EXAMPLES)
        return httpx.post(f"{url}/tasks", files={"file": ("t.jsonl", jsonl)},
                          data={"name": "hooked", "webhook_url": webhook_url}, timeout=30)
    return httpx.post(f"{url}/tasks", json={"name": "hooked", "examples": EXAMPLES, "webhook_url": webhook_url},
                      timeout=30)


INSIDE = [
    ("http://169.254.169.254/latest/meta-data/", "link-local"),  # the cloud metadata service
    ("http://127.0.0.1:6379/", "loopback"),
    ("http://localhost:8000/hook", "loopback"),
    ("http://[::1]/hook", "loopback"),
    ("http://2130706433/hook", "loopback"),  # 127.0.0.1 written as one number
    ("http://0x7f.1/hook", "loopback"),
    ("http://0.0.0.0:8000/", "unspecified"),
    ("http://10.0.0.7/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("https://172.16.5.4/hook", "private"),
    ("http://100.64.0.1/hook", "non-public"),  # carrier-grade NAT
    ("http://[fd00::1]/hook", "private"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://[::ffff:169.254.169.254]/hook", "link-local"),
    ("http://[64:ff9b::a9fe:a9fe]/hook", "link-local"),  # NAT64 of 169.254.169.254
    ("http://224.0.0.1/hook", "multicast"),
]


@pytest.mark.parametrize("target, reason", INSIDE)
def test_upload_refuses_webhooks_aimed_inside(gateway, target, reason):
    url, ctx = gateway
    before = ctx.tasks.count()
    for multipart in (False, True):
        r = upload(url, target, multipart)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_webhook_url"
        assert f"a {reason} address" in error["message"] and "SCULPTOR_WEBHOOK_ALLOW_HOSTS" in error["message"]
    assert ctx.tasks.count() == before, "a refused upload stores nothing"


@pytest.mark.parametrize("target, words", [
    ("ftp://example.com/hook", "http:// or https://"),
    ("http:///nohost", "http:// or https://"),
    ("http://no-such-host.invalid/hook", "does not resolve"),
])
def test_upload_refuses_webhooks_that_cannot_be_called(gateway, target, words):
    r = upload(gateway[0], target)
    assert r.status_code == 422 and words in r.json()["error"]["message"], r.text


def test_upload_returns_the_signing_secret_once(gateway):
    url, ctx = gateway
    r = upload(url, "http://93.184.215.14/hook")  # a public address (no DNS needed)
    assert r.status_code == 202, r.text
    secret = r.json()["webhook_secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    task = ctx.tasks.get(r.json()["task_id"])
    assert task.webhook_secret.get_secret_value() == secret, "stored for delivery"
    # Never again: not in the task, the task list, the job, or the record's own dumps.
    for path in (f"/tasks/{task.task_id}", "/tasks", f"/jobs/{r.json()['job_id']}", "/jobs"):
        assert secret not in httpx.get(url + path, timeout=10).text, path
    assert secret not in json.dumps(task.model_dump(mode="json")) and secret not in repr(task)
    # Each task has its own.
    assert upload(url, "http://93.184.215.14/hook").json()["webhook_secret"] != secret
    assert "webhook_secret" not in httpx.post(f"{url}/tasks", json={"name": "x", "examples": EXAMPLES},
                                              timeout=30).json()


def test_allowed_hosts_may_be_internal(gateway):
    r = upload(gateway[0], "http://127.0.0.2:9/hook", multipart=True)
    assert r.status_code == 202, r.text


# ---------------------------------------------------------------------------------------------- delivery


def task_for(url: str, secret: str | None = "whsec_task_secret") -> TaskRecord:
    return TaskRecord(task_id="task_1", name="t", digest="d", dataset_uri="file:///x", num_examples=1, size_bytes=1,
                      webhook_url=url, webhook_secret=secret)


def receiver_check(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """What README.md tells a receiver to do, with the standard library only."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    signed = fields["t"].encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return abs(time.time() - int(fields["t"])) <= tolerance_s and hmac.compare_digest(expected, fields["v1"])


def test_delivery_is_signed_with_the_task_secret(receivers):
    receiver = receivers(statuses=[503])
    url = f"http://127.0.0.1:{receiver.port}/hook"
    assert notify_terminal(task_for(url), JOB, attempts=2, first_delay_s=0.01, allow_hosts=["127.0.0.1"]) is False
    assert len(receiver.requests) == 2
    deliveries = set()
    for headers, body in receiver.requests:
        assert json.loads(body) == JOB.model_dump(mode="json")
        assert headers["Content-Type"] == "application/json"
        signature = headers["Sculptor-Signature"]
        assert receiver_check("whsec_task_secret", signature, body)
        assert verify("whsec_task_secret", signature, body)
        assert not verify("whsec_other", signature, body) and not verify("whsec_task_secret", signature, body + b" ")
        assert not verify("whsec_task_secret", signature, body, now=time.time() + 3600), "an old replay"
        deliveries.add(str(uuid.UUID(headers["Sculptor-Delivery"])))
    assert len(deliveries) == 1, "a retry is the same delivery"


def test_a_task_without_secret_gets_no_unsigned_delivery(receivers):
    receiver = receivers()
    url = f"http://127.0.0.1:{receiver.port}/hook"
    assert notify_terminal(task_for(url, secret=None), JOB, allow_hosts=["127.0.0.1"]) is False
    assert receiver.requests == []


def test_delivery_refuses_internal_targets_not_allowed(receivers):
    receiver = receivers()
    for host in ("127.0.0.1", "localhost"):
        url = f"http://{host}:{receiver.port}/hook"
        assert notify_terminal(task_for(url), JOB, sleep=lambda s: None, allow_hosts=[]) is False
    assert receiver.requests == [], "checked again at delivery, not only at upload"


def test_delivery_connects_to_the_checked_address_and_keeps_the_name(receivers):
    target = check_target("http://LocalHost:8080/hook", ["localhost"])
    assert ipaddress.ip_address(target.address).is_loopback and target.url.host == "localhost"
    receiver = receivers()
    url = f"http://localhost:{receiver.port}/hook"
    assert notify_terminal(task_for(url), JOB, allow_hosts=["localhost"]) is True
    assert receiver.requests[0][0]["Host"] == f"localhost:{receiver.port}"


def make_tls(tmp_path, name: str) -> tuple[ssl.SSLContext, str]:
    """A CA (its PEM file) and a server context whose certificate is for `name` only, not for 127.0.0.1."""
    def cert(subject, issuer, key, issuer_key, ca: bool):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sculptor test CA")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, ca=True)
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_name, key, ca_key, ca=False)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "leaf.pem")
    return context, str(tmp_path / "ca.pem")


def test_https_delivery_to_the_pinned_address_verifies_the_name(receivers, tmp_path, monkeypatch):
    tls, ca_file = make_tls(tmp_path, "localhost")
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)  # httpx trusts this CA (as an operator's private CA would be)
    receiver = receivers(tls=tls)
    assert notify_terminal(task_for(f"https://localhost:{receiver.port}/hook"), JOB, attempts=1,
                           allow_hosts=["localhost"]) is True
    assert receiver.sni == ["localhost"], "the TLS handshake names the host, not the address it connects to"
    assert receiver.requests[0][0]["Host"] == f"localhost:{receiver.port}"


# ---------------------------------------------------------------------------------------------- deadlines


class Dripper:
    """A receiver that answers one header byte at a time, never finishing: each read is quick, the whole never."""

    def __init__(self, for_s: float = 20.0):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.stop = threading.Event()
        self.for_s = for_s
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                end = time.monotonic() + self.for_s
                while time.monotonic() < end and not self.stop.is_set():
                    conn.sendall(b"a")
                    time.sleep(0.1)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.listener.close()


@pytest.fixture
def dripper():
    d = Dripper()
    yield d
    d.close()


def test_one_attempt_ends_at_its_deadline_whatever_the_receiver_does(dripper):
    started = time.monotonic()
    url = f"http://127.0.0.1:{dripper.port}/hook"
    assert notify_terminal(task_for(url), JOB, attempts=1, timeout_s=1.0, allow_hosts=["127.0.0.1"]) is False
    assert time.monotonic() - started < 3.0


def test_all_attempts_end_at_the_delivery_deadline(dripper):
    started = time.monotonic()
    url = f"http://127.0.0.1:{dripper.port}/hook"
    assert notify_terminal(task_for(url), JOB, attempts=10, first_delay_s=0.2, timeout_s=1.0, deadline_s=2.5,
                           allow_hosts=["127.0.0.1"]) is False
    assert time.monotonic() - started < 4.0
    assert 1 <= dripper.accepted <= 3
