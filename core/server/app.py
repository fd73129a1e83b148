"""The FastAPI application: OpenAI routes plus health, engine state and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..engine import Engine
from .chat import create_chat_completion
from .completions import create_completion
from .context import ServerContext
from .errors import BodySizeLimit, check_api_key, install_error_handlers
from .schemas import ChatCompletionRequest, CompletionRequest, now


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
