"""The original mPLUG-Owl Python API, kept working on top of ``owl``.

    from interface import get_model, do_generate

    model, tokenizer, img_processor = get_model("instruction_tuned.pth", "tokenizer.model")
    prompt = '''The following is a conversation between a curious human and AI assistant. ...
    Human: <image>
    Human: Explain why this meme is funny.
    AI: '''
    print(do_generate([prompt], ["meme.jpg"], model, tokenizer, img_processor,
                      max_length=512, top_k=5, do_sample=True))

``max_length`` keeps its original meaning: it bounds the *answer*, not prompt plus answer as in
current transformers. The original output began with one start token that counted towards it,
so ``max_length=N`` gives at most N - 1 answer tokens, exactly as the original returned.
Prefer ``max_new_tokens``, which counts answer tokens only. Without either, transformers'
default ``max_length`` of 20 applies (19 answer tokens), as it did for the original.
"""

from __future__ import annotations

from typing import Any

# transformers generate arguments that do not change the answer of one greedy or sampled beam.
_IGNORED = {
    "early_stopping",
    "length_penalty",
    "return_dict_in_generate",
    "output_scores",
    "use_cache",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "num_return_sequences",
}
# transformers' GenerationConfig defaults, which the original inherited.
_TRANSFORMERS_MAX_LENGTH = 20
_TRANSFORMERS_TOP_K = 50


def get_model(
    checkpoint_path: str | None = None,
    tokenizer_path: str | None = None,
    *,
    config_path: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
):
    """Load a checkpoint (a ``.pth``, a hub folder or id; the embedded model when None).

    Returns ``(model, tokenizer, img_processor)`` as the original did.
    """
    import owl

    loaded = owl.load(
        checkpoint_path, tokenizer=tokenizer_path, config=config_path, device=device, dtype=dtype
    )
    return loaded.model, loaded.tokenizer, loaded.processor


def generation_params(**generate_kwargs: Any):
    """Map transformers-style generate kwargs onto ``GenerationParams`` (see the module docstring)."""
    from owl.sampling import GenerationParams, ParameterError

    kwargs = dict(generate_kwargs)
    for name in _IGNORED & set(kwargs):
        kwargs.pop(name)
    beams = kwargs.pop("num_beams", 1)
    if beams not in (None, 1):
        raise ParameterError(f"beam search is not supported (num_beams={beams}); use num_beams=1")
    max_length = kwargs.pop("max_length", None)
    if kwargs.get("max_new_tokens") is None:
        length = _TRANSFORMERS_MAX_LENGTH if max_length is None else int(max_length)
        if length < 2:
            raise ParameterError(f"max_length={length} leaves no room for an answer token; use 2 or more")
        kwargs["max_new_tokens"] = length - 1
    if kwargs.get("do_sample") and kwargs.get("top_k") is None:
        kwargs["top_k"] = _TRANSFORMERS_TOP_K
    if "stop_strings" in kwargs:
        kwargs["stop"] = kwargs.pop("stop_strings")
    return GenerationParams.from_kwargs(**kwargs)


def do_generate(prompts, image_list, model, tokenizer, img_processor, **generate_kwargs) -> str | list[str]:
    """Answer prompts in the mPLUG-Owl template; ``<image>`` placeholders take ``image_list`` in order.

    Images may be file paths, http(s) URLs, base64 strings or data URIs, or PIL images. One
    prompt (a string or a one-element list) gives its answer; several give a list of answers,
    each generated on its own (the original padded them into one batch and returned the first).
    """
    from owl.generation import generate
    from owl.processing import PromptError, encode_prompt, split_prompt

    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    images = [] if image_list is None else [image_list] if isinstance(image_list, str) else list(image_list)
    params = generation_params(**generate_kwargs)
    wanted = [sum(1 for s in split_prompt(p) if not isinstance(s, str)) for p in prompts]
    if sum(wanted) != len(images):
        raise PromptError(
            f"the prompts have {sum(wanted)} <image> placeholders but {len(images)} images were given"
        )
    answers = []
    start = 0
    for prompt, count in zip(prompts, wanted, strict=True):
        ids = encode_prompt(prompt, tokenizer, model.config.num_image_tokens, num_images=count)
        pixels = img_processor(images[start : start + count])
        start += count
        answers.append(generate(model, tokenizer, ids, pixels, params))
    return answers[0] if single or len(answers) == 1 else answers
