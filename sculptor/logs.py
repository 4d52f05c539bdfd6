"""Logging for every process: plain text by default, JSON lines with `SCULPTOR_LOG_JSON=true`.

`job_id` and `version` ride along on every record that sets them (`extra={...}` or `bind_job`).
"""

from __future__ import annotations

import contextvars
import logging

from pythonjsonlogger.json import JsonFormatter

from sculptor.config import Settings

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
current_version: contextvars.ContextVar[str | None] = contextvars.ContextVar("version", default=None)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (("job_id", current_job), ("version", current_version)):
            if getattr(record, name, None) is None and var.get() is not None:
                setattr(record, name, var.get())
        return True


def setup(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_json:
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(job_id)s %(version)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
