"""8-bit and 4-bit weights for the language model through bitsandbytes (CUDA only).

The vision tower and abstractor stay in half precision: they are under a tenth of the weights
and their outputs feed every answer. ``lm_head`` stays too, as quantising it costs quality for
little memory.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_language_model(model, *, bits: int, device: torch.device) -> None:
    """Move the model to ``device``, replacing the LLM's Linear layers with bitsandbytes ones."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError("8-bit and 4-bit loading need bitsandbytes: pip install bitsandbytes") from err

    language_model = model.language_model
    for name, module in list(language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or f"{name}.{child_name}".endswith("lm_head"):
                continue
            if bits == 8:
                replacement = bnb.nn.Linear8bitLt(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    has_fp16_weights=False,
                    threshold=6.0,
                )
                replacement.weight = bnb.nn.Int8Params(
                    child.weight.data.to(torch.float16), requires_grad=False, has_fp16_weights=False
                )
            else:
                replacement = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.float16,
                    quant_type="nf4",
                )
                replacement.weight = bnb.nn.Params4bit(
                    child.weight.data.to(torch.float16), requires_grad=False, quant_type="nf4"
                )
            if child.bias is not None:
                replacement.bias = nn.Parameter(child.bias.data.to(torch.float16), requires_grad=False)
            # Moving to the GPU is what quantises the weights; one layer at a time keeps memory flat.
            setattr(module, child_name, replacement.to(device))
    model.to(device=device)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype == torch.float32:
            param.data = param.data.to(torch.float16)
