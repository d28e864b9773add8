"""An OpenAI-compatible API beside the page: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Messages with ``text`` and ``image_url`` parts map onto the mPLUG-Owl template (a system message
becomes the system line; images keep their order within and across messages). Images come as
data URIs, or as http(s) URLs when the server allows them. ``stream: true`` answers with
server-sent events in OpenAI's chunk format and ends with ``data: [DONE]``; a client that closes
the stream stops its generation. Errors use OpenAI's error shape with fitting HTTP codes: 400
bad input, 401 missing credentials, 413 too large, 429 queue full or rate limit, 503 no worker.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from owl.chatlog import ConversationLog
from owl.conversation import Conversation
from owl.errors import BadRequest, LimitExceeded, OwlError
from owl.limits import RateLimiter, check_text, check_turn_images, decode_client_image
from owl.params import GenerationParams


class ImageURL(BaseModel):
    url: str = Field(
        description="a data URI (data:image/png;base64,...) or, if the server allows, an http(s) URL"
    )
    detail: str | None = Field(None, description="accepted and ignored: every image is 224x224 to the model")


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="any value: the server answers with the model it has loaded")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (also max_completion_tokens)")
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 gives greedy decoding")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    user: str | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int = Field(description="prompt tokens, each image counting as its 65 slots")
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
        504: "server_error",
        500: "server_error",
    }
    body = {
        "error": {"message": message, "type": kinds.get(status, kind), "param": param, "code": code or kind}
    }
    return JSONResponse(body, status_code=status)


def owl_error_response(err: OwlError) -> JSONResponse:
    return error_response(err.http_status, str(err), err.kind, code=err.kind)


def install_error_handlers(app: FastAPI) -> None:
    """Malformed API requests answer in OpenAI's error shape (400), not FastAPI's default 422."""
    from fastapi.exception_handlers import request_validation_exception_handler

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        if not request.url.path.startswith("/v1/"):
            return await request_validation_exception_handler(request, exc)
        # For unions (a content that is a string or a list of parts) the deepest error is the telling one.
        errors = sorted(exc.errors(), key=lambda e: len(e.get("loc", ())), reverse=True)
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_name(p))
        return error_response(
            400,
            f"{where or 'request'}: {first.get('msg', 'invalid request')}",
            "invalid_request_error",
            code="invalid_request",
            param=where or None,
        )


def _is_type_name(part) -> bool:
    """Union branch names pydantic puts into error locations ('str', 'list[ContentPart]')."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or "[" in part)


def to_conversation(messages: list[Message], settings) -> Conversation:
    """OpenAI messages → Conversation; consecutive user messages form one turn."""
    system = None
    turns: list[tuple[str, str, list[str]]] = []  # (role, text, images)
    for index, message in enumerate(messages):
        parts = (
            [ContentPart(type="text", text=message.content)]
            if isinstance(message.content, str)
            else (message.content or [])
        )
        text = "\n".join(p.text or "" for p in parts if p.type == "text")
        images = [p.image_url.url for p in parts if p.type == "image_url" and p.image_url is not None]
        if any(p.type == "image_url" and p.image_url is None for p in parts):
            raise BadRequest(f"messages[{index}]: an image_url part needs image_url.url")
        check_text(text, settings)
        if message.role in ("system", "developer"):
            if images:
                raise BadRequest(f"messages[{index}]: a system message cannot hold images")
            system = text if system is None else f"{system}\n{text}"
            continue
        if message.role == "user" and turns and turns[-1][0] == "user":
            role, earlier, earlier_images = turns.pop()
            turns.append(
                (role, f"{earlier}\n{text}" if earlier and text else earlier or text, earlier_images + images)
            )
            continue
        if message.role == "assistant" and images:
            raise BadRequest(f"messages[{index}]: assistant messages cannot hold images")
        turns.append((message.role, text, images))
    if not turns or turns[-1][0] != "user":
        raise BadRequest("the last message must be the user's: that is what gets answered")
    conversation = Conversation() if system is None else Conversation(system=system)
    seen = 0
    for role, text, images in turns:
        if role == "user":
            check_turn_images(len(images), seen, settings)
            seen += len(images)
            decoded = [decode_client_image(url, settings) for url in images]
            conversation = conversation.add_user(text, decoded)
        else:
            if conversation.turns and conversation.turns[-1].role == "assistant":
                raise BadRequest("two assistant messages in a row")
            if not conversation.turns:
                raise BadRequest("the conversation must start with a user message")
            conversation = conversation.add_assistant(text)
    return conversation


def to_params(body: ChatCompletionRequest, settings) -> GenerationParams:
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise BadRequest(f"{name} is not supported (only 0)")
    wanted = body.max_completion_tokens or body.max_tokens or settings.default_max_new_tokens
    if wanted > settings.max_new_tokens:
        raise LimitExceeded(f"max_tokens {wanted} is over this server's limit of {settings.max_new_tokens}")
    temperature = 1.0 if body.temperature is None else body.temperature
    stop = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    if len(stop) > 4:
        raise BadRequest("at most 4 stop sequences")
    return GenerationParams(
        max_new_tokens=wanted,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=stop,
    )


def openai_router(
    engine,
    loaded,
    settings,
    info: dict,
    allowed: Callable[[Request], bool],
    chatlog: ConversationLog | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible API"])
    chatlog = chatlog or ConversationLog(settings.log_dir, settings.log_conversations)
    limiter = RateLimiter(settings.requests_per_minute)
    model_name = info["model"]

    @router.get("/models")
    def models(request: Request) -> Any:
        """The one model this server has loaded."""
        if not allowed(request):
            return _unauthorized()
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "owl"}],
        }

    @router.post(
        "/chat/completions",
        response_model=ChatCompletion,
        responses={
            200: {
                "content": {
                    "text/event-stream": {
                        "description": "with stream: true, chat.completion.chunk events, then data: [DONE]"
                    }
                }
            },
            **{code: {"model": ErrorResponse} for code in (400, 401, 413, 429, 503)},
        },
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Answer a conversation of text and images, at once or streamed."""
        if not allowed(request):
            return _unauthorized()
        try:
            limiter.check(
                request.headers.get("authorization") or (request.client.host if request.client else "?")
            )
            conversation = to_conversation(body.messages, settings)
            params = to_params(body, settings)
            handle = engine.submit_conversation(conversation, params)
        except OwlError as err:
            return owl_error_response(err)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _events(
                    handle,
                    completion_id,
                    created,
                    model_name,
                    include_usage,
                    lambda answer: chatlog.record(conversation, answer, "openai"),
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            text = "".join([delta async for delta in handle])
        except OwlError as err:
            return owl_error_response(err)
        finally:
            handle.cancel()
        chatlog.record(conversation, text, "openai")
        stats = handle.stats
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=model_name,
            choices=[
                Choice(message=ResponseMessage(content=text), finish_reason=_finish(stats.finish_reason))
            ],
            usage=Usage(
                prompt_tokens=stats.prompt_tokens,
                completion_tokens=stats.completion_tokens,
                total_tokens=stats.prompt_tokens + stats.completion_tokens,
            ),
        )

    return router


def _unauthorized() -> JSONResponse:
    return error_response(
        401,
        "missing or wrong API key: send Authorization: Bearer USER:PASSWORD",
        "authentication_error",
        code="invalid_api_key",
    )


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def _events(handle, completion_id: str, created: int, model: str, include_usage: bool, on_done):
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        answer = []
        async for delta in handle:
            answer.append(delta)
            yield chunk({"content": delta})
        on_done("".join(answer))
        yield chunk({}, _finish(handle.stats.finish_reason))
        if include_usage:
            stats = handle.stats
            yield chunk(
                {},
                usage={
                    "prompt_tokens": stats.prompt_tokens,
                    "completion_tokens": stats.completion_tokens,
                    "total_tokens": stats.prompt_tokens + stats.completion_tokens,
                },
                choices=False,
            )
    except OwlError as err:
        error = {
            "message": str(err),
            "type": "server_error" if err.http_status >= 500 else "invalid_request_error",
            "code": err.kind,
        }
        yield f"data: {json.dumps({'error': error})}\n\n"
    finally:
        handle.cancel()  # a client that closed the stream frees its place at once
    yield "data: [DONE]\n\n"
