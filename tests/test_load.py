"""Load: 32 clients at once through gradio_client against the embedded model, each with its own picture.

Every client draws a different object (colour and shape) and asks its colour. Under load each
answer must equal the answer the same picture gets alone (greedy decoding is deterministic, so
any cross-talk between requests would show), with no errors. Latency percentiles are printed.
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest
from gradio_client import Client, handle_file

from owl.checkpoint import DEFAULT_CHECKPOINT
from tests.conftest import RunningServer

CLIENTS = 32
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]

pytestmark = pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT / "config.json").is_file(), reason="no embedded model"
)


def pictures(folder) -> list[tuple[str, str, str]]:
    """(path, colour, shape) for 32 different one-object scenes."""
    from owl.data.scenes import Scene, Shape, contrasts, render

    out = []
    for i in range(CLIENTS):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS) + i) % len(SHAPES)]
        background = next(b for b in ("white", "black", "grey", "beige") if contrasts(colour, b))
        scene = Scene(background, (Shape(shape, colour, "large", 0.3 + 0.4 * (i % 2), 0.5, 0.16),))
        path = folder / f"client-{i}.png"
        render(
            scene, width=160 + 8 * i, height=120 + 4 * i, antialias=True, noise=0.0, jpeg_quality=None
        ).save(path)
        out.append((str(path), colour, shape))
    return out


def test_thirty_two_clients_each_get_the_answer_about_their_own_image(tmp_path):
    server = RunningServer("--max-batch", "8", "--queue-size", "64", env={"OWL_REQUESTS_PER_MINUTE": "0"})
    try:
        params = {"max_new_tokens": 8, "do_sample": False}
        jobs = [(path, f"What colour is the {shape}?", colour) for path, colour, shape in pictures(tmp_path)]
        alone_client = Client(server.url, verbose=False)
        alone = [
            alone_client.predict(q, [handle_file(p)], [], params, api_name="/generate") for p, q, _ in jobs
        ]

        results: list[str | None] = [None] * CLIENTS
        errors: list[str] = []
        latencies: list[float] = []
        start = threading.Barrier(CLIENTS)

        def client(index: int) -> None:
            path, question, _ = jobs[index]
            try:
                own = Client(server.url, verbose=False)
                start.wait(30)
                began = time.monotonic()
                results[index] = own.predict(question, [handle_file(path)], [], params, api_name="/generate")
                latencies.append(time.monotonic() - began)
            except Exception as err:
                errors.append(f"client {index}: {err}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        latencies.sort()
        print(
            f"\n{CLIENTS} concurrent clients: latency p50 {statistics.median(latencies):.2f} s, "
            f"p99 {latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]:.2f} s, "
            f"max {latencies[-1]:.2f} s"
        )
        assert errors == []
        assert results == alone, "an answer under load differs from the same picture's answer alone"
        right = sum(
            answer.strip().lower().startswith(colour)
            for answer, (_, _, colour) in zip(results, jobs, strict=True)
        )
        assert right >= 0.9 * CLIENTS, f"only {right}/{CLIENTS} answers name the right colour: {results}"
    finally:
        server.stop()
