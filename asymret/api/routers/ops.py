"""Operations: ``/healthz`` (the process answers), ``/readyz`` (pair and galleries loaded, the database
answering a probe within ``ready_timeout_s``),
``/metrics`` (Prometheus), ``/v1/info`` (the networks, their costs per image, and the limits this
server runs with)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from asymret.api.routers.deps import Reader
from asymret.api.schemas import Health, Info, Ready

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz():  # on the event loop: liveness needs no thread, and bench_serve.py's HTTP floor is this
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready,
            summary="Readiness: 503 until the pair and galleries are loaded, and while the database fails",
            responses={503: {"model": Ready, "description": "still loading, loading failed, or the database "
                                                            "does not answer (the reason is in 'error')"}})
def readyz(request: Request):
    service = request.app.state.service
    loaded = service.ready.is_set()
    error = service.database_problem() if loaded else service.error  # None while still loading
    body = {"ready": loaded and error is None, "galleries": len(service.registry or ()), "error": error}
    return body if body["ready"] else JSONResponse(body, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request):
    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", response_model=Info, tags=["info"], summary="The networks this server runs, their costs, and its limits")
def info(service: Reader):
    config, pair = service.config, service.pair
    default = service.default_query_net
    query_nets = [{"name": net.name, "description": net.description, "default": net is default,
                   "spec": net.pair.query_net.spec.model_dump(mode="json"), "cost": net.cost, "pair": net.pair.meta}
                  for net in service.query_nets.values()]
    return {"query_net": pair.query_net.spec.model_dump(mode="json"), "query_net_name": service.query_net_name,
            "query_nets": query_nets, "gallery_net": pair.gallery_net.spec.model_dump(mode="json"),
            "gallery_net_cost": service.gallery_cost, "dim": service.dim,
            "whitening": pair.whitening.kind if pair.whitening is not None else None, "pair": pair.meta,
            "limits": {"max_request_mb": config.max_request_mb, "max_image_mb": config.max_image_mb,
                       "max_image_pixels": config.max_image_pixels, "image_formats": list(service.limits.formats),
                       "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms},
            "keys_for_reads": config.keys_for_reads}
