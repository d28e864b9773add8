"""The web page: a Gradio 6 multimodal chat over the serving engine.

``build_demo(engine, settings, info)`` returns the ``gr.Blocks``; every handler gets what it
needs by closure and nothing happens at import time. The chat history is Gradio's list of
messages (user turns carry their images and text); ``history_to_conversation`` turns it into an
``owl.Conversation`` for the model. Status and error notes are assistant messages with a
``metadata`` title, shown in the chat but never sent to the model.

Besides the page, ``/generate`` is a named streaming endpoint for ``gradio_client``: text, image
files, an optional earlier conversation, and the generation parameters.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from owl.chatlog import ConversationLog
from owl.conversation import Conversation
from owl.errors import LimitExceeded, OwlError
from owl.limits import RateLimiter, check_new_tokens, check_text, check_turn_images, decode_client_image
from owl.params import GenerationParams
from owl.processing import aspect_hint
from owl.settings import Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent.parent / "static"
ERROR_TITLE = "⚠️ "
WAITING = "⏳ Waiting in the queue"
EXPORT_VERSION = 1


# --- history <-> conversation --------------------------------------------------------------------


def _parts(content: Any) -> list[Any]:
    """A message's content as a list of parts (strings, file dicts), whatever form Gradio gave."""
    if isinstance(content, (list, tuple)):
        return list(content)
    return [content]


def _part_path(part: Any) -> str | None:
    if isinstance(part, dict):
        if part.get("type") == "file":
            part = part.get("file") or {}
        return part.get("path") or None
    path = getattr(part, "path", None)
    if path is None and hasattr(part, "file"):
        path = getattr(part.file, "path", None)
    return path


def _part_text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") == "text":
        return part.get("text", "")
    return getattr(part, "text", None) if getattr(part, "type", None) == "text" else None


def _is_note(message: dict) -> bool:
    """Status and error notes: shown in the chat, never part of the conversation."""
    metadata = message.get("metadata") or {}
    return bool(metadata.get("title"))


def history_to_conversation(history: list[dict], system: str | None) -> Conversation:
    """Gradio messages → Conversation: consecutive user messages form one turn (images, then text)."""
    conversation = Conversation() if system is None else Conversation(system=system)
    images: list[str] = []
    texts: list[str] = []
    for message in history:
        if _is_note(message):
            continue
        role = message.get("role")
        if role == "user":
            for part in _parts(message.get("content")):
                path = _part_path(part)
                if path:
                    images.append(path)
                else:
                    text = _part_text(part)
                    if text:
                        texts.append(text)
        elif role == "assistant":
            if texts or images:
                conversation = conversation.add_user(_unescape("\n".join(texts)), images)
                images, texts = [], []
            answer = "".join(_part_text(p) or "" for p in _parts(message.get("content")))
            conversation = conversation.add_assistant(_unescape(answer))
    if texts or images:
        conversation = conversation.add_user(_unescape("\n".join(texts)), images)
    return conversation


def _with_text(message: dict, text: str) -> dict:
    """The message with its text replaced by ``text`` (its images kept)."""
    files = [part for part in _parts(message.get("content")) if _part_path(part)]
    return {**message, "content": [*files, escape_markdown_html(_unescape(text))]}


def count_images(history: list[dict]) -> int:
    return sum(
        1
        for message in history
        if message.get("role") == "user"
        for part in _parts(message.get("content"))
        if _part_path(part)
    )


_CODE = re.compile(r"(```[\s\S]*?(?:```|$)|`[^`\n]*`)")


def escape_markdown_html(text: str) -> str:
    """HTML shown as text: escape it everywhere except inside code, which markdown shows literally."""
    pieces = _CODE.split(text)
    return "".join(piece if i % 2 else html.escape(piece, quote=False) for i, piece in enumerate(pieces))


def _unescape(text: str) -> str:
    return html.unescape(text)


# --- the page ------------------------------------------------------------------------------------


