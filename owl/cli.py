"""Chat in the terminal.

    python -m owl.cli --image a.png --image b.jpg "Which image has a red circle?"
    python -m owl.cli --checkpoint MAGAer13/mplug-owl-llama-7b          # interactive

With a question it streams one answer and exits; without, it is a multi-turn chat where
``/image PATH`` attaches an image to the next message, ``/reset`` starts over and ``/quit`` ends.
"""

from __future__ import annotations

import argparse
import sys

import owl
from owl.config import DEMO_SYSTEM
from owl.sampling import GenerationParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m owl.cli", description="Chat with an mPLUG-Owl model.")
    parser.add_argument("question", nargs="?", help="ask once and exit; omit for an interactive chat")
    parser.add_argument(
        "--checkpoint", help="a .pth, a folder, a hub id, or random:PRESET (default: embedded model)"
    )
    parser.add_argument("--tokenizer", help="tokenizer.model, if not beside the checkpoint")
    parser.add_argument("--config", help="a config.json or preset name, if not beside the checkpoint")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--image", action="append", default=[], help="an image for the question (repeatable)")
    parser.add_argument("--system", default=DEMO_SYSTEM, help="the system line")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = GenerationParams(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
        loaded = owl.load(
            args.checkpoint,
            tokenizer=args.tokenizer,
            config=args.config,
            device=args.device,
            dtype=args.dtype,
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    conversation = owl.Conversation(system=args.system)
    if args.question is not None:
        conversation = conversation.add_user(args.question, images=args.image)
        return 0 if _answer(loaded, conversation, params) is not None else 1
    return _interactive(loaded, conversation, params, pending=list(args.image))


def _answer(loaded, conversation, params) -> str | None:
    """Stream one answer to stdout; None if it failed (the reason goes to stderr)."""
    parts = []
    try:
        for delta in owl.stream(loaded, conversation, params):
            parts.append(delta)
            print(delta, end="", flush=True)
    except ValueError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return None
    print()
    return "".join(parts).strip()


def _interactive(loaded, conversation, params, pending: list[str]) -> int:
    print(f"{loaded.name} on {loaded.device}. /image PATH attaches an image, /reset, /quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            conversation, pending = owl.Conversation(system=conversation.system), []
            continue
        if line.startswith("/image "):
            pending.append(line.removeprefix("/image ").strip())
            print(f"({len(pending)} image(s) attached to your next message)", file=sys.stderr)
            continue
        if not line and not pending:
            continue
        asked = conversation.add_user(line, images=pending)
        print("owl> ", end="", flush=True)
        reply = _answer(loaded, asked, params)
        if reply is not None:
            conversation, pending = asked.add_assistant(reply), []


if __name__ == "__main__":
    raise SystemExit(main())
