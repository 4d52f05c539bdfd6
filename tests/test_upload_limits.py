"""SCULPTOR_MAX_UPLOAD_BYTES holds for bodies without Content-Length (chunked), counted while they stream.

Through a live gateway (uvicorn, tiny model, real Redis). The decisive test sends a chunked multipart
upload past the limit and then stops sending without finishing it: a gateway that counts while the body
streams answers 413 at once; one that reads the whole body first is still waiting.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest
from gateway_helpers import running_gateway, tiny_settings

LIMIT = 64_000
BOUNDARY = "sculptorboundary"
LINE = json.dumps({"prompt": "say something long " * 4, "completion": "ok"}) + "\n"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path_factory.mktemp("limits"), redis_url, tiny_model_dir, max_upload_bytes=LIMIT,
                             rate_limit_uploads_per_min=0)
    with running_gateway(settings) as (url, ctx):
        yield url, ctx


def nothing_stored(ctx) -> bool:
    return ctx.store.list("datasets") == [] and ctx.tasks.count() == 0 and ctx.jobs.count() == 0


def multipart_head() -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def unfinished_chunked_upload(url: str, content_type: str, first: bytes, size: int) -> bytes:
    """Send headers and `size` bytes of a chunked body (starting with `first`), never the end; return the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=15) as sock:
        sock.sendall(f"POST /tasks HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        sock.sendall(chunk(first))
        sent = len(first)
        block = LINE.encode() * 40
        while sent < size:
            sock.sendall(chunk(block))
            sent += len(block)
        return read_answer(sock)  # no more body comes: only an early answer arrives


def read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer: its head and a body of its Content-Length (it may come in several segments)."""
    answer = b""
    try:
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < content_length(answer):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except socket.timeout:
        return answer or b"(no answer within 15 s)"
    return answer


def content_length(answer: bytes) -> int:
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_chunked_multipart_stops_at_the_limit(gateway):
    url, ctx = gateway
    answer = unfinished_chunked_upload(url, f"multipart/form-data; boundary={BOUNDARY}", multipart_head(), 3 * LIMIT)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"upload_too_large" in answer and b"SCULPTOR_MAX_UPLOAD_BYTES" in answer
    assert nothing_stored(ctx)


def test_chunked_json_stops_at_the_limit(gateway):
    url, ctx = gateway
    answer = unfinished_chunked_upload(url, "application/json", b'{"name": "x", "examples": [', 3 * LIMIT)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert nothing_stored(ctx)


def body_chunks(total: int):
    yield multipart_head()
    sent = 0
    while sent < total:
        yield LINE.encode() * 10
        sent += len(LINE) * 10
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_a_whole_chunked_upload_over_the_limit_is_refused_under_it_accepted(gateway):
    url, ctx = gateway
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    try:
        r = httpx.post(f"{url}/tasks", content=body_chunks(2 * LIMIT), headers=headers, timeout=30)
        assert r.status_code == 413, r.text
    except httpx.WriteError:  # the gateway answered and closed before the client finished sending
        pass
    assert nothing_stored(ctx)
    r = httpx.post(f"{url}/tasks", content=body_chunks(LIMIT // 4), headers=headers, timeout=30)
    assert r.status_code == 202, r.text