def header_html(info: dict, status: dict) -> str:
    alive = "running" if status.get("alive") else "restarting"
    speed = status.get("tokens_per_second") or 0.0
    return (
        f"<div class='owl-header'><span class='owl-title'>🦉 {html.escape(info['title'])}</span>"
        f"<span class='owl-model'>{html.escape(info['model'])} · {html.escape(info['device'])} · "
        f"{html.escape(info['dtype'])}</span>"
        f"<span class='owl-queue' id='owl-queue'>worker {alive} · {status.get('active', 0)} answering · "
        f"{status.get('queue_depth', 0)} waiting · {speed:.1f} tokens/s</span></div>"
    )


def banner_markdown(info: dict) -> str | None:
    if info.get("random_weights"):
        return (
            "**This model has random weights: its answers are noise.** Start with "
            "`--checkpoint MAGAer13/mplug-owl-llama-7b` (or another checkpoint) for real answers."
        )
    if info.get("embedded"):
        return (
            "**This is Owl's tiny embedded model** (3.7 M parameters). It has only seen flat coloured "
            "shapes on plain backgrounds: it names a lone shape's colour and the background well and gets "
            "about half of its other questions right (try the examples below). For real photos, start "
            "the app with `--checkpoint MAGAer13/mplug-owl-llama-7b` on a GPU."
        )
    return None


