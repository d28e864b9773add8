"""Conversation logging, off unless ``--log-conversations``/``OWL_LOG_CONVERSATIONS`` is set.

Without it nothing a user sends is written to disk by Owl. With it, each answered request
appends one JSON line to ``<log_dir>/<date>.jsonl`` (system line, turns, answer, where it came
from) and stores each image once as ``<log_dir>/images/<sha256>.png``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ConversationLog:
    def __init__(self, folder: str | Path, enabled: bool):
        self.folder = Path(folder)
        self.enabled = enabled
        self._lock = threading.Lock()

    def record(self, conversation, answer: str, source: str) -> None:
        if not self.enabled:
            return
        try:
            turns = [
                {"role": t.role, "text": t.text, "images": [self._store(i) for i in t.images]}
                for t in conversation.turns
            ]
            line = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "source": source,
                "system": conversation.system,
                "turns": turns,
                "answer": answer,
            }
            with self._lock:
                self.folder.mkdir(parents=True, exist_ok=True)
                with (self.folder / f"{time.strftime('%Y-%m-%d')}.jsonl").open("a") as handle:
                    handle.write(json.dumps(line) + "\n")
        except Exception:
            log.exception("could not write the conversation log")

    def _store(self, image: Any) -> str:
        from owl.processing import load_image

        picture = load_image(image)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        path = self.folder / "images" / f"{digest}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return path.name
