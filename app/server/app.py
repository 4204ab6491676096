"""The Starlette app of `repomem serve`: the OpenAI routes, `/mcp`, `/health`, the API key, CORS.

The key, when one is set, is checked on every request (constant time), `/health` and `/mcp`
included; a bind address other machines can reach is refused without one (`config.ServeConfig`).
A web page must not read the memory: no CORS headers unless origins are configured, and a request
whose `Host` is not a loopback name or the bind address (DNS rebinding) is refused with 400.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from repomem.core import __version__

from .config import ServeConfig, key_matches
from .errors import APIError
from .openai_api import api_error, chat_completions, list_models, retrieve_model
from .queue import FairQueue
from .repos import Repositories


class APIKeyMiddleware:
    """401 in OpenAI's shape unless `Authorization: Bearer <key>` (or `X-API-Key`) matches."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.key:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            auth = headers.get("authorization", "")
            supplied = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not key_matches(supplied, self.key):
                err = APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def health(request: Request) -> Response:
    repos: Repositories = request.app.state.repos
    queue: FairQueue = request.app.state.queue
    states = [await anyio.to_thread.run_sync(repos.health, r) for r in repos.repos]
    return JSONResponse({"status": "ok", "version": __version__, "uptime_s": round(time.time() -
                         request.app.state.started, 1), "queue": queue.stats(), "repositories": states})


async def _api_error(_request: Request, exc: Exception) -> Response:
    return api_error(exc).response()


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()  # 405's Allow


def _mcp_security(config: ServeConfig) -> TransportSecuritySettings:
    """The MCP transport's own Host and Origin checks: the hosts `TrustedHostMiddleware` takes, and pages of
    loopback origins and of the configured CORS origins. Off on a wildcard bind, whose API key keeps pages
    out (the SDK has no pattern for any host)."""
    hosts = config.trusted_hosts()
    if hosts == ["*"]:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return TransportSecuritySettings(
        allowed_hosts=[*hosts, *(f"{h}:*" for h in hosts)],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*", *config.cors_origins])


def build_app(repos: Repositories, queue: FairQueue, config: ServeConfig, mcp_server: Any | None = None) -> Starlette:
    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),  # ids hold a `/`
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    mcp_app = None
    if mcp_server is not None:
        mcp_app = mcp_server.streamable_http_app(streamable_http_path="/mcp", host=config.host,
                                                 transport_security=_mcp_security(config))
        routes += list(mcp_app.routes)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if mcp_server is None:
            yield
            return
        async with mcp_server.session_manager.run():
            yield

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=config.trusted_hosts(), www_redirect=False)]
    if config.cors_origins:
        # Any request header of an allowed origin (the openai JS SDK sends X-Stainless-*, MCP its session
        # headers); MCP's session id readable and its DELETE (the end of a session) allowed.
        middleware.append(Middleware(CORSMiddleware, allow_origins=config.cors_origins,
                                     allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"],
                                     expose_headers=["Mcp-Session-Id"]))
    if config.api_key:
        middleware.append(Middleware(APIKeyMiddleware, key=config.api_key))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _api_error})
    app.state.repos, app.state.queue, app.state.config = repos, queue, config
    app.state.started = time.time()
    return app
