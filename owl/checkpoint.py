"""Loading every released checkpoint through one code path, and our own export.

Accepted checkpoints:

* the first release: one ``.pth`` state dict (``pretrained.pth``, ``instruction_tuned.pth``) with a
  ``tokenizer.model``; a hub-schema ``config.json`` beside it describes the architecture,
  otherwise the first release's 7B defaults apply;
* a HuggingFace folder or hub id (``MAGAer13/mplug-owl-llama-7b``, ``-pt``, ``-ft``, ``-video``,
  ``mplug-owl-bloomz-7b-multilingual``): ``config.json``, ``pytorch_model*.bin`` or
  ``*.safetensors`` (sharded with an index or not), tokenizer files;
* our export (``save_export``): the hub schema with ``model.safetensors``, reloaded bit for bit;
* ``random:<preset>``: random weights at a preset's size, for tests and benchmarks.

The model is built on the meta device and each tensor is read lazily (safetensors, or
``torch.load(mmap=True, weights_only=True)``, never a full unpickle), cast, and assigned in
place, so host memory peaks near one copy of the weights. Every missing or unexpected key is
an error naming the keys, except the short allow-list below.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from owl.config import CLIP_MEAN, CLIP_STD, PRESETS, ConfigError, OwlConfig, preset
from owl.model import OwlModel, init_weights
from owl.processing import ImageProcessor
from owl.tokenizer import TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

# The embedded model shipped with the repository (see models/owl-tiny/README.md).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "owl-tiny"

# Keys a checkpoint may hold that the model does not: buffers recomputed at load time.
SKIPPED_BUFFERS = (
    "rotary_emb.inv_freq",  # RoPE frequencies, saved by the transformers versions of 2023
    "vision_model.embeddings.position_ids",  # an unused arange in the first release
)
# The video checkpoint's temporal adapters: zero-initialised and only active for multi-frame input,
# so image chat through the image path is exactly the video model's image behaviour.
VIDEO_ONLY = re.compile(
    r"^(temporal_query_tokens|vision_model\.encoder\.layers\.\d+\.temporal\.|abstractor\.temporal_visual_fc\.)"
)

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to pass."""


@dataclass
class Resolved:
    """Where a checkpoint's parts are."""

    name: str
    weights: list[Path] = field(default_factory=list)
    config: Path | None = None
    tokenizer: Path | None = None
    preprocessor: Path | None = None
    random_preset: str | None = None


@dataclass
class Loaded:
    """A model ready to run, with what it needs around it."""

    model: OwlModel
    tokenizer: Any
    processor: ImageProcessor
    config: OwlConfig
    name: str
    device: torch.device
    dtype: torch.dtype
    quantization: str | None = None
    random_weights: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "layout": self.config.layout,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.quantization,
            "parameters": self.model.num_parameters(),
            "random_weights": self.random_weights,
            "image_size": self.config.vision.image_size,
        }


# --- finding the files ---------------------------------------------------------------------------


def resolve(checkpoint: str | Path | None) -> Resolved:
    """Find weights, config and tokenizer for a path, hub id, ``random:<preset>`` or the default."""
    if checkpoint is None:
        if not (DEFAULT_CHECKPOINT / "config.json").is_file():
            raise CheckpointError(
                f"the embedded model is missing from {DEFAULT_CHECKPOINT}; pass --checkpoint PATH_OR_HUB_ID"
            )
        checkpoint = DEFAULT_CHECKPOINT
    text = str(checkpoint)
    if text.startswith("random:"):
        name = text.removeprefix("random:")
        preset(name)  # validates the name
        return Resolved(name=f"random {name}", random_preset=name)
    path = Path(text).expanduser()
    if path.is_file():
        return _resolve_file(path)
    if path.is_dir():
        return _resolve_folder(path, name=path.name)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        return _resolve_folder(_download(text), name=text)
    raise CheckpointError(f"no checkpoint at {text!r}: not a file, a folder, nor a HuggingFace hub id")


