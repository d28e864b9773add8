"""The running app through a real client: gradio_client streaming, Stop, errors, /health, /metrics."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

EXAMPLES = "static/examples"


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = get_json(f"{server.url}/health")
        if health["active"] == 0 and health["queue_depth"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the engine is still busy: {health}")


@pytest.fixture(scope="module")
def client(random_server):
    return Client(random_server.url, verbose=False)


def test_two_image_question_streams_partial_outputs(client):
    job = client.submit(
        "Which image has a blue circle?",
        [handle_file(f"{EXAMPLES}/pair-left.png"), handle_file(f"{EXAMPLES}/pair-right.png")],
        [],
        {"max_new_tokens": 40, "do_sample": False},
        api_name="/generate",
    )
    partial = list(job)
    final = job.outputs()[-1]
    assert len(partial) >= 3
    assert all(final.startswith(p) for p in partial)  # each update is the answer so far
    assert final and len(final) >= len(partial[0])


def test_history_and_images_across_turns(client):
    data = base64.b64encode(Path(f"{EXAMPLES}/red-circle.png").read_bytes()).decode()
    history = [
        {"role": "user", "text": "What is this?", "images": [f"data:image/png;base64,{data}"]},
        {"role": "assistant", "text": "A circle."},
    ]
    answer = client.predict(
        "And its colour?", [], history, {"max_new_tokens": 5, "do_sample": False}, api_name="/generate"
    )
    assert isinstance(answer, str) and answer


def test_stop_frees_the_engine_and_the_next_request_starts(client, random_server):
    job = client.submit(
        "Tell me everything.", [], [], {"max_new_tokens": 1000, "do_sample": False}, api_name="/generate"
    )
    while len(job.outputs()) < 3:
        assert not job.done(), "the answer ended before it could be stopped"
        time.sleep(0.02)
    job.cancel()
    health = wait_idle(random_server)
    assert health["status"] == "ok"
    started = time.monotonic()
    quick = client.predict("Hi", [], [], {"max_new_tokens": 4, "do_sample": False}, api_name="/generate")
    assert quick and time.monotonic() - started < 30
    metrics = urllib.request.urlopen(f"{random_server.url}/metrics", timeout=5).read().decode()
    assert 'owl_requests_total{outcome="cancelled"}' in metrics


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("x" * 5000, [], [], {}), "the message is 5000 characters; the limit is 4000"),
        (("hi", [], [], {"max_new_tokens": 5000}), "at most 1024 new tokens"),
        (("hi", [], [], {"temperature": 0, "do_sample": True}), "temperature must be above 0 when sampling"),
        (("hi", [], [], {"beams": 3}), "unknown parameters: beams"),
        (("hi", [], [{"role": "robot", "text": "x"}], {}), "role 'user' or 'assistant'"),
        (
            ("hi", [], [{"role": "user", "text": "x", "images": ["not base64 at all!"]}], {}),
            "neither a data URI, an image URL, nor base64",
        ),
    ],
)
def test_errors_are_specific(client, args, message):
    with pytest.raises(Exception, match=message):
        client.predict(*args, api_name="/generate")


def test_too_many_images_in_one_message(client):
    images = [handle_file(f"{EXAMPLES}/red-circle.png")] * 5
    with pytest.raises(Exception, match="5 images in one message; the limit is 4 per message"):
        client.predict("Count them", images, [], {}, api_name="/generate")


def test_health_and_metrics(random_server):
    health = get_json(f"{random_server.url}/health")
    assert health == {**health, "status": "ok", "model": "tiny", "device": "cpu", "layers": "fused"}
    metrics = urllib.request.urlopen(f"{random_server.url}/metrics", timeout=5).read().decode()
    for name in (
        "owl_up 1.0",
        "owl_queue_depth",
        "owl_active_sequences",
        "owl_tokens_per_second",
        "owl_time_to_first_token_seconds",
        'owl_model_info{device="cpu"',
    ):
        assert name in metrics


def test_export_and_import_keep_the_conversation(tmp_path):
    from owl.settings import Settings
    from owl.web import export_data, history_to_conversation, import_data

    history = [
        {"role": "user", "content": [{"path": f"{EXAMPLES}/red-circle.png"}, "What colour is &lt;it&gt;?"]},
        {"role": "assistant", "content": "Red."},
        {"role": "assistant", "content": "queue full", "metadata": {"title": "⚠️ Queue full"}},
        {"role": "user", "content": ["And now?"]},
    ]
    exported = export_data(history, "Be brief.")
    assert [t["role"] for t in exported["turns"]] == ["user", "assistant", "user"]  # notes are not exported
    assert exported["turns"][0]["text"] == "What colour is <it>?"
    restored, system = import_data(json.loads(json.dumps(exported)), Settings())
    before = history_to_conversation(history, "Be brief.")
    after = history_to_conversation(restored, system)
    assert [(t.role, t.text, len(t.images)) for t in after.turns] == [
        (t.role, t.text, len(t.images)) for t in before.turns
    ]
    from PIL import Image

    picture = Image.open(after.turns[0].images[0]).convert("RGB")
    assert picture.size == (320, 240) and picture.getpixel((112, 120)) == picture.getpixel((100, 110))
    assert picture.getpixel((112, 120))[0] > 200 > picture.getpixel((112, 120))[1]  # the red circle came back


def test_the_readme_client_example_works(client):
    job = client.submit(
        "Which image has a red circle?",
        [handle_file(f"{EXAMPLES}/pair-left.png"), handle_file(f"{EXAMPLES}/red-circle.png")],
        api_name="/generate",
    )
    partial = list(job)
    assert partial and job.outputs()[-1].startswith(partial[0])
