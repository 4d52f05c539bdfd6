"""GET /registry and GET /registry/{version}: the subspace registry's capacity, per layer and overall.

For each version: the protected fraction (Σk / Σm over the target matrices) per decoder layer and
overall, the tasks that shaped it, the matrices whose capacity is spent, and what remains.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from sculptor.context import Context
from sculptor.subspace_records import RegistryVersion, SubspaceRecords
from service.api.deps import get_ctx
from service.api.errors import ApiError
from service.api.security import require

router = APIRouter(tags=["registry"], dependencies=[require("tasks")])


class RegistryOverview(BaseModel):
    current: str | None
    versions: list[RegistryVersion]  # oldest first


@router.get("/registry", response_model=RegistryOverview)
def registry_overview(ctx: Context = Depends(get_ctx)) -> RegistryOverview:
    registry = SubspaceRecords(ctx.redis)
    current = ctx.versions.current()
    versions = [summary for v in registry.list_versions() if (summary := registry.detail(v))]
    return RegistryOverview(current=current, versions=versions)


@router.get("/registry/{version}", response_model=RegistryVersion)
def registry_version(version: str, ctx: Context = Depends(get_ctx)) -> RegistryVersion:
    summary = SubspaceRecords(ctx.redis).detail(version)
    if summary is None:
        raise ApiError(404, "version_not_in_registry",
                       f"the registry has no subspaces for {version!r} (versions get them when a job trains them)")
    return summary
