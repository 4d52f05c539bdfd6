"""GET /registry and GET /registry/{version}: the subspace registry's capacity, per layer and overall.

For each version: the protected fraction (Σk / Σm over the target matrices) per decoder layer and
overall, the tasks that shaped it, the matrices whose capacity is spent, and what remains.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from sculptor.context import Context
from sculptor.subspace_records import SubspaceRecords
from service.api.deps import get_ctx
from service.api.errors import ApiError
from service.api.security import require

router = APIRouter(tags=["registry"], dependencies=[require("tasks")])


def detail(registry: SubspaceRecords, version: str) -> dict | None:
    """The registry's summary of `version` plus its per-matrix record {m, k, importance, spent}."""
    summary = registry.summary(version)
    return summary and {**summary, "matrices": registry.get(version)["matrices"]}


@router.get("/registry")
def registry_overview(ctx: Context = Depends(get_ctx)):
    registry = SubspaceRecords(ctx.redis)
    current = ctx.versions.current()
    versions = [summary for v in registry.list_versions() if (summary := detail(registry, v))]
    return {"current": current, "versions": versions}


@router.get("/registry/{version}")
def registry_version(version: str, ctx: Context = Depends(get_ctx)):
    summary = detail(SubspaceRecords(ctx.redis), version)
    if summary is None:
        raise ApiError(404, "version_not_in_registry",
                       f"the registry has no subspaces for {version!r} (versions get them when a job trains them)")
    return summary
