"""``/v1/galleries/{name}/items``: add images (upload or server path), encoded by the GALLERY network;
get, delete, thumbnail."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from asymret.api.routers.deps import GalleryName, ItemId, Reader, Writer
from asymret.api.schemas import AddPaths, Deleted, ItemOut, ItemsAdded
from asymret.errors import InputError

router = APIRouter(prefix="/v1/galleries/{name}/items", tags=["items"])
PerImage = Annotated[list[str] | None, Form(description="one per image, in upload order (or none)")]


def thumbnail_url(gallery: str, item_id: int) -> str:
    return f"/v1/galleries/{gallery}/items/{item_id}/thumbnail"


def item_out(gallery: str, item) -> dict:
    return {**item.to_dict(), "thumbnail_url": thumbnail_url(gallery, item.id)}


def per_image(values: list[str] | None, n: int, what: str) -> list:
    """Form values given once per image; none at all means none for every image."""
    if not values:
        return [None] * n
    if len(values) != n:
        raise InputError(f"got {n} images but {len(values)} '{what}' values; give one per image or none")
    return values


def parse_attributes(text: str | None) -> dict:
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InputError(f"'attributes' must be a JSON object such as {{\"color\": \"red\"}}, got {text[:50]!r}")
    return value


def read_uploads(service, files: list[UploadFile]) -> tuple[list[bytes], list]:
    """The uploaded bytes and their decoded images, each checked before it is decoded in full."""
    data = [f.file.read(service.limits.max_bytes + 1) for f in files]
    images = [service.uploads.decode(d, f"image {i + 1} ({f.filename or 'unnamed'})") for i, (d, f) in enumerate(zip(data, files))]
    return data, images


def add_encoded(service, name: str, gallery, images, rows: list[dict]) -> dict:
    ids = gallery.add(service.gallery_vectors(images), rows)
    return {"gallery": name, "items": [item_out(name, item) for item in gallery.get(ids)]}


@router.post("", status_code=201, response_model=ItemsAdded, summary="Add uploaded images")
def add_images(name: GalleryName, service: Writer,
               image: Annotated[list[UploadFile], File(description="one or more image files")],
               label: PerImage = None, camera: PerImage = None,
               attributes: Annotated[list[str] | None, Form(description="a JSON object per image (or none)")] = None):
    """The gallery network encodes each image; the upload is kept to serve its thumbnail."""
    gallery = service.registry.get(name)
    service.registry.require_compatible(gallery)
    data, images = read_uploads(service, image)
    n = len(images)
    labels, cameras = per_image(label, n, "label"), per_image(camera, n, "camera")
    attrs = [parse_attributes(a) for a in per_image(attributes, n, "attributes")]
    if not gallery.readonly:
        service.uploads.sweep(name, gallery)
    paths = [service.uploads.save(name, d) for d in data]
    try:
        return add_encoded(service, name, gallery, images, [
            {"path": str(p), "label": lb, "camera": c, "attributes": a, "sha256": hashlib.sha256(d).hexdigest()}
            for p, lb, c, a, d in zip(paths, labels, cameras, attrs, data)])
    except BaseException:
        for path in paths:
            service.uploads.forget(name, str(path))
        raise


@router.post("/paths", status_code=201, response_model=ItemsAdded, summary="Add images from server paths")
def add_paths(name: GalleryName, body: AddPaths, service: Writer):
    """Each path must lie under one of the server's allowed roots (``..`` and symlinks out are refused)."""
    gallery = service.registry.get(name)
    service.registry.require_compatible(gallery)
    loaded = [service.uploads.image_from_path(item.path) for item in body.items]
    return add_encoded(service, name, gallery, [image for image, _ in loaded], [
        {"path": str(real), "label": item.label, "camera": item.camera, "attributes": item.attributes}
        for item, (_, real) in zip(body.items, loaded)])


@router.get("/{item_id}", response_model=ItemOut, summary="An item's metadata")
def get_item(name: GalleryName, item_id: ItemId, service: Reader):
    return item_out(name, service.registry.get(name).get([item_id])[0])


@router.delete("/{item_id}", response_model=Deleted, summary="Delete an item")
def delete_item(name: GalleryName, item_id: ItemId, service: Writer):
    gallery = service.registry.get(name)
    item = gallery.get([item_id])[0]
    gallery.remove([item_id])
    service.uploads.forget(name, item.path)
    return {"deleted": str(item_id)}


@router.get("/{item_id}/thumbnail", response_class=Response, summary="A JPEG thumbnail of an item's image",
            responses={200: {"content": {"image/jpeg": {}}}})
def thumbnail(name: GalleryName, item_id: ItemId, service: Reader):
    jpeg = service.uploads.thumbnail_of(service.registry.get(name).get([item_id])[0].path)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
