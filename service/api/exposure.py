"""An open gateway (no API keys) answers loopback clients only, unless SCULPTOR_ALLOW_OPEN=true.

Without keys every caller holds every scope, `admin` included, so an open gateway must not be reachable
from the network by accident: the Dockerfile, compose and the k8s manifests all start uvicorn on 0.0.0.0.

Why at request time: the app cannot know where uvicorn listens (`--host` on its command line overrides
SCULPTOR_HOST, and a socket may be handed over by a process manager), but every request says which
socket it arrived on (`server`) and from whom (`client`). So each request is checked, and one that came
over the network is refused with 403 naming the two settings that fix it. At start-up the app can only
warn, from SCULPTOR_HOST (service/app.py).

The rule, per request:
- it arrived on a TCP socket (`server` is an IP address): both that address and the client's must be
  loopback. A client behind a reverse proxy on the same host counts as remote when uvicorn takes its
  address from X-Forwarded-For (uvicorn trusts that header from 127.0.0.1 by default); a client address
  that is not an IP at all on a TCP socket is refused too;
- it did not (a unix socket, or an in-process transport such as Starlette's TestClient): it cannot have
  come over the network, so it is let through unless a proxy header named a remote client.
"""

from __future__ import annotations

import ipaddress
import json
import logging

from service.api.errors import error_body

log = logging.getLogger("sculptor.gateway")

MESSAGE = ("this gateway has no API keys, so it answers only loopback clients (127.0.0.1, ::1): set "
           "SCULPTOR_API_KEYS to serve other addresses (see README.md, Access), or SCULPTOR_ALLOW_OPEN=true "
           "to serve everyone without keys on purpose")


def _ip(endpoint) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of an ASGI (host, port) pair, or None when it is not an IP (a unix socket, a test host)."""
    if not endpoint:
        return None
    try:
        address = ipaddress.ip_address(str(endpoint[0]).strip("[]").split("%")[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return mapped or address


def is_loopback_host(host: str) -> bool:
    address = _ip((host, 0))
    return host.lower() == "localhost" or (address is not None and address.is_loopback)


def is_local(scope: dict) -> bool:
    server, client = _ip(scope.get("server")), _ip(scope.get("client"))
    if server is None:
        return client is None or client.is_loopback
    return server.is_loopback and client is not None and client.is_loopback


class LoopbackOnly:
    """ASGI middleware (pure ASGI, so streaming answers pass through untouched): refuse non-local requests."""

    def __init__(self, app):
        self.app = app
        self.warned = False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or is_local(scope):
            return await self.app(scope, receive, send)
        if not self.warned:  # once: a scanner must not flood the log
            self.warned = True
            log.warning("refused a request from %s: %s", (scope.get("client") or ("?",))[0], MESSAGE)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps(error_body(403, "open_gateway_loopback_only", MESSAGE)).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