def build_demo(engine, settings: Settings, info: dict, chatlog: ConversationLog | None = None) -> gr.Blocks:
    """The chat page for ``engine``; ``info`` describes the model (name, device, dtype, flags)."""
    chatlog = chatlog or ConversationLog(settings.log_dir, settings.log_conversations)
    limiter = RateLimiter(settings.requests_per_minute)
    defaults = settings.default_params()
    examples = _examples()
    # Each page session's running answers, so that Stop cancels them in the engine itself, whether or
    # not the browser's cancellation of the streaming event reaches the server.
    answering: dict[str, set] = {}

    async def stop_session(request: gr.Request):  # on the event loop, like the answers it stops
        for handle in list(answering.get(_session(request), ())):
            handle.cancel()

    def params_from(
        max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed
    ) -> GenerationParams:
        check_new_tokens(max_new_tokens, settings)
        return GenerationParams(
            max_new_tokens=int(max_new_tokens),
            do_sample=bool(do_sample),
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
            repetition_penalty=float(repetition_penalty),
            no_repeat_ngram_size=settings.default_no_repeat_ngram_size if do_sample else 0,
            seed=None if seed in (None, "", -1) else int(seed),
        )

    async def stream_answer(history: list[dict], system: str, params: GenerationParams, session: str):
        """Yield the history with the answer growing at its end; notes for waiting and errors."""
        history = [m for m in history if not _is_note(m)]
        note = {"role": "assistant", "content": f"{WAITING}…", "metadata": {"title": "⏳ Queued"}}
        try:
            limiter.check(session)
            conversation = history_to_conversation(history, system or None)
            handle = engine.submit_conversation(conversation, params)
        except OwlError as err:
            gr.Warning(str(err))
            yield [*history, _error_note(err)]
            return
        answer = ""
        shown_position = None
        answering.setdefault(session, set()).add(handle)
        try:
            async for item in handle.updates(poll_s=0.5):
                if isinstance(item, int):  # still waiting: its place in the queue
                    if item != shown_position:
                        shown_position = item
                        note["content"] = f"{WAITING}: position {item}…"
                        yield [*history, note]
                    continue
                answer += item
                yield [*history, {"role": "assistant", "content": escape_markdown_html(answer)}]
        except OwlError as err:
            gr.Warning(str(err))
            done = (
                [*history, {"role": "assistant", "content": escape_markdown_html(answer)}]
                if answer
                else history
            )
            yield [*done, _error_note(err)]
            return
        finally:
            handle.cancel()  # no-op when finished; frees the engine when the page stopped listening
            mine = answering.get(session, set())
            mine.discard(handle)
            if not mine:
                answering.pop(session, None)
        chatlog.record(conversation, answer, "page")
        yield [*history, {"role": "assistant", "content": escape_markdown_html(answer or "(no answer)")}]

    def count_label(history: list[dict]) -> str:
        return f"🖼️ {count_images(history)} / {settings.max_images} images in this conversation"

    with gr.Blocks(title=f"{settings.title} — {info['model']}", delete_cache=(1800, 3600)) as demo:
        header = gr.HTML(header_html(info, engine.status()), elem_id="owl-header")
        banner = banner_markdown(info)
        if banner:
            gr.Markdown(banner, elem_id="owl-banner")
        with gr.Row():
            with gr.Column(scale=7):
                chatbot = gr.Chatbot(
                    label="Conversation",
                    elem_id="owl-chat",
                    height=540,
                    editable="user",
                    render_markdown=True,
                    sanitize_html=True,
                    latex_delimiters=[],
                    placeholder="Drop one or more images below and ask about them.",
                )
                textbox = gr.MultimodalTextbox(
                    elem_id="owl-input",
                    file_types=["image"],
                    file_count="multiple",
                    placeholder="Ask about your images… (Enter sends, Shift+Enter for a new line)",
                    show_label=False,
                    sources=["upload"],
                    autofocus=True,
                )
                with gr.Row(elem_id="owl-controls"):
                    stop = gr.Button("⏹ Stop", elem_id="owl-stop", variant="stop", size="sm")
                    retry = gr.Button("🔄 Retry", elem_id="owl-retry", size="sm")
                    undo = gr.Button("↩️ Undo", elem_id="owl-undo", size="sm")
                    clear = gr.Button("🗑️ Clear", elem_id="owl-clear", size="sm")
                    export = gr.DownloadButton("⬇️ Export", elem_id="owl-export", size="sm")
                    importer = gr.UploadButton(
                        "⬆️ Import", elem_id="owl-import", size="sm", file_types=[".json"]
                    )
                image_count = gr.Markdown(count_label([]), elem_id="owl-image-count")
            with gr.Column(scale=3):
                with gr.Accordion("Parameters", open=False, elem_id="owl-params"):
                    max_new_tokens = gr.Slider(
                        1,
                        settings.max_new_tokens,
                        value=defaults.max_new_tokens,
                        step=1,
                        label="Max new tokens",
                    )
                    do_sample = gr.Checkbox(
                        value=defaults.do_sample,
                        label="Sample (off: greedy, deterministic)",
                        elem_id="owl-sample",
                    )
                    temperature = gr.Slider(
                        0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature"
                    )
                    top_k = gr.Slider(0, 100, value=defaults.top_k, step=1, label="Top-k (0: off)")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
                    repetition_penalty = gr.Slider(
                        1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"
                    )
                    seed = gr.Number(value=-1, label="Seed (-1: a new one each time)", precision=0)
                    system = gr.Textbox(
                        value=settings.system or Conversation().system, label="System prompt", lines=3
                    )
                gr.Markdown(
                    f"Up to {settings.max_images_per_turn} images per message and {settings.max_images} per "
                    f"conversation, {settings.max_upload_mb:g} MB each. Stop frees the model at once. "
                    "Edit a message of yours to run the conversation again from there.",
                    elem_id="owl-help",
                )
                if examples:
                    gr.Examples(examples=examples, inputs=[textbox], label="Examples", examples_per_page=6)
        timer = gr.Timer(2.0)
        param_inputs = [max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed]

        async def submit(
            message,
            history,
            system_text,
            max_new,
            sample,
            temp,
            k,
            p,
            penalty,
            seed_value,
            request: gr.Request,
        ):
            values = (max_new, sample, temp, k, p, penalty, seed_value)
            message = message or {}
            text = message.get("text") or ""
            files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
            history = [m for m in history or [] if not _is_note(m)]
            try:
                check_text(text, settings)
                check_turn_images(len(files), count_images(history), settings)
                params = params_from(*values)
            except OwlError as err:
                gr.Warning(str(err))
                yield history, message, count_label(history)  # the input stays as it was typed
                return
            if not text.strip() and not files:
                yield history, None, count_label(history)
                return
            for path in files:
                hint = aspect_hint(path, info["image_size"])
                if hint:
                    gr.Info(hint, duration=15, title="Stretched picture")
            content: list[Any] = [{"path": path} for path in files]
            if text:
                content.append(escape_markdown_html(text))
            history = [*history, {"role": "user", "content": content}]
            label = count_label(history)
            yield history, None, label
            async for updated in stream_answer(history, system_text, params, _session(request)):
                yield updated, None, label

        async def rerun(
            history, system_text, max_new, sample, temp, k, p, penalty, seed_value, request: gr.Request
        ):
            """Retry: answer the last user turn again."""
            values = (max_new, sample, temp, k, p, penalty, seed_value)
            history = [m for m in history or [] if not _is_note(m)]
            while history and history[-1].get("role") == "assistant":
                history.pop()
            if not history:
                yield history
                return
            try:
                params = params_from(*values)
            except OwlError as err:
                gr.Warning(str(err))
                yield history
                return
            async for updated in stream_answer(history, system_text, params, _session(request)):
                yield updated

        async def edited(
            history,
            system_text,
            max_new,
            sample,
            temp,
            k,
            p,
            penalty,
            seed_value,
            edit: gr.EditData,
            request: gr.Request,
        ):
            """A user message was edited: run the conversation again from there."""
            index = edit.index[0] if isinstance(edit.index, (list, tuple)) else edit.index
            history = [m for m in history or [] if not _is_note(m)][: index + 1]
            if history and isinstance(edit.value, str):
                history[-1] = _with_text(history[-1], edit.value)
            async for updated in rerun(
                history, system_text, max_new, sample, temp, k, p, penalty, seed_value, request
            ):
                yield updated

        def undo_last(history):
            """Remove the last exchange; its text and images go back into the input box."""
            history = [m for m in history or [] if not _is_note(m)]
            while history and history[-1].get("role") == "assistant":
                history.pop()
            texts, files = [], []
            while history and history[-1].get("role") == "user":
                for part in _parts(history.pop().get("content")):
                    path = _part_path(part)
                    if path:
                        files.insert(0, path)
                    elif (text := _part_text(part)) is not None:
                        texts.insert(0, _unescape(text))
            restored = {"text": "\n".join(texts), "files": files} if texts or files else None
            return history, restored, count_label(history)

        def export_conversation(history, system_text):
            path = Path(tempfile.gettempdir()) / f"owl-conversation-{time.strftime('%Y%m%d-%H%M%S')}.json"
            path.write_text(json.dumps(export_data(history, system_text), indent=1))
            return str(path)

        def import_conversation(file):
            try:
                history, system_text = import_data(json.loads(Path(file).read_text()), settings)
            except (ValueError, OwlError) as err:
                gr.Warning(f"could not import that file: {err}")
                return gr.skip(), gr.skip(), gr.skip()
            return history, system_text, count_label(history)

        send = textbox.submit(
            submit,
            [textbox, chatbot, system, *param_inputs],
            [chatbot, textbox, image_count],
            api_visibility="private",
            concurrency_limit=None,
        )
        chat_inputs = [chatbot, system, *param_inputs]
        again, again_icon, edit_run = (
            listener(fn, chat_inputs, [chatbot], api_visibility="private", concurrency_limit=None)
            for listener, fn in ((retry.click, rerun), (chatbot.retry, rerun), (chatbot.edit, edited))
        )
        running = [send, again, again_icon, edit_run]
        for stopper in (stop.click, textbox.stop):
            stopper(stop_session, None, None, cancels=running, queue=False, api_visibility="private")
        undo.click(
            undo_last, [chatbot], [chatbot, textbox, image_count], cancels=running, api_visibility="private"
        )
        chatbot.undo(
            undo_last, [chatbot], [chatbot, textbox, image_count], cancels=running, api_visibility="private"
        )
        clear.click(
            lambda: ([], None, count_label([])),
            None,
            [chatbot, textbox, image_count],
            cancels=running,
            api_visibility="private",
        )
        chatbot.clear(lambda: count_label([]), None, [image_count], cancels=running, api_visibility="private")
        export.click(export_conversation, [chatbot, system], [export], api_visibility="private")
        importer.upload(
            import_conversation, [importer], [chatbot, system, image_count], api_visibility="private"
        )
        timer.tick(
            lambda: header_html(info, engine.status()), None, [header], api_visibility="private", queue=False
        )

        # The API: one named streaming endpoint for gradio_client (hidden from the page).
        with gr.Column(visible=False):
            api_text = gr.Textbox(label="text")
            api_images = gr.File(label="images", file_count="multiple", file_types=["image"])
            api_history = gr.JSON(label="history", value=[])
            api_params = gr.JSON(label="parameters", value={})
            api_answer = gr.Textbox(label="answer")
        gr.Button(visible=False).click(
            _api_handler(engine, settings, limiter, defaults, chatlog),
            [api_text, api_images, api_history, api_params],
            [api_answer],
            api_name="generate",
            api_description=(
                "Stream an answer. text: the question; images: image files for this turn; history: earlier "
                "turns as [{'role': 'user'|'assistant', 'text': ..., 'images': [...]}] (images as data URIs "
                "or base64); parameters: {max_new_tokens, do_sample, temperature, top_k, top_p, "
                "repetition_penalty, seed, system}. Each update is the whole answer so far."
            ),
            concurrency_limit=None,
        )
    return demo


