"""Next-token choice for a batch whose rows each have their own parameters.

The semantics follow transformers' logits processors, in their order: repetition penalty, no
repeat n-gram, then temperature, top-k, top-p, and greedy or multinomial choice. Each function
works on (B, V) logits with per-row settings so the serving engine can decode rows with
different requests in one step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from owl.errors import ParameterError
from owl.params import GenerationParams

__all__ = ["GenerationParams", "ParameterError", "choose", "make_generator", "warp"]


def apply_repetition_penalty(
    logits: torch.Tensor, history: Sequence[Sequence[int]], penalties: Sequence[float]
) -> None:
    """In place: divide positive and multiply negative logits of already seen tokens."""
    for row, (seen, penalty) in enumerate(zip(history, penalties, strict=True)):
        if penalty == 1.0 or not seen:
            continue
        index = torch.tensor(sorted(set(seen)), device=logits.device)
        values = logits[row, index]
        logits[row, index] = torch.where(values < 0, values * penalty, values / penalty)


def apply_no_repeat_ngram(
    logits: torch.Tensor, history: Sequence[Sequence[int]], sizes: Sequence[int]
) -> None:
    """In place: forbid every token that would repeat an n-gram already in the row's history."""
    for row, (seen, n) in enumerate(zip(history, sizes, strict=True)):
        if n <= 0 or len(seen) + 1 < n:
            continue
        prefix = tuple(seen[len(seen) - n + 1 :]) if n > 1 else ()
        banned = {seen[i + n - 1] for i in range(len(seen) - n + 1) if tuple(seen[i : i + n - 1]) == prefix}
        if banned:
            logits[row, sorted(banned)] = -float("inf")


def warp(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Temperature, top-k and top-p for every row at once; each argument is one value per row."""
    logits = logits / temperature.unsqueeze(1)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    logits = logits.masked_fill(logits < kth, -float("inf"))
    # Top-p as transformers does it: drop the low tail whose mass is at most 1 - top_p, keep at least one.
    ordered, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p).unsqueeze(1)
    drop[:, -1] = False
    drop = drop & (top_p < 1).unsqueeze(1)
    return logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))


def choose(
    logits: torch.Tensor,
    params: Sequence[GenerationParams],
    history: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of (B, V) logits; ``history`` is each row's tokens so far."""
    if not any(p.do_sample or p.repetition_penalty != 1.0 or p.no_repeat_ngram_size for p in params):
        return logits.argmax(dim=-1).tolist()  # all greedy: one small read-back, nothing else
    logits = logits.float()
    apply_repetition_penalty(logits, history, [p.repetition_penalty for p in params])
    apply_no_repeat_ngram(logits, history, [p.no_repeat_ngram_size for p in params])
    greedy = logits.argmax(dim=-1)
    sampled_rows = [row for row, p in enumerate(params) if p.do_sample]
    if not sampled_rows:
        return greedy.tolist()
    rows = torch.tensor(sampled_rows, device=logits.device)
    chosen = [params[r] for r in sampled_rows]
    warped = warp(
        logits[rows],
        torch.tensor([p.temperature for p in chosen], device=logits.device),
        torch.tensor([p.top_k for p in chosen], device=logits.device),
        torch.tensor([p.top_p for p in chosen], device=logits.device),
    )
    probs = warped.softmax(dim=-1).cpu()
    result = greedy.tolist()
    for i, row in enumerate(sampled_rows):
        result[row] = int(torch.multinomial(probs[i], 1, generator=generators[row]).item())
    return result


def make_generator(params: GenerationParams) -> torch.Generator | None:
    """A per-request random stream; seeded requests sample the same answer every time."""
    if not params.do_sample:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator
