"""``/v1/galleries``: create, list, get (size, index type, gallery network), delete."""

from __future__ import annotations

from fastapi import APIRouter

from asymret.api.routers.deps import GalleryName, Reader, Writer
from asymret.api.schemas import Deleted, GalleryCreate, GalleryInfo, GalleryList

router = APIRouter(prefix="/v1/galleries", tags=["galleries"])


def gallery_info(service, gallery) -> dict:
    info = gallery.info()
    keys = ("index_bytes", "journal_bytes", "last_seq", "processing", "backend")  # those the backend reports
    index = {**info["index"], **{key: info[key] for key in keys if key in info}}
    return {**info, "index": index, "compatible": service.registry.compatible(gallery)}


@router.post("", status_code=201, response_model=GalleryInfo, summary="Create a gallery for this pair's gallery network")
def create_gallery(body: GalleryCreate, service: Writer):
    return gallery_info(service, service.registry.create(body.name, body.factory))


@router.get("", response_model=GalleryList, summary="List the galleries")
def list_galleries(service: Reader):
    return {"galleries": service.store.list()}


@router.get("/{name}", response_model=GalleryInfo, summary="A gallery's size, index type and gallery network")
def get_gallery(name: GalleryName, service: Reader):
    return gallery_info(service, service.registry.get(name))


@router.delete("/{name}", response_model=Deleted, summary="Delete a gallery, its vectors, items and uploads")
def delete_gallery(name: GalleryName, service: Writer):
    service.registry.delete(name)
    return {"deleted": name}
