"""The OpenAI-compatible API, driven by the official openai client against the running app."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import RunningServer


def data_uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def api(random_server):
    return openai.OpenAI(base_url=f"{random_server.url}/v1", api_key="unused", max_retries=0)


def two_images(question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri("static/examples/pair-left.png")}},
                {"type": "image_url", "image_url": {"url": data_uri("static/examples/pair-right.png")}},
                {"type": "text", "text": question},
            ],
        }
    ]


def test_models_lists_the_loaded_model(api):
    assert [m.id for m in api.models.list()] == ["tiny"]


def test_streamed_answer_about_two_images(api):
    stream = api.chat.completions.create(
        model="owl",
        messages=two_images("Which image has a blue circle?"),
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 3
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"])
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 2 * 9 and usage.completion_tokens <= 30


def test_non_streamed_answer_with_usage(api):
    response = api.chat.completions.create(
        model="owl",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Again"},
        ],
        max_tokens=8,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    again = api.chat.completions.create(
        model="owl", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    same = api.chat.completions.create(
        model="owl", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert again.choices[0].message.content == same.choices[0].message.content  # greedy is deterministic


@pytest.mark.parametrize(
    ("messages", "kwargs", "status", "message"),
    [
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}],
                }
            ],
            {},
            400,
            "image URLs are not allowed here",
        ),
        ([{"role": "assistant", "content": "hi"}], {}, 400, "the last message must be the user's"),
        (
            [{"role": "user", "content": "hi"}],
            {"max_tokens": 100000},
            413,
            "over this server's limit of 1024",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                }
            ],
            {},
            400,
            "not an image format we can read",
        ),
        (
            [{"role": "user", "content": "hi"}],
            {"frequency_penalty": 1.0},
            400,
            "frequency_penalty is not supported",
        ),
    ],
)
def test_errors_in_openai_shape(api, messages, kwargs, status, message):
    with pytest.raises(openai.APIStatusError, match=message) as caught:
        api.chat.completions.create(model="owl", messages=messages, **kwargs)
    assert caught.value.status_code == status
    assert caught.value.body["message"]  # the client unwraps {"error": {...}}


def test_malformed_request_is_400_not_422(random_server):
    response = httpx.post(f"{random_server.url}/v1/chat/completions", json={"messages": "hello"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_closed_stream_frees_the_engine(api, random_server):
    stream = api.chat.completions.create(
        model="owl",
        messages=[{"role": "user", "content": "Talk"}],
        max_tokens=1000,
        temperature=0,
        stream=True,
    )
    iterator = iter(stream)
    for _ in range(3):
        next(iterator)
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = json.loads(urllib.request.urlopen(f"{random_server.url}/health", timeout=5).read())
        if health["active"] == 0:
            break
        time.sleep(0.05)
    assert health["active"] == 0


def test_openapi_schema_describes_the_endpoint(random_server):
    schema = httpx.get(f"{random_server.url}/v1/openapi.json").json()
    post = schema["paths"]["/v1/chat/completions"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    properties = schema["components"]["schemas"][body]["properties"]
    assert {"messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream"} <= set(properties)
    assert {"200", "400", "429", "503"} <= set(post["responses"])
    assert "/v1/models" in schema["paths"]


def test_auth_protects_the_api():
    server = RunningServer("--checkpoint", "random:tiny", "--auth", "owl:secret")
    try:
        anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            anonymous.models.list()
        allowed = openai.OpenAI(base_url=f"{server.url}/v1", api_key="owl:secret", max_retries=0)
        assert [m.id for m in allowed.models.list()] == ["tiny"]
        assert httpx.get(f"{server.url}/health").status_code == 200  # the health check stays open
    finally:
        server.stop()
