"""The LLaMA language model over the engine's slot cache, as one plain function per decoder layer.

transformers' ``LlamaDecoderLayer`` launches about fifty small kernels per layer and token
(RMSNorm alone is eight: cast, square, mean, add, rsqrt, multiply, cast, scale), so a 7B
decode step spends more GPU time between its matrix products than in them. Here a layer is
one function of plain tensors, with the q/k/v projections merged into one product and gate/up
into another. The weights stay the model's own: the merged matrices are new storage, and each
original ``nn.Linear`` weight becomes a view into it, so no memory is added and the model still
answers through transformers as before.

Because every layer has the same shapes, ``torch.compile`` traces the function once and reuses
it for all layers; Inductor fuses each run of element-wise work (norm, rotary embedding with the
cache write, SiLU-and-multiply, residual add) into one kernel. Eager, the function computes
what transformers' layer does, op for op, which is how the tests check it on CPU; there a
product of a few rows runs with the weights on the left (``few_rows_linear``), the same values
to float32's rounding.

Data flow of one layer, B rows of Q new tokens, writing rows ``rows`` of the cache and reading
rows ``first .. first + B - 1`` up to ``span`` positions::

    h (B, Q, D) → RMSNorm → [q | k | v] = x W_qkv → rotary(q, k) → k, v into the cache
      → SDPA(q, cache keys, cache values, mask) → W_o → + h
      → RMSNorm → [gate | up] = x W_gu → SiLU(gate) · up → W_down → + h
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm: computed in float32, cast back, then scaled (the order transformers uses)."""
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def prompt_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(n, 1, L, L) causal mask of right-padded prompts: token i sees tokens 0..i that are real."""
    steps = torch.arange(width, device=lengths.device)
    causal = steps.view(1, width, 1) >= steps.view(1, 1, width)  # (1, L, L)
    valid = steps.view(1, -1) < lengths.view(-1, 1)  # (n, L) real tokens
    return (causal & valid.view(-1, 1, width)).unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a CPU. With a few rows (2 to 64) the matrix library there
    multiplies faster with the weights on the left, ``(W xᵀ)ᵀ``: a decode step of 8 rows of a 45 M
    model's layers and head in about 0.9 of the time. One row, or more than 64, go to ``F.linear``."""
    rows = x.numel() // x.shape[-1]
    if rows == 1 or rows > 64:
        return F.linear(x, weight)
    product = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    return product.reshape(*x.shape[:-1], weight.shape[0])


def decoder_layer(
    h: torch.Tensor,  # (B, Q, D)
    cos: torch.Tensor,  # (B, 1, Q, d)
    sin: torch.Tensor,  # (B, 1, Q, d)
    mask: torch.Tensor,  # (B, 1, Q, span) additive: 0 where a new token sees a cached position, -inf not
    write: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # cache index of each new (row, head, token)
    keys: torch.Tensor,  # (slots, heads, max_len, d) this layer's cache, written in place
    values: torch.Tensor,
    first: int,
    span: int,
    weights: tuple[torch.Tensor, ...],  # norm1, qkv, o, norm2, gate_up, down
    eps: float,
    heads: int,
    scale: float,
    linear=F.linear,  # or few_rows_linear, on a CPU
) -> torch.Tensor:
    norm1, qkv_weight, o_weight, norm2, gate_up_weight, down_weight = weights
    batch, length, width = h.shape
    x = rms_norm(h, norm1, eps)
    qkv = linear(x, qkv_weight).view(batch, length, 3 * heads, -1).transpose(1, 2)  # (B, 3h, Q, d)
    q, k, v = qkv.split(heads, dim=1)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    keys.index_put_(write, k)
    values.index_put_(write, v)
    rows = slice(first, first + batch)
    attended = F.scaled_dot_product_attention(
        q, keys[rows, :, :span], values[rows, :, :span], attn_mask=mask, dropout_p=0.0, scale=scale
    )  # (B, h, Q, d)
    h = h + linear(attended.transpose(1, 2).reshape(batch, length, width), o_weight)
    gate, up = linear(rms_norm(h, norm2, eps), gate_up_weight).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, down_weight)


def _merge(linears: list[nn.Linear]) -> torch.Tensor:
    """One weight matrix for several projections of the same input; each keeps a view of its rows.

    Merged once per model: a second engine on the same model finds the views in place and reuses them.
    """
    merged = getattr(linears[0], "_owl_merged", None)
    if merged is not None and _views_of(merged, linears):
        return merged
    merged = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = merged[start : start + rows]
        start += rows
    linears[0]._owl_merged = merged
    return merged


def _views_of(merged: torch.Tensor, linears: list[nn.Linear]) -> bool:
    start = 0
    for linear in linears:
        weight = linear.weight
        if weight.data_ptr() != merged[start].data_ptr() or weight.shape[1:] != merged.shape[1:]:
            return False
        start += weight.shape[0]
    return start == merged.shape[0]


