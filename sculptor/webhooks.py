"""Webhooks: when a job ends, POST its record to the task's `webhook_url`.

The body is the job JSON (what `GET /jobs/{id}` answers), with headers naming the event
(`X-Sculptor-Event: job.promoted`, ...) and the job. A failed delivery (connection error,
timeout, 408, 429 or 5xx) is retried with exponential backoff, a bounded number of times;
other 4xx answers are final. Delivery never raises into the caller: a receiver that is down
must not fail the job that already finished.

Safety, because the worker that delivers sits inside the deployment:
- Targets. A URL's host must resolve to public addresses only (no loopback, private, link-local,
  multicast or reserved ones such as 169.254.169.254), checked at upload and again at every attempt;
  SCULPTOR_WEBHOOK_ALLOW_HOSTS names hosts exempt from this. The connection goes to the address that
  was checked (the URL is rewritten to it), while the Host header and TLS SNI, and so the certificate
  check, keep the name: no DNS answer can change between the check and the connection. No redirects.
- Signatures. Each task has its own secret, returned once by POST /tasks. Every attempt carries
  `Sculptor-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>." + body>` and
  `Sculptor-Delivery: <uuid>` (the same for all attempts of one delivery, so receivers can drop repeats),
  as Stripe and GitHub do. `verify` below is the receiver's side; README.md shows it without Sculptor.
- Time. Each attempt has a total deadline (connect, send, and the whole answer; httpx's own timeouts
  bound each read, not their sum), and so do all attempts together, backoff included.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Callable

import httpx

from sculptor.records import JobRecord, TaskRecord

log = logging.getLogger("sculptor.webhooks")

RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
SIGNATURE_HEADER = "Sculptor-Signature"
DELIVERY_HEADER = "Sculptor-Delivery"
SIGNATURE_TOLERANCE_S = 300
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known NAT64 prefix: the last 32 bits are an IPv4 address

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookTargetError(ValueError):
    """A webhook URL that must not be called; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    url: httpx.URL  # as the task gave it
    address: str  # the checked IP address to connect to


# ---------------------------------------------------------------------------------------------- targets


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def check_target(url: str, allow_hosts: Collection[str] = ()) -> Target:
    """Resolve the URL's host and refuse it unless every address is public or the host is allowed."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as err:
        raise WebhookTargetError(f"webhook_url is not a valid URL ({err})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise WebhookTargetError("webhook_url must be an http:// or https:// URL with a host")
    addresses = _resolve(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80))
    if parsed.host not in {h.strip("[]").lower() for h in allow_hosts}:
        for address in addresses:
            reason = _not_public(address)
            if reason:
                raise WebhookTargetError(
                    f"webhook_url's host {parsed.host!r} resolves to {address}, a {reason} address: webhooks "
                    "go to public addresses only (an operator can allow a host with SCULPTOR_WEBHOOK_ALLOW_HOSTS)")
    return Target(parsed, str(addresses[0]))


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise WebhookTargetError(f"webhook_url's host {host!r} does not resolve ({err})") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    return list(dict.fromkeys(addresses))


def _not_public(address: IPAddress) -> str | None:
    """Why `address` is not a public unicast address (None when it is)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return _not_public(embedded)
    for reason in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(address, f"is_{reason}"):
            return reason.replace("_", "-")
    return None if address.is_global else "non-public"


# ---------------------------------------------------------------------------------------------- signatures


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `Sculptor-Signature` header value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, tolerance_s: int = SIGNATURE_TOLERANCE_S,
           now: float | None = None) -> bool:
    """The receiver's check: a v1 signature of `body` by `secret`, made within `tolerance_s` of now."""
    try:
        fields = [part.split("=", 1) for part in header.split(",")]
        timestamp = int(next(v for k, v in fields if k.strip() == "t"))
    except (ValueError, StopIteration):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return any(k.strip() == "v1" and hmac.compare_digest(v.strip(), expected) for k, v in fields)


# ---------------------------------------------------------------------------------------------- delivery


def announce(task: TaskRecord | None, job: JobRecord) -> None:
    """`notify_terminal` in a background thread: a slow receiver must not hold up its caller."""
    if task and task.webhook_url:
        threading.Thread(target=notify_terminal, args=(task, job), daemon=True, name=f"webhook-{job.job_id}").start()


