"""Connections both sides open: settings, Redis, the object store, and the record stores."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from sculptor.config import Settings, get_settings
from sculptor.records import JobStore, TaskStore, VersionStore, connect
from sculptor.storage import ObjectStore, open_store


@dataclass
class Context:
    settings: Settings
    redis: redis.Redis
    store: ObjectStore
    tasks: TaskStore = field(init=False)
    jobs: JobStore = field(init=False)
    versions: VersionStore = field(init=False)

    def __post_init__(self):
        self.tasks = TaskStore(self.redis)
        self.jobs = JobStore(self.redis, self.settings.max_job_events)
        self.versions = VersionStore(self.redis)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "Context":
        settings = settings or get_settings()
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set: start Sculptor with `make run`, or point REDIS_URL at a Redis")
        return cls(settings, connect(settings.redis_url), open_store(settings))
