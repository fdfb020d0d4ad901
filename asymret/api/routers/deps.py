"""Dependencies shared by the routers: the service once ready, API keys, path parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import APIKeyHeader

from asymret.api.schemas import GALLERY_NAME
from asymret.api.service import Service

api_key = APIKeyHeader(name="X-API-Key", auto_error=False,
                       description="needed for writes when the server has keys; for reads too with keys_for_reads")


def _service(request: Request, key: str | None, *, write: bool) -> Service:
    service: Service = request.app.state.service
    service.authorize(key, write=write)
    return service.check_ready()


def reader(request: Request, key: Annotated[str | None, Security(api_key)]) -> Service:
    return _service(request, key, write=False)


def writer(request: Request, key: Annotated[str | None, Security(api_key)]) -> Service:
    return _service(request, key, write=True)


Reader = Annotated[Service, Depends(reader)]
Writer = Annotated[Service, Depends(writer)]
GalleryName = Annotated[str, Path(pattern=GALLERY_NAME, description="the gallery's name")]
ItemId = Annotated[int, Path(ge=0, lt=2**63, description="the item's id")]
