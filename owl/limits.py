"""Per-request limits of a public server, each with its own message."""

from __future__ import annotations

import collections
import threading
import time

from owl.errors import LimitExceeded, RateLimited


def check_text(text: str, settings) -> None:
    if len(text) > settings.max_text_chars:
        raise LimitExceeded(
            f"the message is {len(text)} characters; the limit is {settings.max_text_chars} per message"
        )


def check_turn_images(new: int, earlier: int, settings) -> None:
    if new > settings.max_images_per_turn:
        raise LimitExceeded(
            f"{new} images in one message; the limit is {settings.max_images_per_turn} per message"
        )
    if earlier + new > settings.max_images:
        raise LimitExceeded(
            f"this would make {earlier + new} images in the conversation; the limit is {settings.max_images}. "
            "Clear the conversation or undo a message with images"
        )


def check_new_tokens(wanted: int, settings) -> None:
    if wanted > settings.max_new_tokens:
        raise LimitExceeded(f"at most {settings.max_new_tokens} new tokens per answer on this server")


def image_limits(settings):
    """The server's per-image limits (size and pixels) as the image decoder takes them."""
    from owl.processing import ImageLimits

    return ImageLimits(max_bytes=int(settings.max_upload_mb * 2**20), max_pixels=settings.max_image_pixels)


def decode_client_image(source, settings):
    """An image a client sent inline (data URI, base64, or a URL where allowed), decoded within the
    limits at the edge: a bad image fails before it queues, and no string opens a server file."""
    from owl.processing import load_image

    return load_image(
        source, allow_urls=settings.allow_image_urls, allow_paths=False, limits=image_limits(settings)
    )


class RateLimiter:
    """At most ``per_minute`` requests per client in any 60-second window (0 turns it off)."""

    def __init__(self, per_minute: int, window_s: float = 60.0):
        self.per_minute = per_minute
        self.window_s = window_s
        self._times: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def check(self, client: str) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            times = self._times[client]
            while times and now - times[0] > self.window_s:
                times.popleft()
            if len(times) >= self.per_minute:
                wait = self.window_s - (now - times[0])
                raise RateLimited(
                    f"too many requests: {self.per_minute} per minute are allowed; try again in {wait:.0f} s"
                )
            times.append(now)
            if len(self._times) > 10_000:  # forget idle clients
                for key in [k for k, v in self._times.items() if not v or now - v[-1] > self.window_s]:
                    del self._times[key]
