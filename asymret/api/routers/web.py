"""The web page: pick a gallery, drop an image, see the ranked thumbnails (``static/``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)
PAGE = Path(__file__).resolve().parents[1] / "static" / "index.html"


@router.get("/")
def page():
    return FileResponse(PAGE, media_type="text/html")
