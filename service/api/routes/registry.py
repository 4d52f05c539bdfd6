"""GET /registry and GET /registry/{version}: the subspace registry's capacity, per layer and overall.

For each version: the protected fraction (Σk / Σm over the target matrices) per decoder layer and
overall, the tasks that shaped it, the matrices whose capacity is spent, what remains, and the bytes its
bases and task memory take in the object store (`stored_bytes`; the overview sums them).
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
    stored_bytes: int  # all versions' bases and task memory in the object store (of the records that count it)


@router.get("/registry", response_model=RegistryOverview)
def registry_overview(ctx: Context = Depends(get_ctx)) -> RegistryOverview:
    registry = SubspaceRecords(ctx.redis)
    current = ctx.versions.current()
    versions = [summary for v in registry.list_versions() if (summary := registry.detail(v))]
    return RegistryOverview(current=current, versions=versions,
                            stored_bytes=sum(v.stored_bytes or 0 for v in versions))


@router.get("/registry/{version}", response_model=RegistryVersion)
def registry_version(version: str, ctx: Context = Depends(get_ctx)) -> RegistryVersion:
    summary = SubspaceRecords(ctx.redis).detail(version)
    if summary is None:
        raise ApiError(404, "version_not_in_registry",
                       f"the registry has no subspaces for {version!r} (versions get them when a job trains them)")
    return summary