def _resolve_file(path: Path) -> Resolved:
    if path.suffix not in (".pth", ".pt", ".bin", ".safetensors"):
        raise CheckpointError(f"{path.name}: expected a .pth, .pt, .bin or .safetensors weights file")
    folder = path.parent
    return Resolved(
        name=path.stem,
        weights=[path],
        config=_existing(folder / "config.json"),
        tokenizer=_existing(folder / "tokenizer.model") or _existing(folder / "tokenizer.json"),
        preprocessor=_existing(folder / "preprocessor_config.json"),
    )


def _resolve_folder(folder: Path, *, name: str) -> Resolved:
    weights: list[Path] = []
    for candidate in WEIGHT_FILES:
        path = folder / candidate
        if not path.is_file():
            continue
        if candidate.endswith(".index.json"):
            index = json.loads(path.read_text())
            shards = sorted(set(index.get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{path.name} lists shards that are not in {folder}: {', '.join(missing)}"
                )
            weights = [folder / s for s in shards]
        else:
            weights = [path]
        break
    if not weights:
        loose = sorted(folder.glob("*.pth")) + sorted(folder.glob("*.pt"))
        if len(loose) == 1:
            weights = loose
    if not weights:
        raise CheckpointError(
            f"{folder} holds no weights: expected model.safetensors, pytorch_model.bin (or sharded with "
            "an index) or a single .pth"
        )
    return Resolved(
        name=name,
        weights=weights,
        config=_existing(folder / "config.json"),
        tokenizer=_existing(folder / "tokenizer.model") or _existing(folder / "tokenizer.json"),
        preprocessor=_existing(folder / "preprocessor_config.json"),
    )


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _download(repo_id: str) -> Path:
    """Fetch a hub repository's config, tokenizer and weights (safetensors preferred) into the HF cache."""
    from owl.hub import download

    try:
        return download(repo_id)
    except Exception as err:  # network, auth, missing repos, and an empty cache offline all end here
        raise CheckpointError(
            f"could not get {repo_id} from the HuggingFace hub ({type(err).__name__}: {err}); "
            "check the name and your network, or pass a local folder"
        ) from err


# --- reading tensors -----------------------------------------------------------------------------


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one weights file, read lazily; pickles are read with weights_only."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield key, handle.get_tensor(key)
        return
    state = _torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("module"), dict):
        state = state["module"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} holds a {type(state).__name__}, not a state dict of tensors")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path.name}: entry {key!r} is a {type(value).__name__}, not a tensor")
        yield key, value


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path.name}: it holds pickled objects other than tensors, which could run "
            f"code when loaded ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from None
    except RuntimeError as err:
        if "mmap" not in str(err) and "zip" not in str(err).lower():
            raise CheckpointError(f"cannot read {path.name}: {err}") from None
    # Files saved by torch < 1.6 use the legacy format, which cannot be memory-mapped.
    log.warning("%s uses the legacy torch format: loading it fully into memory", path.name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path.name}: it holds pickled objects other than tensors"
        ) from err


def read_keys(weights: list[Path]) -> list[str]:
    """The keys of a checkpoint, reading only metadata where the format allows it."""
    keys: list[str] = []
    for path in weights:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys.extend(handle.keys())
        else:
            keys.extend(key for key, _ in iter_tensors(path))
    return keys


def detect_layout(keys: list[str]) -> str:
    if "vision_model.embeddings.class_embedding" in keys:
        return "v0"
    if "vision_model.embeddings.cls_token" in keys:
        return "hub"
    raise CheckpointError(
        "the weights hold no mPLUG-Owl vision tower (neither vision_model.embeddings.cls_token nor "
        "vision_model.embeddings.class_embedding); is this an mPLUG-Owl checkpoint?"
    )


# --- building and filling the model --------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}") from None


