"""The FastAPI app: REST API under ``/v1``, the web page at ``/``, health and metrics beside them.

Thin over :class:`~asymret.api.service.Service`. Every error leaves as
``{"error": {"code", "message"}}``: a user's mistake (:class:`~asymret.errors.AsymretError`, request
validation, unknown route, oversized body) with its 4xx status, a bug as a 500 that names no internals.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from asymret import __version__
from asymret.api.routers import galleries, items, ops, search, snapshots, web
from asymret.api.schemas import ErrorBody
from asymret.api.service import ServeConfig, Service
from asymret.errors import AsymretError

log = logging.getLogger("asymret.serve")
STATIC = Path(__file__).parent / "static"
ERRORS = {status: {"model": ErrorBody, "description": HTTPStatus(status).phrase}
          for status in (400, 403, 404, 409, 413, 422, 503)}


def create_app(config: ServeConfig | Service) -> FastAPI:
    """The app serving ``config`` (or an existing service); the service loads when the app starts."""
    service = config if isinstance(config, Service) else Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        service.close()

    app = FastAPI(title="asymret", version=__version__, lifespan=lifespan, responses=ERRORS,
                  description="Asymmetric image retrieval: the small query network encodes your image, "
                              "the gallery the large gallery network encoded offline answers.")
    app.state.service = service
    for router in (galleries.router, items.router, search.router, snapshots.router, ops.router, web.router):
        app.include_router(router)  # each carries its full prefix: route templates name the metrics
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(AsymretError, _asymret_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimit, max_bytes=int(service.config.max_request_mb * 2**20))
    app.add_middleware(Instrument, metrics=service.metrics)
    return app


# ----------------------------------------------------------------------------------------- errors
def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _asymret_error(request: Request, exc: AsymretError) -> JSONResponse:
    return error(exc.http_status, exc.code, str(exc))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return error(422, "invalid_request", f"{problems[0] if problems else 'invalid request'}{more}; "
                                         "see the schema at /docs")


def http_code(status: int) -> str:
    """``not_found``, ``method_not_allowed``, ...: the status phrase as a code (413 by its current name)."""
    phrase = "Content Too Large" if status == 413 else HTTPStatus(status).phrase
    return phrase.lower().replace(" ", "_").replace("-", "_")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, http_code(exc.status_code), str(exc.detail))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error(500, "internal_error", "an internal error occurred; it is logged on the server")


# ------------------------------------------------------------------------------------- middleware
class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413) while they stream in, before any parsing."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is over the {self.max_bytes}-byte limit; send fewer "
                                  "or smaller images")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error(413, http_code(413), self.too_large().detail)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self.too_large()
            return message

        await self.app(scope, limited, send)


class Instrument:
    """Request counts and latency per route template (bounded label values: never the raw path)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], route, status, time.perf_counter() - start)
