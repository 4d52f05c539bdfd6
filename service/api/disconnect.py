"""A generation whose client went away stops, as in vLLM's own server (`with_cancellation` there).

A streamed answer notices by itself: sse-starlette cancels the stream when the client disconnects. A JSON
answer is computed before anything is sent, so its handler runs as a task raced against the client's
disconnect message, and is cancelled on a disconnect. Either way the cancellation reaches the engine's
generator, which ends the engine request: vLLM's AsyncLLM aborts it, the transformers engine stops at its
next token (service/engines/).

Written here rather than imported from vLLM because the gateway also runs without vLLM installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

from fastapi import Request, Response

CLIENT_CLOSED = 499  # nginx's status for "the client closed the request": what the access log and metrics show


def cancel_on_disconnect(handler):
    """Decorate a route handler that takes `request: Request` (by keyword, as FastAPI calls it)."""

    @functools.wraps(handler)
    async def run(*args, **kwargs):
        work = asyncio.ensure_future(handler(*args, **kwargs))
        gone = asyncio.ensure_future(_disconnected(kwargs["request"]))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work  # the engine request has ended once this returns
        return work.result() if not work.cancelled() else Response(status_code=CLIENT_CLOSED)

    return run


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read already: nothing else arrives before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