def load_weights(model: OwlModel, weights: list[Path], *, device: torch.device, dtype: torch.dtype) -> None:
    """Fill a meta-device model from weight files, shard by shard; strict except the allow-list."""
    expected = dict(model.state_dict(keep_vars=True))
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    for path in weights:
        for key, tensor in iter_tensors(path):
            target = expected.get(key)
            if target is None:
                if key.endswith(SKIPPED_BUFFERS) or key in SKIPPED_BUFFERS or VIDEO_ONLY.match(key):
                    continue
                unexpected.append(key)
                continue
            if tuple(tensor.shape) != tuple(target.shape):
                mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
                loaded.add(key)  # present, reported as mismatched rather than missing
                continue
            value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            _assign(model, key, value)
            loaded.add(key)
    missing = [key for key in expected if key not in loaded and key not in _tied_keys(model)]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensors with the wrong shape:\n  " + "\n  ".join(mismatched[:20]))
        if any(".mlp.w1." in m for m in mismatched):
            problems.append(
                "the abstractor MLP width differs: early hub configs said intermediate_size 4096 while "
                "the weights have 2816; fix visual_abstractor_config.intermediate_size in config.json"
            )
    if missing:
        problems.append(f"{len(missing)} keys missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys in the checkpoint: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(
            f"the checkpoint does not match the {model.config.layout!r} layout of {model.config.name}:\n"
            + "\n".join(problems)
        )
    _materialize_buffers(model, device)
    if model.config.text.get("tie_word_embeddings"):
        model.language_model.tie_weights()


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def _tied_keys(model: OwlModel) -> set[str]:
    if not model.config.text.get("tie_word_embeddings"):
        return set()
    return {"language_model.lm_head.weight"}


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute buffers left on the meta device (RoPE tables) from their module's config."""
    for name, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        if not hasattr(module, "config"):
            raise CheckpointError(f"cannot rebuild buffers of {name}: {type(module).__name__} has no config")
        parent_name, _, leaf = name.rpartition(".")
        with torch.device("cpu"):
            rebuilt = type(module)(config=module.config)
        rebuilt = rebuilt.to(device)  # RoPE tables stay float32, as transformers keeps them
        setattr(model.get_submodule(parent_name), leaf, rebuilt)


