"""The FastAPI application: OpenAI routes plus health, engine state and Prometheus metrics."""

from __future__ import annotations

from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..config import ConfigError, flag_name
from ..engine import Engine, EngineStoppedError, RestartError
from .chat import create_chat_completion
from .completions import create_completion
from .context import ServerContext
from .errors import APIError, BodySizeLimit, check_api_key, install_error_handlers
from .schemas import ChatCompletionRequest, CompletionRequest, now

# How long /flush_cache waits for the engine thread to take the flush (between two steps).
FLUSH_TIMEOUT_S = 30.0


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    ctx = ServerContext(engine, api_key)
    app = FastAPI(title="llmconsole", docs_url=None, redoc_url=None)
    app.add_middleware(BodySizeLimit)
    install_error_handlers(app)

    def authorized(request: Request) -> None:
        check_api_key(request, ctx.api_key)

    v1 = [Depends(authorized)]

    @app.get("/health")
    async def health() -> Response:
        if engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "stopped"}, status_code=503)

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        card = {
            "id": ctx.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "llmconsole",
            "max_model_len": engine.context_length,
        }
        return {"object": "list", "data": [card]}

    @app.get("/v1/engine", dependencies=v1)
    async def engine_state() -> dict[str, Any]:
        return engine.describe()

    @app.post("/v1/engine/restart", dependencies=v1)
    def restart(changes: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """Hot restart with new flags: {"cuda_graph_max_bs": 32}. A plain def: FastAPI runs it
        on a worker thread, so streams keep flowing while it waits for the engine."""
        try:
            result = engine.restart(changes)
        except ConfigError as exc:
            param = next((k for k in changes if flag_name(k) in str(exc)), None)
            raise APIError(400, str(exc), param=param, code="invalid_engine_flag") from None
        except RestartError as exc:
            raise APIError(409, str(exc), code="restart_failed") from None
        except EngineStoppedError as exc:
            raise APIError(503, str(exc), "server_error", code="engine_stopped") from None
        except FutureTimeout:
            raise APIError(504, "the restart is still running", "server_error") from None
        return {**result.to_dict(), "config": engine.describe()["config"]}

    @app.api_route("/flush_cache", methods=["GET", "POST"], dependencies=v1)
    def flush_cache() -> dict[str, Any]:
        """SGLang's /flush_cache: drop the prefix cache's pages that no running request reads."""
        try:
            freed = engine.flush_cache(FLUSH_TIMEOUT_S)
        except EngineStoppedError as exc:
            raise APIError(503, str(exc), "server_error", code="engine_stopped") from None
        except FutureTimeout:
            message = (
                f"the engine did not take the flush within {FLUSH_TIMEOUT_S:g} s (a restart or "
                "a long step runs); it stays queued and runs once the engine is free"
            )
            raise APIError(504, message, "server_error", code="engine_busy") from None
        return {"freed_pages": freed, "page_size": engine.stats()["page_size"]}

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await create_completion(body, request, ctx)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return await create_chat_completion(body, request, ctx)

    from .metrics import EngineMetrics

    metrics = EngineMetrics(engine, ctx.model_name)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
