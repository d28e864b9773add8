"""The HTTP server: the chat page, the OpenAI-compatible API, /health and /metrics, one process.

    app = create_app(loaded, engine, settings)   # a FastAPI app
    serve(settings)                             # load, start the engine, run uvicorn

The page is Gradio mounted at ``/``; the API lives under ``/v1``; ``/health`` answers 200 while
the model worker runs (503 otherwise) and ``/metrics`` speaks Prometheus' text format.
"""

from __future__ import annotations

import logging
import secrets
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from owl.chatlog import ConversationLog
from owl.settings import Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent.parent / "static"


def model_info(loaded, settings: Settings) -> dict[str, Any]:
    from owl.checkpoint import DEFAULT_CHECKPOINT

    described = loaded.describe()
    return {
        **described,
        "title": settings.title,
        "embedded": settings.checkpoint is None and Path(str(DEFAULT_CHECKPOINT)).is_dir(),
    }


def metrics_registry(engine, info: dict):
    """A Prometheus registry whose values are read from the engine at scrape time."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class EngineCollector:
        def collect(self):
            status = engine.status()
            yield GaugeMetricFamily(
                "owl_up", "1 while the model worker runs", value=1 if status["alive"] else 0
            )
            yield GaugeMetricFamily(
                "owl_queue_depth", "requests waiting for a place", value=status["queue_depth"]
            )
            yield GaugeMetricFamily("owl_active_sequences", "requests being answered", value=status["active"])
            yield GaugeMetricFamily(
                "owl_tokens_per_second",
                "tokens per second over the last 10 s",
                value=status["tokens_per_second"],
            )
            ttft = GaugeMetricFamily(
                "owl_time_to_first_token_seconds", "median time to first token, recent requests"
            )
            ttft.add_metric([], status["ttft_p50_s"] or 0.0)
            yield ttft
            yield CounterMetricFamily(
                "owl_tokens_generated", "tokens generated", value=status["tokens_generated"]
            )
            requests = CounterMetricFamily("owl_requests", "requests by outcome", labels=["outcome"])
            requests.add_metric(["submitted"], status["requests_submitted"])
            requests.add_metric(["completed"], status["requests_completed"])
            requests.add_metric(["cancelled"], status["requests_cancelled"])
            yield requests
            failures = CounterMetricFamily("owl_request_failures", "failed requests by kind", labels=["kind"])
            for kind, count in sorted(status["requests_failed"].items()):
                failures.add_metric([kind], count)
            yield failures
            yield GaugeMetricFamily(
                "owl_worker_restarts", "times the model worker was replaced", value=status["worker_restarts"]
            )
            model = GaugeMetricFamily(
                "owl_model_info", "the loaded model", labels=["model", "device", "dtype"]
            )
            model.add_metric([info["model"], info["device"], info["dtype"]], 1)
            yield model

    registry = CollectorRegistry()
    registry.register(EngineCollector())
    return registry


def ops_router(engine, info: dict) -> APIRouter:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    router = APIRouter()
    registry = metrics_registry(engine, info)

    @router.get("/health", tags=["operations"])
    def health() -> JSONResponse:
        """200 while the model worker runs, 503 while it is down or restarting."""
        status = engine.status()
        body = {
            "status": "ok" if status["alive"] else "unavailable",
            "model": info["model"],
            "device": info["device"],
            "queue_depth": status["queue_depth"],
            "active": status["active"],
            "layers": status["layers"],
        }
        return JSONResponse(body, status_code=200 if status["alive"] else 503)

    @router.get("/metrics", tags=["operations"])
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


def api_key_check(settings: Settings):
    """With --auth USER:PASSWORD, API calls need ``Authorization: Bearer USER:PASSWORD``."""
    pair = settings.auth_pair
    expected = None if pair is None else f"{pair[0]}:{pair[1]}"

    def allowed(request: Request) -> bool:
        if expected is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), expected)

    return allowed


def create_app(loaded, engine, settings: Settings) -> FastAPI:
    import gradio as gr

    from owl.openai_api import install_error_handlers, openai_router
    from owl.web import build_demo

    info = model_info(loaded, settings)
    app = FastAPI(
        title="Owl",
        description="Chat with mPLUG-Owl models: the page, an OpenAI-compatible API, health and metrics.",
        docs_url="/v1/docs",
        openapi_url="/v1/openapi.json",
    )
    app.include_router(ops_router(engine, info))
    install_error_handlers(app)
    chatlog = ConversationLog(settings.log_dir, settings.log_conversations)
    app.include_router(openai_router(engine, loaded, settings, info, api_key_check(settings), chatlog))
    demo = build_demo(engine, settings, info, chatlog)
    demo.queue(default_concurrency_limit=None, max_size=None)
    css_file = STATIC / "style.css"
    return gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=settings.auth_pair,
        auth_message="Sign in to use this Owl server.",
        max_file_size=f"{settings.max_upload_mb:g}mb",
        css=css_file.read_text() if css_file.is_file() else None,
        theme=gr.themes.Soft(),
        footer_links=["api"],
        root_path=settings.root_path or None,
        allowed_paths=[str(STATIC)],
        show_error=True,
    )


def start(settings: Settings):
    """Load the model and start the engine; returns (loaded, engine)."""
    import owl
    from owl.engine import Engine, EngineSettings

    loaded = owl.load(
        settings.checkpoint,
        tokenizer=settings.tokenizer,
        config=settings.config,
        device=settings.device,
        dtype=settings.dtype,
        quantize=settings.quantize,
        allow_image_urls=settings.allow_image_urls,
    )
    from owl.limits import image_limits

    loaded.processor.limits = image_limits(settings)
    engine = Engine(
        loaded,
        EngineSettings(
            max_batch=settings.max_batch,
            queue_size=settings.queue_size,
            request_timeout_s=settings.request_timeout_s,
            compile=None if settings.compile else False,
        ),
    ).start()
    if loaded.device.type == "cuda":
        # Compile and capture the first shapes now, not while the first visitor waits.
        log.info("warming up the engine (compiling, capturing CUDA graphs)")
        log.info("warmed up in %.0f s", engine.warm_up())
    return loaded, engine


def serve(settings: Settings) -> None:
    import uvicorn

    loaded, engine = start(settings)
    log.info("model %s on %s (%s)", loaded.name, loaded.device, loaded.dtype)
    if settings.share:
        _serve_shared(loaded, engine, settings)
        return
    app = create_app(loaded, engine, settings)
    print(
        f"Owl is serving {loaded.name} at http://{settings.host}:{settings.port}  (API: /v1, health: /health)",
        flush=True,
    )
    try:
        uvicorn.run(
            app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5
        )
    finally:
        engine.stop()


def _serve_shared(loaded, engine, settings: Settings) -> None:
    """--share: Gradio's public link needs Gradio's own launcher; the API routes join its app."""
    from owl.openai_api import openai_router
    from owl.web import build_demo

    info = model_info(loaded, settings)
    demo = build_demo(engine, settings, info)
    demo.queue(default_concurrency_limit=None, max_size=None)
    css_file = STATIC / "style.css"
    demo.launch(
        share=True,
        server_name=settings.host,
        server_port=settings.port,
        auth=settings.auth_pair,
        prevent_thread_lock=True,
        max_file_size=f"{settings.max_upload_mb:g}mb",
        css=css_file.read_text() if css_file.is_file() else None,
    )
    for router in (
        ops_router(engine, info),
        openai_router(engine, loaded, settings, info, api_key_check(settings)),
    ):
        demo.app.include_router(router)
    try:
        threading.Event().wait()
    finally:
        engine.stop()
