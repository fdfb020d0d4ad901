"""``/v1/galleries/{name}/snapshot`` and ``/v1/snapshots``: write a gallery to a snapshot on the server
(``<galleries>/_snapshots/<id>``, see :mod:`asymret.index.snapshot`), list them, restore one. Writes
need an API key like every other write; a restore refuses a snapshot of another gallery network than
the one this server's pair encodes with."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import Field

from asymret.api.routers.deps import GalleryName, Reader, Writer
from asymret.api.schemas import GALLERY_NAME, In, Out
from asymret.files import read_json
from asymret.index.snapshot import MANIFEST

router = APIRouter(tags=["snapshots"])
SnapshotId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}-\d{8}T\d{12}Z$",
                                 description="a snapshot's id, as POST .../snapshot returned it")]


class SnapshotOut(Out):
    snapshot: str = Field(description="the snapshot's id: restore it with POST /v1/snapshots/{id}/restore")
    gallery: str
    count: int = Field(description="items in the snapshot")
    network_hash: str | None = Field(description="SHA-256 of the gallery network's spec")
    format_version: int


class SnapshotList(Out):
    snapshots: list[SnapshotOut]


class RestoreIn(In):
    name: str | None = Field(None, pattern=GALLERY_NAME, description="restore under this name (default: "
                             "the snapshot's gallery)")
    replace: bool = Field(False, description="replace an existing gallery of that name (same gallery network)")


class Restored(Out):
    gallery: str
    count: int


def snapshot_out(snapshot: str, manifest: dict) -> dict:
    return {"snapshot": snapshot, "gallery": manifest["gallery"]["name"], "count": manifest["count"],
            "network_hash": manifest["gallery"]["network_hash"], "format_version": manifest["format_version"]}


@router.post("/v1/galleries/{name}/snapshot", status_code=201, response_model=SnapshotOut,
             summary="Write a gallery to a new snapshot on the server")
def create_snapshot(name: GalleryName, service: Writer):
    return snapshot_out(*service.registry.snapshot(name))


@router.get("/v1/snapshots", response_model=SnapshotList, summary="The snapshots on the server")
def list_snapshots(service: Reader):
    folders = sorted(service.registry.snapshots.glob("*/" + MANIFEST)) if service.registry.snapshots.is_dir() else []
    return {"snapshots": [snapshot_out(m.parent.name, read_json(m, "snapshot manifest")) for m in folders]}


@router.post("/v1/snapshots/{snapshot}/restore", status_code=201, response_model=Restored,
             summary="Restore a snapshot as a gallery (hashes verified; same gallery network only)")
def restore(snapshot: SnapshotId, service: Writer, body: RestoreIn | None = None):
    body = body or RestoreIn()
    name, count = service.registry.restore(snapshot, body.name, body.replace)
    return {"gallery": name, "count": count}