def _api_handler(
    engine, settings: Settings, limiter: RateLimiter, defaults: GenerationParams, chatlog: ConversationLog
):
    async def generate(text, images, history, parameters, request: gr.Request):
        try:
            limiter.check(_session(request))
            text = text or ""
            check_text(text, settings)
            files = [
                f if isinstance(f, str) else getattr(f, "name", None) or f.get("path") for f in images or []
            ]
            conversation, earlier = _api_conversation(history or [], parameters or {}, settings)
            check_turn_images(len(files), earlier, settings)
            params = _api_params(parameters or {}, settings, defaults)
            conversation = conversation.add_user(text, files)
            handle = engine.submit_conversation(conversation, params)
        except OwlError as err:
            raise gr.Error(str(err), title=err.kind) from None
        answer = ""
        try:
            async for delta in handle:
                answer += delta
                yield answer
        except OwlError as err:
            raise gr.Error(str(err), title=err.kind) from None
        finally:
            handle.cancel()
        chatlog.record(conversation, answer, "api")
        yield answer

    return generate


def _api_params(data: dict, settings: Settings, defaults: GenerationParams) -> GenerationParams:
    known = {
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "seed",
        "system",
        "no_repeat_ngram_size",
        "stop",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise LimitExceeded(f"unknown parameters: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {k: v for k, v in data.items() if k != "system" and v is not None}
    check_new_tokens(values.get("max_new_tokens", 0), settings)
    base = {
        name: getattr(defaults, name)
        for name in (
            "max_new_tokens",
            "do_sample",
            "temperature",
            "top_k",
            "top_p",
            "repetition_penalty",
            "no_repeat_ngram_size",
        )
    }
    return GenerationParams.from_kwargs(**{**base, **values})


def _api_conversation(history: list, parameters: dict, settings: Settings) -> tuple[Conversation, int]:
    """An earlier conversation given to the API: its turns, with images decoded to files."""
    if not isinstance(history, list):
        raise LimitExceeded("history must be a list of {'role', 'text', 'images'} turns")
    system = parameters.get("system")
    conversation = Conversation() if not system else Conversation(system=str(system))
    images = 0
    for turn in history:
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            raise LimitExceeded("each history turn needs role 'user' or 'assistant'")
        text = str(turn.get("text") or "")
        check_text(text, settings)
        if turn["role"] == "user":
            files = [decode_client_image(source, settings) for source in turn.get("images") or []]
            images += len(files)
            conversation = conversation.add_user(text, files)
        else:
            conversation = conversation.add_assistant(text)
    if images > settings.max_images:
        raise LimitExceeded(
            f"the history holds {images} images; the limit is {settings.max_images} per conversation"
        )
    return conversation, images


IMPORTS = Path(tempfile.gettempdir()) / "owl-imports"
IMPORT_MAX_AGE_S = 3600


def _save_for_display(image) -> str:
    """Imported images become files the chat can show; files older than an hour are removed."""
    IMPORTS.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in IMPORTS.glob("*.png"):
        try:
            if now - old.stat().st_mtime > IMPORT_MAX_AGE_S:
                old.unlink()
        except OSError:
            pass
    path = IMPORTS / f"{uuid.uuid4().hex}.png"
    image.save(path)
    return str(path)


def _session(request: gr.Request | None) -> str:
    if request is None:
        return "anonymous"
    return getattr(request, "session_hash", None) or (request.client.host if request.client else "anonymous")


def _error_note(err: OwlError) -> dict:
    titles = {
        "queue_full": "Queue full",
        "context_length_exceeded": "Conversation too long",
        "invalid_image": "Unreadable image",
        "image_too_large": "Image too large",
        "out_of_memory": "Out of memory",
        "rate_limited": "Too many requests",
        "limit_exceeded": "Over a limit",
        "timeout": "Took too long",
        "no_worker": "Model restarting",
    }
    title = titles.get(err.kind, "Error")
    return {
        "role": "assistant",
        "content": html.escape(str(err)),
        "metadata": {"title": f"{ERROR_TITLE}{title}"},
    }


# --- export and import ---------------------------------------------------------------------------


def export_data(history: list[dict], system: str | None) -> dict:
    """A conversation with its images inside (data URIs), to save and import again."""
    turns = []
    for message in history:
        if _is_note(message):
            continue
        text, images = [], []
        for part in _parts(message.get("content")):
            path = _part_path(part)
            if path:
                data = Path(path).read_bytes()
                images.append("data:image/png;base64," + base64.b64encode(_as_png(data)).decode())
            elif (value := _part_text(part)) is not None:
                text.append(_unescape(value))
        turns.append({"role": message.get("role"), "text": "\n".join(text), "images": images})
    return {"format": "owl-conversation", "version": EXPORT_VERSION, "system": system, "turns": turns}


def import_data(data: dict, settings: Settings) -> tuple[list[dict], str | None]:
    if not isinstance(data, dict) or data.get("format") != "owl-conversation":
        raise ValueError("not an Owl conversation export (format 'owl-conversation')")
    history: list[dict] = []
    images = 0
    for turn in data.get("turns") or []:
        role = turn.get("role")
        if role not in ("user", "assistant"):
            raise ValueError(f"unknown role {role!r}")
        content: list[Any] = []
        for source in turn.get("images") or []:
            content.append({"path": _save_for_display(decode_client_image(source, settings))})
            images += 1
        if turn.get("text"):
            content.append(escape_markdown_html(str(turn["text"])))
        history.append(
            {
                "role": role,
                "content": content if role == "user" else "".join(c for c in content if isinstance(c, str)),
            }
        )
    if images > settings.max_images:
        raise LimitExceeded(f"it holds {images} images; the limit is {settings.max_images} per conversation")
    return history, data.get("system")


def _as_png(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _examples() -> list[dict]:
    folder = STATIC / "examples"
    index = folder / "examples.json"
    if not index.is_file():
        return []
    return [
        {"text": item["text"], "files": [str(folder / name) for name in item["images"]]}
        for item in json.loads(index.read_text())
    ]
