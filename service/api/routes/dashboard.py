"""GET /accuracy (the accuracy matrix of the serving lineage) and GET /dashboard (a static page).

The dashboard is plain HTML, JS and CSS under service/static/, served as files: no build step,
no CDN. Its script reads only the public API (/models, /jobs, /tasks, /accuracy, /registry, /readyz);
the page itself holds no data, so it is served without a key, and the script sends the key the
user types in (kept in the browser's localStorage) when the gateway asks for one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from sculptor.accuracy import accuracy_matrix
from sculptor.context import Context
from sculptor.gate_report import LineageAccuracy
from service.api.deps import get_ctx
from service.api.errors import ApiError
from service.api.security import require

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
STATIC_FILES = {"dashboard.html": "text/html", "dashboard.js": "text/javascript", "dashboard.css": "text/css"}

router = APIRouter(tags=["dashboard"])


class Accuracy(LineageAccuracy):
    version: str  # the lineage's last version


@router.get("/accuracy", dependencies=[require("tasks")], response_model=Accuracy)
def accuracy(version: str | None = None, ctx: Context = Depends(get_ctx)):
    """R[version][task] over the lineage of `version` (default: the current version), with AA and BWT."""
    version = version or ctx.versions.current()
    if version is None or ctx.versions.get(version) is None:
        raise ApiError(404, "model_not_found", f"no promoted version {version!r}; see GET /models")
    matrix = accuracy_matrix(ctx, version)
    return {"version": version, **matrix}


@router.get("/dashboard", include_in_schema=False, response_class=HTMLResponse)
async def dashboard():
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")


@router.get("/", include_in_schema=False)
async def root():
    return RedirectResponse("/dashboard")


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str):
    if name not in STATIC_FILES:  # a fixed list: no path from the request ever reaches the filesystem
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})
