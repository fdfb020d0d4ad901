"""Dependencies shared by the routers: the service once ready, API keys, path parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Request

from asymret.api.schemas import GALLERY_NAME
from asymret.api.service import Service

KEY_HEADER = "X-API-Key"
# Hidden from the generated spec: which operations need it depends on the server's settings, so the app
# writes the security requirements itself (asymret.api.app.document_keys).
ApiKey = Annotated[str | None, Header(alias=KEY_HEADER, include_in_schema=False)]


def _service(request: Request, key: str | None, *, write: bool) -> Service:
    service: Service = request.app.state.service
    service.keys.authorize(key, write=write)
    return service.check_ready()


def reader(request: Request, key: ApiKey = None) -> Service:
    return _service(request, key, write=False)


def writer(request: Request, key: ApiKey = None) -> Service:
    return _service(request, key, write=True)


Reader = Annotated[Service, Depends(reader)]
Writer = Annotated[Service, Depends(writer)]
GalleryName = Annotated[str, Path(pattern=GALLERY_NAME, description="the gallery's name")]
ItemId = Annotated[int, Path(ge=0, lt=2**63, description="the item's id")]
