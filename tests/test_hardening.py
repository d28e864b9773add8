"""Bad input, limits and access: each case gets its own message and the server keeps serving."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import threading
import time
import typing
from pathlib import Path

import httpx
import pytest
from PIL import Image

from owl import processing
from owl.errors import ImageError, ImageTooLarge
from owl.processing import ImageLimits, fetch_url
from tests.conftest import RunningServer, talking_config


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_message(*urls: str, text: str = "What is this?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


RED = uri(encode(Image.new("RGB", (32, 32), (255, 0, 0))))


def animated_gif() -> bytes:
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return encode(image, transparency=0)


GOOD_IMAGES = {
    "animated GIF (first frame)": uri(animated_gif(), "image/gif"),
    "CMYK JPEG": uri(encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), "image/jpeg"),
    "16-bit PNG": uri(encode(Image.new("I;16", (20, 20), 40000))),
    "palette with transparency": uri(palette_with_transparency()),
    "RGBA": uri(encode(Image.new("RGBA", (20, 20), (0, 0, 255, 128)))),
    "grey with alpha": uri(encode(Image.new("LA", (20, 20), (90, 200)))),
    "one pixel": uri(encode(Image.new("RGB", (1, 1), (0, 255, 0)))),
    "very wide": uri(encode(Image.new("RGB", (2000, 3), (9, 9, 9)))),
    "WebP": uri(encode(Image.new("RGB", (20, 20), (5, 5, 200)), "WEBP"), "image/webp"),
}

# (name, request body, HTTP status, words the message must contain)
BAD_REQUESTS = [
    (
        "corrupt PNG",
        {"messages": image_message(uri(b"\x89PNG\r\n\x1a\n" + os.urandom(200)))},
        400,
        "could not be opened|corrupt or truncated|not an image format",
    ),
    (
        "truncated JPEG",
        {
            "messages": image_message(
                uri(encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:300], "image/jpeg")
            )
        },
        400,
        "corrupt or truncated|could not be opened",
    ),
    (
        "text file sent as PNG",
        {"messages": image_message(uri(b"hello, I am not a picture"))},
        400,
        "not an image format we can read",
    ),
    (
        "data URI of text",
        {"messages": image_message("data:text/plain;base64,aGVsbG8=")},
        400,
        "holds text/plain, not an image",
    ),
    (
        "invalid base64",
        {"messages": image_message("data:image/png;base64,%%%notbase64%%%")},
        400,
        "invalid base64|not an image format",
    ),
    ("empty image", {"messages": image_message("data:image/png;base64,")}, 400, "is empty"),
    (
        "decompression bomb",
        {"messages": image_message(uri(encode(Image.new("L", (2000, 1500)))))},
        413,
        "3 megapixels; the limit is 1 megapixels",
    ),
    (
        "image over the size limit",
        {"messages": image_message(uri(encode(Image.effect_noise((900, 900), 120).convert("RGB"))))},
        413,
        "MiB; the limit is 1 MiB",
    ),
    (
        "http URL while URLs are off",
        {"messages": image_message("http://example.com/cat.png")},
        400,
        "image URLs are not allowed here",
    ),
    (
        "a path on the server",
        {"messages": image_message("/etc/hostname")},
        400,
        "looks like a file path; send the image itself",
    ),
    ("file URL", {"messages": image_message("file:///etc/passwd")}, 400, "looks like a file path"),
    ("ftp URL", {"messages": image_message("ftp://example.com/a.png")}, 400, "neither a data URI"),
    (
        "image part without its URL",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "needs image_url.url",
    ),
    (
        "image_url without url",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "high"}}]}]},
        400,
        "url",
    ),
    (
        "unknown content part",
        {"messages": [{"role": "user", "content": [{"type": "audio", "text": "x"}]}]},
        400,
        "type",
    ),
    (
        "too many images in a message",
        {"messages": image_message(RED, RED, RED)},
        413,
        "3 images in one message; the limit is 2 per message",
    ),
    (
        "too many images in the conversation",
        {
            "messages": [
                *image_message(RED, RED),
                {"role": "assistant", "content": "ok"},
                *image_message(RED, RED),
            ]
        },
        413,
        "4 images in the conversation; the limit is 3",
    ),
    (
        "text too long",
        {"messages": [{"role": "user", "content": "x" * 600}]},
        413,
        "600 characters; the limit is 500",
    ),
    (
        "system text too long",
        {"messages": [{"role": "system", "content": "y" * 700}, {"role": "user", "content": "hi"}]},
        413,
        "700 characters",
    ),
    (
        "prompt longer than the context",
        {"messages": [{"role": "user", "content": "word " * 99}] * 3},
        400,
        "context is 256 tokens",
    ),
    (
        "max_tokens over the limit",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65},
        413,
        "over this server's limit of 64",
    ),
    (
        "max_tokens zero",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "temperature too high",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 3},
        400,
        "temperature",
    ),
    ("top_p zero", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("several choices", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    (
        "frequency penalty",
        {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5},
        400,
        "frequency_penalty is not supported",
    ),
    (
        "five stop strings",
        {"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")},
        400,
        "at most 4 stop sequences",
    ),
    (
        "empty stop string",
        {"messages": [{"role": "user", "content": "hi"}], "stop": [""]},
        400,
        "stop strings must not be empty",
    ),
    ("no messages", {"messages": []}, 400, "messages"),
    ("messages not a list", {"messages": "hello"}, 400, "messages"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    (
        "last message from the assistant",
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        400,
        "the last message must be the user's",
    ),
    (
        "starts with the assistant",
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        400,
        "must start with a user message",
    ),
    (
        "two assistant messages",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "assistant", "content": "c"},
                {"role": "user", "content": "d"},
            ]
        },
        400,
        "two assistant messages in a row",
    ),
    (
        "image in a system message",
        {
            "messages": [
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": RED}}]},
                {"role": "user", "content": "hi"},
            ]
        },
        400,
        "a system message cannot hold images",
    ),
    (
        "image in an assistant message",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": RED}}]},
                {"role": "user", "content": "b"},
            ]
        },
        400,
        "assistant messages cannot hold images",
    ),
]


@pytest.fixture(scope="module")
def strict_server():
    server = RunningServer(
        "--checkpoint",
        "random:tiny",
        "--max-upload-mb",
        "1",
        "--max-images",
        "3",
        "--max-new-tokens",
        "64",
        "--max-batch",
        "1",
        "--queue-size",
        "1",
        env={
            "OWL_MAX_IMAGE_PIXELS": "1000000",
            "OWL_MAX_TEXT_CHARS": "500",
            "OWL_MAX_IMAGES_PER_TURN": "2",
            "OWL_REQUESTS_PER_MINUTE": "0",
        },
    )
    yield server
    server.stop()


def chat(server, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/chat/completions", json={"max_tokens": 4, **body}, timeout=60, **kwargs
    )


def test_the_battery_has_at_least_thirty_cases():
    assert len(BAD_REQUESTS) >= 30


@pytest.mark.parametrize(("name", "body", "status", "words"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_its_own_message(strict_server, name, body, status, words):
    import re

    response = chat(strict_server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert re.search(words, error["message"]), error["message"]
    assert error["type"] in ("invalid_request_error", "rate_limit_error", "server_error")


def test_malformed_json_is_a_400(strict_server):
    response = httpx.post(
        f"{strict_server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_unusual_images_are_converted(strict_server, name):
    response = chat(strict_server, {"messages": image_message(GOOD_IMAGES[name]), "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None


def test_a_normal_request_works_after_the_battery(strict_server):
    response = chat(strict_server, {"messages": image_message(RED), "temperature": 0})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{strict_server.url}/health").json()["status"] == "ok"


def test_full_queue_is_a_429_with_numbers(tmp_path):
    """One answer running, one waiting, a queue of one: the next request is refused at once. Its own
    server, whose answers run for many seconds until their readers hang up."""
    config = talking_config(tmp_path, context=4096)
    server = RunningServer(
        "--checkpoint", "random:tiny", "--config", str(config), "--max-new-tokens", "3000",
        "--max-batch", "1", "--queue-size", "1", env={"OWL_REQUESTS_PER_MINUTE": "0"},
    )  # fmt: skip
    hang_up = threading.Event()
    streams: list[int] = []

    def long_stream():
        # Greedy: the API samples by default, and a sampled random model can pick the end token early,
        # which would free the queue before the third request arrives.
        body = {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 3000,
            "stream": True,
            "temperature": 0,
        }
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json=body) as response:
            streams.append(response.status_code)
            for _ in response.iter_lines():
                if hang_up.is_set():
                    break  # closing the stream cancels the answer

    def reached(active: int, waiting: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = httpx.get(f"{server.url}/health").json()
            if health["active"] >= active and health["queue_depth"] >= waiting:
                return
            time.sleep(0.05)

    threads = [threading.Thread(target=long_stream) for _ in range(2)]
    try:
        # One at a time: two requests sent at once can both be waiting before the worker takes the
        # first, and then the queue of one refuses the second.
        threads[0].start()
        reached(active=1, waiting=0)
        threads[1].start()
        reached(active=1, waiting=1)
        response = chat(server, {"messages": [{"role": "user", "content": "me too"}]})
    finally:
        hang_up.set()
        for thread in threads:
            thread.join(30)
        server.stop()
    assert streams == [200, 200]
    assert response.status_code == 429, response.text
    assert "the queue is full: 1 requests are already waiting" in response.json()["error"]["message"]


def test_rate_limit_per_client():
    server = RunningServer("--checkpoint", "random:tiny", "--requests-per-minute", "2")
    try:
        codes = [
            chat(server, {"messages": [{"role": "user", "content": "hi"}]}).status_code for _ in range(3)
        ]
        last = chat(server, {"messages": [{"role": "user", "content": "hi"}]})
        assert codes == [200, 200, 429]
        assert "2 per minute are allowed" in last.json()["error"]["message"]
    finally:
        server.stop()


def test_nothing_is_written_to_disk_without_logging(strict_server, tmp_path):
    root = Path(__file__).resolve().parent.parent
    before = {p for p in Path("/tmp").glob("owl-*.png")}
    chat(
        strict_server,
        {
            "messages": [
                *image_message(RED),
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "sure?"},
            ]
        },
    )
    assert not (root / "logs").exists()
    assert {p for p in Path("/tmp").glob("owl-*.png")} == before


def test_conversation_log_when_switched_on(tmp_path):
    from owl.chatlog import ConversationLog
    from owl.conversation import Conversation

    log = ConversationLog(tmp_path, enabled=True)
    conversation = Conversation().add_user("What colour?", [Image.new("RGB", (4, 4), (255, 0, 0))])
    log.record(conversation, "Red.", "test")
    lines = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert lines[0]["answer"] == "Red." and lines[0]["turns"][0]["text"] == "What colour?"
    assert (tmp_path / "images" / lines[0]["turns"][0]["images"][0]).is_file()
    ConversationLog(tmp_path / "off", enabled=False).record(conversation, "Red.", "test")
    assert not (tmp_path / "off").exists()


# --- image URLs, when a server allows them ---------------------------------------------------------


class _Images(http.server.BaseHTTPRequestHandler):
    routes: typing.ClassVar[dict] = {}

    def do_GET(self):
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_host(monkeypatch):
    """A local web server, with loopback let through (and only loopback) for these tests."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    original = processing.forbidden
    monkeypatch.setattr(processing, "forbidden", lambda address: address != "127.0.0.1" and original(address))
    monkeypatch.setattr(
        processing,
        "resolve",
        lambda host, port: ["127.0.0.1"] if host == "images.test" else [host] if host[0].isdigit() else [],
    )
    yield f"http://images.test:{server.server_address[1]}", _Images.routes
    server.shutdown()


def test_public_image_url_is_fetched(image_host):
    base, routes = image_host
    routes["/red.png"] = (200, {"Content-Type": "image/png"}, encode(Image.new("RGB", (5, 5), (255, 0, 0))))
    assert processing.load_image(f"{base}/red.png", allow_urls=True).getpixel((2, 2)) == (255, 0, 0)


def test_redirect_to_a_metadata_address_is_refused(image_host):
    base, routes = image_host
    routes["/hop"] = (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b"")
    with pytest.raises(ImageError, match="may not point to 169.254.169.254"):
        fetch_url(f"{base}/hop")


def test_too_many_redirects(image_host):
    base, routes = image_host
    routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(ImageError, match="redirected more than 3 times"):
        fetch_url(f"{base}/loop")


def test_url_size_limit(image_host):
    base, routes = image_host
    routes["/big"] = (200, {"Content-Type": "image/png"}, b"x" * 5000)
    with pytest.raises(ImageTooLarge, match="larger than"):
        fetch_url(f"{base}/big", ImageLimits(max_bytes=1000))


def test_url_http_error_is_named(image_host):
    base, _ = image_host
    with pytest.raises(ImageError, match="answered HTTP 404"):
        fetch_url(f"{base}/missing.png")