def build_model(config: OwlConfig, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> OwlModel:
    """A model with random weights (``init_weights``), built directly on ``device`` in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else previous)
    try:
        with torch.device(device):
            model = OwlModel(config)
    finally:
        torch.set_default_dtype(previous)
    init_weights(model, seed=seed)
    return model.to(device=device, dtype=dtype).eval()


def load_config(resolved: Resolved, config: str | Path | OwlConfig | None, layout: str | None) -> OwlConfig:
    if isinstance(config, OwlConfig):
        chosen = config
    elif isinstance(config, str) and config in PRESETS:
        chosen = preset(config)
    elif config is not None:
        chosen = OwlConfig.from_json_file(config)
    elif resolved.config is not None:
        chosen = OwlConfig.from_json_file(resolved.config)
    elif layout == "v0":
        chosen = preset("mplug-owl-7b-v0")
    else:
        raise CheckpointError(
            f"{resolved.name} has no config.json; pass --config PATH (a hub-schema config.json) or a preset name "
            f"({', '.join(sorted(PRESETS))})"
        )
    if layout is not None and chosen.layout != layout:
        chosen = chosen.replace(layout=layout)
    return chosen


def load(
    checkpoint: str | Path | None = None,
    *,
    tokenizer: str | Path | None = None,
    config: str | Path | OwlConfig | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    allow_image_urls: bool = True,
) -> Loaded:
    """Load a checkpoint (see the module docstring) with its tokenizer and image processor.

    ``device`` defaults to CUDA when present; ``dtype`` to bfloat16 on GPU and float32 on CPU;
    ``quantize`` is None, "8bit" or "4bit" (bitsandbytes, GPU only).
    """
    resolved = resolve(checkpoint)
    target = torch.device(device) if device is not None else default_device()
    if target.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    torch_dtype = parse_dtype(dtype, target)
    if quantize not in (None, "8bit", "4bit"):
        raise CheckpointError(f"quantize must be '8bit' or '4bit', got {quantize!r}")
    if quantize and target.type != "cuda":
        raise CheckpointError(
            "8-bit and 4-bit loading need a CUDA GPU (bitsandbytes); drop --load-8bit/--load-4bit"
        )

    if resolved.random_preset is not None:
        # --config (a preset name or a config.json) replaces the preset's architecture, e.g. a longer context.
        owl_config = (
            preset(resolved.random_preset) if config is None else load_config(resolved, config, layout=None)
        )
        model = build_model(owl_config, device=target, dtype=torch_dtype)
    else:
        layout = detect_layout(read_keys(resolved.weights))
        try:
            owl_config = load_config(resolved, config, layout)
        except ConfigError as err:
            raise CheckpointError(str(err)) from err
        with torch.device("meta"):
            model = OwlModel(owl_config)
        load_device = torch.device("cpu") if quantize else target
        load_weights(
            model, resolved.weights, device=load_device, dtype=torch.float16 if quantize else torch_dtype
        )
        model.eval()
        if quantize:
            from owl.quantize import quantize_language_model

            quantize_language_model(model, bits=8 if quantize == "8bit" else 4, device=target)
            torch_dtype = torch.float16

    tok = _load_tokenizer(resolved, tokenizer)
    processor = _load_processor(resolved, owl_config, allow_image_urls)
    return Loaded(
        model=model,
        tokenizer=tok,
        processor=processor,
        config=owl_config,
        name=owl_config.name if resolved.random_preset else resolved.name,
        device=target,
        dtype=torch_dtype,
        quantization=quantize,
        random_weights=resolved.random_preset is not None,
    )


def _load_tokenizer(resolved: Resolved, tokenizer: str | Path | None):
    path = Path(tokenizer) if tokenizer is not None else resolved.tokenizer
    if path is None:
        if resolved.random_preset is not None:
            from owl.tokenizer import ByteTokenizer

            return ByteTokenizer(preset(resolved.random_preset).vocab_size)
        raise TokenizerError(
            f"{resolved.name} comes without a tokenizer; pass --tokenizer PATH (a tokenizer.model)"
        )
    return load_tokenizer(path)


def _load_processor(resolved: Resolved, config: OwlConfig, allow_urls: bool) -> ImageProcessor:
    mean, std, size = CLIP_MEAN, CLIP_STD, config.vision.image_size
    if resolved.preprocessor is not None:
        data = json.loads(resolved.preprocessor.read_text())
        mean = tuple(data.get("image_mean", mean))
        std = tuple(data.get("image_std", std))
    return ImageProcessor(size, mean, std, allow_urls=allow_urls)


# --- export --------------------------------------------------------------------------------------


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header (in place, its length unchanged) with the metadata in
    sorted order. The library writes the metadata from a hash map whose order changes from process
    to process, so the same weights saved twice would differ in those bytes alone; sorted, the same
    tensors and metadata make the same file, and a rebuilt model can be checked by its checksum."""
    with open(path, "r+b") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # as the library writes
        if len(text) > size:  # the same entries in another order: never longer
            raise CheckpointError(f"{path}: the header does not fit back in its {size} bytes")
        file.seek(8)
        file.write(text.ljust(size))  # the library pads its header with spaces too


def save_export(model: OwlModel, tokenizer: Any, folder: str | Path) -> Path:
    """Our layout: hub-schema config.json, model.safetensors, tokenizer.model. ``load`` reads it back."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder / "config.json")
    state = {}
    embed_ptr = model.language_model.get_input_embeddings().weight.data_ptr()
    for key, value in model.state_dict().items():
        if key.endswith(SKIPPED_BUFFERS) or "rotary_emb" in key:
            continue
        if key in _tied_keys(model) and value.data_ptr() == embed_ptr:
            continue
        value = value.detach().to("cpu").contiguous()
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            # A view into a larger tensor (the serving engine merges projections that way):
            # safetensors stores each tensor on its own.
            value = value.clone()
        state[key] = value
    path = folder / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "owl_layout": model.config.layout})
    sort_safetensors_metadata(path)
    source = getattr(tokenizer, "path", None)
    if source is not None:
        source = Path(source)
        files = (
            [(source, "tokenizer.model" if source.suffix == ".model" else source.name)]
            if source.is_file()
            else [
                (source / name, name)
                for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
            ]
        )
        for path, name in files:
            # A resumed run saves over the folder its tokenizer came from: nothing to copy then.
            if path.is_file() and (folder / name).resolve() != path.resolve():
                shutil.copyfile(path, folder / name)
    return folder


def prepare(loaded: Loaded, conversation) -> tuple[list[int], torch.Tensor]:
    """Prompt ids and pixels for a conversation awaiting its answer."""
    from owl.conversation import prompt_segments
    from owl.processing import encode_segments

    ids = encode_segments(prompt_segments(conversation), loaded.tokenizer, loaded.config.num_image_tokens)
    return ids, loaded.processor(list(conversation.images))
