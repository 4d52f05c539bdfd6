"""An open gateway (no API keys) answers loopback clients only, unless SCULPTOR_ALLOW_OPEN=true.

A real uvicorn bound to 0.0.0.0, as the containers start it, reached through this machine's own
non-loopback address (a request that really arrives over a network interface) and through loopback.
"""

from __future__ import annotations

import ipaddress

import httpx
import psutil
import pytest
from gateway_helpers import running_gateway, tiny_settings

from sculptor.config import ApiKey
from service.api.exposure import is_local


def outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (the test skips without one)."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            try:
                ip = ipaddress.ip_address(a.address)
            except ValueError:
                continue
            if ip.version == 4 and not ip.is_loopback:
                return a.address
    return None


OUTSIDE = outside_address()
needs_interface = pytest.mark.skipif(OUTSIDE is None, reason="no non-loopback IPv4 interface on this machine")


@pytest.fixture
def gateway(tmp_path, redis_url, tiny_model_dir):
    def start(**overrides):
        settings = tiny_settings(tmp_path / "var", redis_url, tiny_model_dir, **overrides)
        return running_gateway(settings, host="0.0.0.0")

    return start


def via(base_url: str, address: str) -> str:
    return base_url.replace("127.0.0.1", address)


@needs_interface
def test_open_gateway_refuses_clients_beyond_loopback(gateway):
    with gateway() as (url, ctx):
        far = httpx.get(via(url, OUTSIDE) + "/healthz", timeout=10)
        assert far.status_code == 403
        error = far.json()["error"]
        assert error["code"] == "open_gateway_loopback_only"
        assert "SCULPTOR_API_KEYS" in error["message"] and "SCULPTOR_ALLOW_OPEN" in error["message"]
        # What an open gateway's `admin` would have allowed to anyone: switching the served version.
        assert httpx.post(via(url, OUTSIDE) + "/models/v0/activate", timeout=10).status_code == 403
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200  # loopback is served
        # Behind a reverse proxy on the same host, the client is the one the proxy names.
        proxied = httpx.get(url + "/healthz", headers={"X-Forwarded-For": "203.0.113.7"}, timeout=10)
        assert proxied.status_code == 403


@needs_interface
def test_allow_open_serves_everyone(gateway):
    with gateway(allow_open=True) as (url, _):
        assert httpx.get(via(url, OUTSIDE) + "/healthz", timeout=10).status_code == 200


@needs_interface
def test_a_gateway_with_keys_serves_every_address(gateway):
    keys = [ApiKey(name="ops", key="ops-secret", scopes=["admin"])]
    with gateway(api_keys=keys) as (url, _):
        assert httpx.get(via(url, OUTSIDE) + "/healthz", timeout=10).status_code == 200
        assert httpx.get(via(url, OUTSIDE) + "/jobs", timeout=10).status_code == 401
        ok = httpx.get(via(url, OUTSIDE) + "/jobs", headers={"authorization": "Bearer ops-secret"}, timeout=10)
        assert ok.status_code == 200


@pytest.mark.parametrize("server, client, local", [
    (("127.0.0.1", 8000), ("127.0.0.1", 5000), True),
    (("::1", 8000), ("::1", 5000), True),
    (("::ffff:127.0.0.1", 8000), ("::ffff:127.0.0.1", 5000), True),  # a dual-stack socket
    (("10.1.2.3", 8000), ("10.1.2.4", 5000), False),
    (("127.0.0.1", 8000), ("10.1.2.4", 0), False),  # X-Forwarded-For from a local proxy
    (("127.0.0.1", 8000), ("unknown", 0), False),  # a proxy header that is not an address
    (("127.0.0.1", 8000), None, False),
    (("/run/sculptor.sock", None), None, True),  # a unix socket
    (("testserver", 80), ("testclient", 50000), True),  # an in-process transport
    (("testserver", 80), ("198.51.100.1", 0), False),
])
def test_which_requests_count_as_local(server, client, local):
    assert is_local({"type": "http", "server": server, "client": client}) is local