class FusedLlama:
    """The slot-cache forward of a ``LlamaForCausalLM`` through ``decoder_layer``."""

    def __init__(self, language_model, *, compile: bool = False):
        config = language_model.config
        self.lm = language_model
        self.eps = config.rms_norm_eps
        self.heads = config.num_attention_heads
        self.scale = language_model.model.layers[0].self_attn.scaling
        self.layers = []
        with torch.no_grad():
            for layer in language_model.model.layers:
                attention, mlp = layer.self_attn, layer.mlp
                self.layers.append(
                    (
                        layer.input_layernorm.weight,
                        _merge([attention.q_proj, attention.k_proj, attention.v_proj]),
                        attention.o_proj.weight,
                        layer.post_attention_layernorm.weight,
                        _merge([mlp.gate_proj, mlp.up_proj]),
                        mlp.down_proj.weight,
                    )
                )
        cpu = language_model.device.type == "cpu"
        self.eager = functools.partial(decoder_layer, linear=few_rows_linear) if cpu else decoder_layer
        head = language_model.lm_head
        plain = type(head) is nn.Linear and head.bias is None  # not a quantised or biased head
        # 8 rows of an 8,000-token head on a CPU: 1.3 ms with the weights on the left, not 3.3.
        self.head = functools.partial(few_rows_linear, weight=head.weight) if cpu and plain else head
        self.layer = self.eager
        self.norm = rms_norm
        self.compiled = False
        if compile:
            # One trace serves every layer (same shapes); batch size, span and prompt length become
            # symbolic after their first change, so a handful of compilations cover all steps.
            # Dynamo's default of 8 compilations per function is too few for the 0/1 and
            # size specialisations of batch, prompt length and slot offset; past the limit it
            # would quietly run new shapes eagerly.
            limit = getattr(torch._dynamo.config, "recompile_limit", 8)
            torch._dynamo.config.recompile_limit = max(limit, 64)
            self.layer = torch.compile(decoder_layer, fullgraph=True)
            self.norm = torch.compile(rms_norm, fullgraph=True)
            self.compiled = True

    @staticmethod
    def supports(language_model) -> str | None:
        """None if ``FusedLlama`` computes this model exactly; else why not."""
        from transformers import LlamaForCausalLM

        if not isinstance(language_model, LlamaForCausalLM):
            return f"{type(language_model).__name__} is not LlamaForCausalLM"
        config = language_model.config
        if config.num_key_value_heads != config.num_attention_heads:
            return "grouped-query attention"
        if getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads):
            return f"head_dim {config.head_dim} with hidden_size {config.hidden_size}"
        if config.hidden_act != "silu":
            return f"activation {config.hidden_act}"
        for layer in language_model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for linear in (
                attention.q_proj,
                attention.k_proj,
                attention.v_proj,
                attention.o_proj,
                mlp.gate_proj,
                mlp.up_proj,
                mlp.down_proj,
            ):
                if type(linear) is not nn.Linear:
                    return f"{type(linear).__name__} projections (quantized weights)"
                if linear.bias is not None:
                    return "projections with a bias"
        return None

    def hidden(
        self,
        embeds: torch.Tensor,  # (B, Q, D)
        positions: torch.Tensor,  # (B, Q)
        mask: torch.Tensor,  # (B, 1, Q, span) bool: which cached positions each new token sees
        cache,
        rows: torch.Tensor,  # (B,) cache slots written
        first: int,  # slots read: first .. first + B - 1
    ) -> torch.Tensor:
        """The final-normed hidden states (B, Q, D); every layer's keys and values land in the cache."""
        span = mask.shape[-1]
        # SDPA turns a boolean mask into an additive one on every call; done once here, every layer
        # reuses it (on a GPU: two kernels a step instead of two a layer).
        mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=embeds.device).masked_fill_(
            ~mask, float("-inf")
        )
        cos, sin = self.lm.model.rotary_emb(embeds, positions)  # (B, Q, d) each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        write = (rows.view(-1, 1, 1), cache.head_index, positions.unsqueeze(1))  # (B, h, Q)
        try:
            return self._forward(embeds, cos, sin, mask, write, cache, first, span)
        except torch.OutOfMemoryError:
            raise
        except Exception:
            if not self.compiled:
                raise
            # A compiler failure must not take serving down: the same function runs eagerly.
            log.exception("compiled LLaMA layers failed; running them eagerly from now on")
            self.layer, self.norm, self.compiled = self.eager, rms_norm, False
            return self._forward(embeds, cos, sin, mask, write, cache, first, span)

    def _forward(self, embeds, cos, sin, mask, write, cache, first: int, span: int) -> torch.Tensor:
        h = embeds
        for index, weights in enumerate(self.layers):
            h = self.layer(
                h,
                cos,
                sin,
                mask,
                write,
                cache.keys[index],
                cache.values[index],
                first,
                span,
                weights,
                self.eps,
                self.heads,
                self.scale,
            )
        return self.norm(h, self.lm.model.norm.weight, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)
