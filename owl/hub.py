"""Fetching checkpoints from the HuggingFace hub. Imports only huggingface_hub (no torch, no owl),
so the Dockerfile can run it on its own to bake weights into an image:

    python owl/hub.py MAGAer13/mplug-owl-llama-7b /opt/owl/checkpoint
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


def patterns(files: list[str]) -> list[str]:
    """What to fetch from a repository holding ``files``: config and tokenizer files, and the
    weights as safetensors when it has them, else as pickles (read later with weights_only)."""
    weights = ["*.safetensors", "*.safetensors.index.json"]
    if not any(name.endswith(".safetensors") for name in files):
        weights = ["*.bin", "*.bin.index.json", "*.pth"]
    return ["*.json", "tokenizer.model", *weights]


def download(repo_id: str, local_dir: Path | None = None) -> Path:
    """The repository's files, in the HF cache (or ``local_dir``). Offline, what the cache holds."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(repo_id)
    except Exception:
        # No network (or HF_HUB_OFFLINE): use whatever an earlier download left in the cache.
        return Path(snapshot_download(repo_id, local_files_only=True))
    return Path(snapshot_download(repo_id, local_dir=local_dir, allow_patterns=patterns(files)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Download a hub checkpoint into a folder (for offline images)."
    )
    parser.add_argument("repo_id", help="a HuggingFace hub id such as MAGAer13/mplug-owl-llama-7b")
    parser.add_argument("folder", type=Path, help="where the files go")
    args = parser.parse_args(argv)
    folder = download(args.repo_id, args.folder)
    weights = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and ".cache" not in p.parts)
    if not weights:
        print(f"{args.repo_id} gave no weights in {folder}; is it an mPLUG-Owl checkpoint?", file=sys.stderr)
        return 1
    total = sum(p.stat().st_size for p in weights)
    print(f"{args.repo_id}: {len(weights)} weight file(s), {total / 2**30:.1f} GiB in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
