"""``/dashboard``: the web page (plain HTML, JavaScript and CSS from the package).

The page itself is open; everything it shows comes from ``/v1`` with the API
key the user types in, sent as a header. Only the files shipped in
``clustering_service/dashboard`` are served, by name.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from clustering_service.errors import NotFound

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "dashboard"
_TYPES = {".js": "text/javascript", ".css": "text/css"}
_FILES = {p.name: p for p in DASHBOARD_DIR.iterdir() if p.suffix in _TYPES}
# Item ids and names are arbitrary text: the page never inserts them as markup, and
# this policy refuses any script that is not one of these files.
_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/dashboard")
def page() -> FileResponse:
    return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html", headers=_HEADERS)


@router.get("/dashboard/static/{name}")
def static(name: str) -> FileResponse:
    path = _FILES.get(name)
    if path is None:
        raise NotFound(f"the dashboard has no file {name!r}", resource="file")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)
