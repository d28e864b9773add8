"""Owl's web app: ``python app.py`` serves the chat page, the OpenAI-compatible API, /health and /metrics.

python app.py                                            # the embedded tiny model, on CPU
python app.py --checkpoint MAGAer13/mplug-owl-llama-7b   # the real model, on a GPU
python app.py --help                                     # every flag; defaults in configs/default.toml
"""

from __future__ import annotations

import argparse
import logging
import sys

from owl.settings import load_settings


def parse_args(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Chat with mPLUG-Owl models in the browser.")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--checkpoint",
        "--checkpoint_path",
        dest="checkpoint",
        help="a .pth, a folder, a hub id, or random:PRESET (default: the embedded model)",
    )
    model.add_argument(
        "--tokenizer", "--tokenizer_path", dest="tokenizer", help="tokenizer.model if not beside it"
    )
    model.add_argument("--config", help="config.json or preset name if not beside the checkpoint")
    model.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    model.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    bits = model.add_mutually_exclusive_group()
    bits.add_argument(
        "--load-8bit", dest="quantize", action="store_const", const="8bit", help="8-bit weights (GPU)"
    )
    bits.add_argument(
        "--load-4bit", dest="quantize", action="store_const", const="4bit", help="4-bit weights (GPU)"
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 to serve others)")
    server.add_argument("--port", type=int)
    server.add_argument("--auth", help="USER:PASSWORD for the page and the API")
    server.add_argument("--share", action="store_true", default=None, help="a public gradio.live link")
    server.add_argument("--queue-size", dest="queue_size", type=int, help="requests waiting beyond the batch")
    server.add_argument("--max-batch", dest="max_batch", type=int, help="requests decoded together")
    server.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        default=None,
        help="on a GPU, skip compiling the LLaMA layers (starts about half a minute sooner, decodes slower)",
    )
    server.add_argument("--max-images", dest="max_images", type=int, help="images per conversation")
    server.add_argument(
        "--max-new-tokens", dest="max_new_tokens", type=int, help="new tokens per answer, at most"
    )
    server.add_argument(
        "--allow-image-urls",
        dest="allow_image_urls",
        action="store_true",
        default=None,
        help="let the API fetch http(s) image URLs (public addresses only)",
    )
    server.add_argument("--max-upload-mb", dest="max_upload_mb", type=float, help="size limit per image")
    server.add_argument(
        "--requests-per-minute",
        dest="requests_per_minute",
        type=int,
        help="per browser session or API client (0: no limit)",
    )
    server.add_argument(
        "--log-conversations",
        dest="log_conversations",
        action="store_true",
        default=None,
        help="write conversations and their images to --log-dir (off: nothing is written)",
    )
    server.add_argument("--log-dir", dest="log_dir", help="where --log-conversations writes (default: logs/)")
    server.add_argument("--debug", action="store_true", help="verbose logging")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.pop("debug") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args


def main(argv: list[str] | None = None) -> int:
    from owl.server import serve

    try:
        settings = load_settings(parse_args(argv))
        serve(settings)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
