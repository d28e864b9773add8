"""The mPLUG-Owl model: image → ViT → visual abstractor → projection (+ end vector) → LLM.

Data flow for one image (7B numbers)::

    pixels (3, 224, 224)
      → vision encoder: patches + class token, 24 pre-norm layers, post-norm on every token
                                                         (257, 1024)
      → abstractor: 64 learned queries cross-attend to [normed queries ; normed image tokens]
                                                         (64, 1024)
      → visual_fc, then the learned `vit_eos` vector     (65, 4096)
      → written into the LLM input embeddings where the prompt holds the 65 image slots

The language model is transformers' own causal LM (``LlamaForCausalLM``, or BLOOM for the
multilingual checkpoint). Two parameter layouts exist (see ``owl.config``): module names below
follow each release exactly so that state dicts load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from owl.config import IMAGE_TOKEN_ID, AbstractorConfig, OwlConfig, VisionConfig
from owl.errors import PromptError

# norm1, normk and norm2 of the abstractor were built with torch's default eps in both releases.
_ABSTRACTOR_NORM_EPS = 1e-5


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back: what both releases do under bf16/fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)  # (B, h, L, d)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)  # (B, L, D)


def _backward_follows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """On a CPU, with gradients to flow back through the attention."""
    return q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    dropout: float = 0.0,
    causal: bool = False,
    scale: float | None = None,
    written_out: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention of (B, h, L, d) queries over (B, h, S, d) keys and values;
    ``mask`` is boolean (True: may attend) or added to the scores, ``causal`` aligns top-left.

    ``written_out`` (training on a CPU sets it, :func:`write_out_attention`): where gradients will
    flow back through it on a CPU, two matmuls and a float32 softmax instead of torch's fused
    kernel, whose backward pass at the embedded model's sizes takes about five times as long as
    its forward. A vision step of the tiny recipe then takes 0.38 s instead of 0.49 s (1.38x); a
    language step gains less than the machine drifts (1.07x, 0.93-1.13x over three rounds,
    ``bench/train_attention.py``). Everywhere else, inference included, it is torch's
    ``scaled_dot_product_attention``."""
    if not (written_out and _backward_follows(q, k, v)):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale
        )
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    weights = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
    if dropout > 0:
        weights = F.dropout(weights, dropout)
    return weights @ v


# --- vision encoder ------------------------------------------------------------------------------


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = QuickGELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class HubVisionAttention(nn.Module):
    """Self-attention with one fused projection whose outputs are laid out per head: [q_h | k_h | v_h]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.written_out = False  # attend()'s training form (write_out_attention)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.query_key_value(x).view(batch, length, self.heads, 3, width // self.heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)  # each (B, h, L, d)
        return self.dense(_merge_heads(attend(q, k, v, written_out=self.written_out)))


class ClipVisionAttention(nn.Module):
    """The first release's CLIP-style self-attention: separate q/k/v/out projections."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.written_out = False  # attend()'s training form (write_out_attention)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(_merge_heads(attend(q, k, v, written_out=self.written_out)))


class HubVisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_layernorm = LayerNorm32(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = HubVisionAttention(config)
        self.post_attention_layernorm = LayerNorm32(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class ClipVisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm32(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ClipVisionAttention(config)
        self.layer_norm2 = LayerNorm32(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class HubVisionEmbeddings(nn.Module):
    """Conv patch embedding, class token, positions, then the pre-norm (kept inside this module)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        width = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.patch_embed = nn.Conv2d(
            config.num_channels, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_positions, width))
        self.pre_layernorm = LayerNorm32(width, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, P, D), row-major patches
        cls = self.cls_token.expand(pixels.shape[0], -1, -1).to(patches.dtype)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)  # (B, P+1, D)
        return self.pre_layernorm(x)


class ClipVisionEmbeddings(nn.Module):
    """The first release's patch embedding: a bias-free Linear over (channel, row, column)-flattened patches."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        width, patch = config.hidden_size, config.patch_size
        self.patch_size = patch
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = nn.Linear(config.num_channels * patch * patch, width, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(config.num_positions, width))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = pixels.shape
        p = self.patch_size
        patches = (
            pixels.reshape(batch, channels, height // p, p, width // p, p)
            .permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, p, p)
            .reshape(batch, (height // p) * (width // p), channels * p * p)
        )
        patches = self.patch_embedding(patches)  # (B, P, D)
        cls = self.class_embedding.to(patches.dtype).expand(batch, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)


class VisionEncoder(nn.Module):
    """ViT whose output is every token (class token included) after the final LayerNorm."""

    def __init__(self, config: VisionConfig, layout: str):
        super().__init__()
        self.layout = layout
        if layout == "v0":
            self.embeddings = ClipVisionEmbeddings(config)
            self.pre_layernorm = LayerNorm32(config.hidden_size, eps=config.layer_norm_eps)
            layer = ClipVisionLayer
        else:
            self.embeddings = HubVisionEmbeddings(config)
            layer = HubVisionLayer
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(layer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = LayerNorm32(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        if self.layout == "v0":
            x = self.pre_layernorm(x)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)  # (B, P+1, D)


# --- visual abstractor ---------------------------------------------------------------------------


class AbstractorAttention(nn.Module):
    """Queries from the normed query tokens; keys/values from [normed queries ; normed image tokens].

    The first release appends one learned key/value slot (``bias_k``/``bias_v``) to every layer.
    """

    def __init__(self, config: AbstractorConfig, extra_kv_slot: bool):
        super().__init__()
        self.heads = config.num_attention_heads
        self.written_out = False  # attend()'s training form (write_out_attention)
        self.dropout = config.attention_dropout
        width = config.hidden_size
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(config.encoder_hidden_size, width)
        self.value = nn.Linear(config.encoder_hidden_size, width)
        if extra_kv_slot:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, width))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, width))
        else:
            self.bias_k = self.bias_v = None

    def forward(self, queries: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        keys, values = self.key(source), self.value(source)  # (B, Q+P+1, D)
        if self.bias_k is not None:
            batch = source.shape[0]
            keys = torch.cat([keys, self.bias_k.expand(batch, -1, -1).to(keys.dtype)], dim=1)
            values = torch.cat([values, self.bias_v.expand(batch, -1, -1).to(values.dtype)], dim=1)
        q, k, v = (_split_heads(t, self.heads) for t in (self.query(queries), keys, values))
        dropout = self.dropout if self.training else 0.0
        return _merge_heads(attend(q, k, v, dropout=dropout, written_out=self.written_out))  # (B, Q, D)


class AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm on the hidden width: w2(ffn_ln(silu(w1 x) * w3 x))."""

    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = LayerNorm32(config.intermediate_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorOutput(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = LayerNorm32(config.hidden_size, eps=_ABSTRACTOR_NORM_EPS)
        self.mlp = AbstractorMLP(config)

    def forward(self, attended: torch.Tensor, normed_queries: torch.Tensor) -> torch.Tensor:
        # The residual is the *normalised* queries, as in both releases.
        x = normed_queries + self.out_proj(attended)
        return x + self.mlp(self.norm2(x))


class AbstractorCrossAttention(nn.Module):
    def __init__(self, config: AbstractorConfig, extra_kv_slot: bool):
        super().__init__()
        self.norm1 = LayerNorm32(config.hidden_size, eps=_ABSTRACTOR_NORM_EPS)
        self.normk = LayerNorm32(config.encoder_hidden_size, eps=_ABSTRACTOR_NORM_EPS)
        self.attention = AbstractorAttention(config, extra_kv_slot)
        self.output = AbstractorOutput(config)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        queries = self.norm1(queries)  # (B, Q, D)
        source = torch.cat([queries, self.normk(image)], dim=1)  # (B, Q+P+1, D)
        return self.output(self.attention(queries, source), queries)


class AbstractorLayer(nn.Module):
    def __init__(self, config: AbstractorConfig, extra_kv_slot: bool):
        super().__init__()
        self.crossattention = AbstractorCrossAttention(config, extra_kv_slot)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.crossattention(queries, image)


class VisualAbstractor(nn.Module):
    """Cross-attention stack over the image tokens, projection to the LLM width, and the end vector."""

    def __init__(self, config: AbstractorConfig, text_width: int, extra_kv_slot: bool):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            AbstractorLayer(config, extra_kv_slot) for _ in range(config.num_hidden_layers)
        )
        self.visual_fc = nn.Linear(config.hidden_size, text_width)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, text_width))

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layers:
            queries = layer(queries, image)
        projected = self.visual_fc(queries)  # (B, Q, H)
        eos = self.vit_eos.expand(projected.shape[0], -1, -1).to(projected.dtype)
        return torch.cat([projected, eos], dim=1)  # (B, Q+1, H)


# --- the whole model -----------------------------------------------------------------------------


class ImageSlotError(PromptError):
    """The prompt's image slots and the given images do not match."""


def build_language_model(text: dict) -> nn.Module:
    """transformers' own causal LM for the text config (LLaMA, or BLOOM for the multilingual model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(text)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    # SDPA where the architecture has it (LLaMA); BLOOM's ALiBi attention is transformers' eager one.
    attention = "sdpa" if model_type == "llama" else "eager"
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention)


def language_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention for the language model, written out as :func:`attend` does
    where a backward pass will follow on a CPU (:func:`write_out_attention` puts it in)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not _backward_follows(query, key, value) or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal  # as transformers decides
    if causal:  # top-left alignment, as SDPA's, holds once keys beyond the queries are cut
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    out = attend(
        query, key, value, attention_mask, dropout=dropout, causal=causal, scale=scaling, written_out=True
    )
    return out.transpose(1, 2).contiguous(), None


def write_out_attention(model: OwlModel) -> None:
    """Train with attention written out (:func:`attend`): the vision tower's and the abstractor's
    attention, and the language model's through :func:`language_attention`. Models loaded for
    inference never have it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for module in model.modules():
        if hasattr(module, "written_out"):
            module.written_out = True
    language_model = model.language_model
    if language_model.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register("owl", language_attention)
    AttentionMaskInterface.register("owl", sdpa_mask)  # the masks SDPA is given
    language_model.set_attn_implementation("owl")


class OwlModel(nn.Module):
    """mPLUG-Owl: ``encode_images`` → ``embed`` (the one splice) → ``language_model``."""

    def __init__(self, config: OwlConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionEncoder(config.vision, config.layout)
        self.query_tokens = nn.Parameter(
            torch.zeros(1, config.num_query_tokens, config.abstractor.hidden_size)
        )
        self.abstractor = VisualAbstractor(
            config.abstractor, config.text_hidden_size, extra_kv_slot=config.layout == "v0"
        )
        self.language_model = build_language_model(config.text)
        self._text_embedding_norm = _detach_bloom_embedding_norm(self.language_model)

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query_tokens.dtype

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels → (N, num_image_tokens, text width) LLM input vectors."""
        pixels = pixels.to(device=self.device, dtype=self.vision_model.post_layernorm.weight.dtype)
        return self.gather(self.vision_model(pixels))

    def gather(self, image: torch.Tensor) -> torch.Tensor:
        """(N, P+1, Dv) vision tokens → (N, num_image_tokens, text width), read by the abstractor's queries."""
        queries = self.query_tokens.expand(image.shape[0], -1, -1)  # (N, Q, Da)
        return self.abstractor(queries, image)  # (N, Q+1, H)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of text ids only (decode steps): no image slots, nothing read back from the device."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        return embeds if self._text_embedding_norm is None else self._text_embedding_norm(embeds)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with every image slot (id ``IMAGE_TOKEN_ID``) replaced by image vectors.

        Images fill the slots in order of appearance, row by row. ``image_embeds`` is
        (N, num_image_tokens, H); the number of slots must be exactly N × num_image_tokens.
        """
        slots = input_ids == IMAGE_TOKEN_ID  # (B, L)
        embeds = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))  # (B, L, H)
        if self._text_embedding_norm is not None:
            # BLOOM normalises word embeddings; the releases apply that to text only, not to images.
            embeds = self._text_embedding_norm(embeds)
        num_slots = int(slots.sum())
        num_vectors = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if num_slots != num_vectors:
            per_image = self.config.num_image_tokens
            given = 0 if image_embeds is None else image_embeds.shape[0]
            raise ImageSlotError(
                f"the prompt has {num_slots} image slots ({num_slots / per_image:g} images of {per_image} "
                f"slots) but {given} images were given ({num_vectors} vectors)"
            )
        if num_slots:
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """Training / scoring forward: the language model's output on the spliced embeddings."""
        image_embeds = (
            None if pixel_values is None or pixel_values.numel() == 0 else self.encode_images(pixel_values)
        )
        embeds = self.embed(input_ids, image_embeds)
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _detach_bloom_embedding_norm(language_model: nn.Module):
    """For BLOOM, move the word-embedding LayerNorm out of the LM so images can bypass it.

    The parameter stays where it is (state-dict keys are unchanged); only BLOOM's own call of it
    becomes the identity, and ``OwlModel.embed`` applies it to the text embeddings.
    """
    transformer = getattr(language_model, "transformer", None)
    norm = getattr(transformer, "word_embeddings_layernorm", None)
    if norm is None:
        return None
    original_forward = norm.forward
    norm.forward = lambda x: x
    return original_forward


def init_weights(model: OwlModel, *, seed: int = 0, std: float | None = 0.02) -> OwlModel:
    """Random weights: normal matrices, unit norms, zero biases.

    ``std`` fixes the spread of every matrix (0.02 is LLaMA's); ``None`` scales each matrix by
    1/sqrt(fan-in) instead, which a small model trained from scratch needs: at widths of a few
    hundred, 0.02 shrinks the image signal layer after layer until the language model cannot
    tell two pictures apart (token tables and learned vectors keep 0.02). Values are drawn on each
    parameter's own device, so a 7B model initialises in seconds on a GPU.
    """
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device.type == "meta":
                continue
            if name.endswith("bias") and "bias_k" not in name and "bias_v" not in name:
                param.zero_()
            elif _is_norm_weight(name):
                param.fill_(1.0)
            else:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                spread = std if std is not None or not _is_matrix(name, param) else param[0].numel() ** -0.5
                noise = torch.randn(param.shape, generator=generators[param.device], device=param.device)
                param.copy_((noise * (spread if spread is not None else 0.02)).to(param.dtype))
    return model


def _is_matrix(name: str, param: torch.Tensor) -> bool:
    """A projection (Linear/Conv weight), as opposed to token tables and learned vectors."""
    return (
        param.ndim >= 2
        and name.endswith("weight")
        and "embed_tokens" not in name
        and "word_embeddings" not in name
    )


def _is_norm_weight(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    return (
        len(leaf) >= 2
        and leaf[-1] == "weight"
        and ("norm" in leaf[-2] or leaf[-2].startswith(("ln", "ffn_ln")))
    )