def notify_terminal(task: TaskRecord, job: JobRecord, *, attempts: int = 4, first_delay_s: float = 1.0,
                    timeout_s: float = 10.0, deadline_s: float = 60.0, allow_hosts: Collection[str] | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> bool:
    """POST `job` to `task.webhook_url`; True when a receiver answered 2xx. Never raises.

    Waits first_delay_s, 2x, 4x, ... between attempts (1 + 2 + 4 = 7 s in all by default). Each attempt
    ends after timeout_s whatever the receiver does, and no attempt starts or runs past deadline_s.
    allow_hosts: SCULPTOR_WEBHOOK_ALLOW_HOSTS when None.
    """
    if not task.webhook_url:
        return False
    if task.webhook_secret is None:
        log.warning("webhook for job %s not sent: task %s has no signing secret", job.job_id, task.task_id)
        return False
    if allow_hosts is None:
        from sculptor.config import get_settings

        allow_hosts = get_settings().webhook_allow_hosts
    delivery = Delivery(task.webhook_url, task.webhook_secret.get_secret_value(), job, allow_hosts)
    try:
        return delivery.run(attempts, first_delay_s, timeout_s, deadline_s, sleep)
    except Exception:  # a bug here must not fail the job either
        log.exception("webhook for job %s failed unexpectedly", job.job_id)
        return False


class Delivery:
    """One job's notification: the same body and delivery id on every attempt."""

    def __init__(self, url: str, secret: str, job: JobRecord, allow_hosts: Collection[str]):
        self.url, self.secret, self.job, self.allow_hosts = url, secret, job, allow_hosts
        self.body = json.dumps(job.model_dump(mode="json"), separators=(",", ":")).encode()
        self.id = str(uuid.uuid4())

    def run(self, attempts: int, first_delay_s: float, timeout_s: float, deadline_s: float,
            sleep: Callable[[float], None]) -> bool:
        give_up_at = time.monotonic() + deadline_s
        attempt = 0
        while attempt < attempts:
            attempt += 1
            budget = min(timeout_s, give_up_at - time.monotonic())
            if budget <= 0:
                break
            outcome = self._attempt(budget)
            if outcome is True:
                log.info("webhook for job %s delivered to %s (attempt %d)", self.job.job_id, self.url, attempt)
                return True
            delay = first_delay_s * 2 ** (attempt - 1)
            if outcome == "final" or attempt == attempts or time.monotonic() + delay >= give_up_at:
                break
            sleep(delay)
        log.warning("webhook for job %s to %s not delivered after %d attempt(s)", self.job.job_id, self.url, attempt)
        return False

    def _attempt(self, budget_s: float) -> bool | str:
        """True on 2xx, "final" on an answer or target not worth retrying, False on a retryable failure."""
        # Not asyncio.run: it waits for the executor thread of a DNS lookup that the deadline abandoned;
        # closing the loop does not.
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(asyncio.wait_for(self._post(budget_s), budget_s))
        except WebhookTargetError as err:
            log.warning("webhook for job %s refused: %s", self.job.job_id, err)
            return "final"
        except (httpx.HTTPError, asyncio.TimeoutError) as err:
            log.info("webhook POST to %s failed: %s", self.url, str(err) or type(err).__name__)
            return False
        finally:
            loop.close()

    async def _post(self, budget_s: float) -> bool | str:
        # Resolved and checked on every attempt, inside its deadline; the connection uses what was checked.
        target = await asyncio.to_thread(check_target, self.url, self.allow_hosts)
        async with httpx.AsyncClient(timeout=budget_s, follow_redirects=False) as client:
            response = await client.send(self._request(client, target))
        if response.is_success:
            return True
        log.info("webhook POST to %s answered %d", self.url, response.status_code)
        return False if response.status_code in RETRYABLE_STATUS else "final"

    def _request(self, client: httpx.AsyncClient, target: Target) -> httpx.Request:
        """A POST to the checked address that names the host as the URL did (Host header, TLS SNI)."""
        headers = {"Host": target.url.netloc.decode("ascii"), "Content-Type": "application/json",
                   "User-Agent": "sculptor-webhook/1", "X-Sculptor-Event": f"job.{self.job.status}",
                   "X-Sculptor-Job": self.job.job_id, DELIVERY_HEADER: self.id,
                   SIGNATURE_HEADER: sign(self.secret, int(time.time()), self.body)}
        # httpx's documented `sni_hostname` extension: TLS to the address, handshake and certificate for the name.
        extensions = {"sni_hostname": target.url.host} if target.url.scheme == "https" else {}
        return client.build_request("POST", target.url.copy_with(host=target.address), content=self.body,
                                    headers=headers, extensions=extensions)
