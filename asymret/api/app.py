"""The FastAPI app: REST API under ``/v1``, the web page at ``/``, health and metrics beside them.

Thin over :class:`~asymret.api.service.Service`. Every error leaves as
``{"error": {"code", "message"}}``: a user's mistake (:class:`~asymret.errors.AsymretError`, request
validation, unknown route, oversized body) with its 4xx status, a bug as a 500 that names no internals
and keeps the keep-alive connection (:class:`CatchAll`). The spec says what the server enforces: the
API key on writes (and reads with ``keys_for_reads``) only when it has keys (:func:`document_keys`).
``/docs`` and ``/redoc`` load their scripts from this server, not a CDN (fastapi-offline's assets).
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
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import Match

from asymret import __version__
from asymret.api.routers import galleries, items, ops, search, snapshots, web
from asymret.api.routers.deps import KEY_HEADER, reader, writer
from asymret.api.schemas import ErrorBody
from asymret.api.service import Service
from asymret.api.settings import ServeConfig
from asymret.errors import AsymretError, UnauthorizedError

log = logging.getLogger("asymret.serve")
STATIC = Path(__file__).parent / "static"
ERRORS = {status: {"model": ErrorBody, "description": HTTPStatus(status).phrase}
          for status in (400, 403, 404, 409, 413, 422, 503)}
KEY_SCHEME = "APIKeyHeader"
CHALLENGE = {"WWW-Authenticate": f'APIKey header="{KEY_HEADER}"'}  # what a 401 asks for (RFC 9110 11.6.1)


def create_app(config: ServeConfig | Service) -> FastAPI:
    """The app serving ``config`` (or an existing service); the service loads when the app starts."""
    service = config if isinstance(config, Service) else Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        service.close()

    app = FastAPIOffline(title="asymret", version=__version__, lifespan=lifespan, responses=ERRORS,
                         description="Asymmetric image retrieval: the small query network encodes your image, "
                                     "the gallery the large gallery network encoded offline answers.")
    app.state.service = service
    routers = (galleries.router, items.router, search.router, snapshots.router, ops.router, web.router)
    for router in routers:
        app.include_router(router)  # each carries its full prefix: route templates name the metrics
    # our endpoints as declared (FastAPI >= 0.120 nests included routers in app.routes: read them here)
    app.state.api_routes = [route for router in routers for route in router.routes
                            if isinstance(route, APIRoute)]
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(AsymretError, _asymret_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=int(service.config.max_request_mb * 2**20))
    app.add_middleware(Instrument, metrics=service.metrics)
    app.add_middleware(CatchAll)  # outermost of ours: it also catches what the two above raise
    document_keys(app, service.config)
    return app


def document_keys(app: FastAPI, config: ServeConfig) -> None:
    """Make the spec state the keys the server asks for (:meth:`Service.authorize`): on writes when it has
    keys, on reads too with ``keys_for_reads``, nowhere without keys; 401 documented where a key is asked."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generate()
        needs_key = {writer, reader} if config.keys_for_reads else {writer}
        keyed = [route for route in app.state.api_routes
                 if config.api_keys and needs_key & _calls(route.dependant) and route.include_in_schema]
        for route in keyed:
            for method in route.methods:
                operation = spec["paths"][route.path_format][method.lower()]
                operation["security"] = [{KEY_SCHEME: []}]
                operation["responses"]["401"] = {
                    "description": "no API key: send one in the X-API-Key header",
                    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
        if keyed:
            spec.setdefault("components", {})["securitySchemes"] = {KEY_SCHEME: {
                "type": "apiKey", "in": "header", "name": KEY_HEADER,
                "description": "one of the server's keys; needed for writes"
                               + (" and reads" if config.keys_for_reads else "")}}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi


def _calls(dependant) -> set:
    """Every dependency function ``dependant`` runs, however deeply nested."""
    calls = set()
    for sub in dependant.dependencies:
        calls |= {sub.call} | _calls(sub)
    return calls


# ----------------------------------------------------------------------------------------- errors
def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _asymret_error(request: Request, exc: AsymretError) -> JSONResponse:
    response = error(exc.http_status, exc.code, str(exc))
    if isinstance(exc, UnauthorizedError):
        response.headers.update(CHALLENGE)
    return response


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
    response = error(exc.status_code, http_code(exc.status_code), str(exc.detail))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        response.headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
    return response


def allowed_methods(app, scope) -> list[str]:
    """Every method some route serves at this path. The router's own 405 names only the first route that
    matches the path, and GET and POST /v1/galleries are two routes."""
    root = scope.get("app_root_path", scope.get("root_path", ""))  # a mount adds its prefix to root_path
    bare = {"type": "http", "path": scope["path"], "root_path": root, "method": ""}
    methods: set[str] = set()
    for route in [*app.router.routes, *app.state.api_routes]:
        if isinstance(getattr(route, "app", None), StaticFiles):  # a mount of files: what StaticFiles serves
            served = {"GET", "HEAD"}
        else:
            served = getattr(route, "methods", None) or set()
        if served and route.matches(bare)[0] is not Match.NONE:
            methods |= served
    return sorted(methods)


def internal_error(scope, exc: BaseException) -> JSONResponse:
    log.error("internal error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
    return error(500, "internal_error", "an internal error occurred; it is logged on the server")


# ------------------------------------------------------------------------------------- middleware
class CatchAll:
    """The last resort: an exception no handler took becomes the JSON 500 (logged with its traceback)
    and goes no further. Starlette's handler for ``Exception`` answers and then re-raises, and uvicorn
    closes the connection of an app that raised, so a client's next request on it failed too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:  # half a response is out: nothing else can be sent, let the server drop it
                raise
            await internal_error(scope, exc)(scope, receive, send)


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
