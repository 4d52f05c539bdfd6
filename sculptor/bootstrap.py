"""The first version: register the base model as `v0` when the lineage is empty."""

from __future__ import annotations

from pathlib import Path

import redis

from sculptor import lineage
from sculptor.config import Settings
from sculptor.records import VersionStore
from sculptor.storage import ObjectStore


def base_model_dir(settings: Settings) -> Path:
    if settings.base_model_dir:
        path = Path(settings.base_model_dir)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"SCULPTOR_BASE_MODEL_DIR={path} is not a Hugging Face model directory")
        return path
    from sculptor.default_model import ensure_base_model

    return ensure_base_model(settings.data_dir / "base-models")


def ensure_initial_version(settings: Settings, client: redis.Redis, store: ObjectStore) -> str:
    """The serving version; on a fresh install, publish the base model as v0 and serve it."""
    return lineage.register_base(VersionStore(client), store, lambda: base_model_dir(settings))
