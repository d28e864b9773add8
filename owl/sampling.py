"""Next-token choice for a batch whose rows each have their own parameters.

The semantics follow transformers' logits processors, in their order: repetition penalty, no
repeat n-gram, then temperature, top-k, top-p, and greedy or sampled choice. Each function
works on (B, V) logits with per-row settings so the serving engine can decode rows with
different requests in one step. All of it runs on the logits' device as a few batched
operations: the penalties read the histories as one (B, T) tensor, not token by token in
Python, and sampling reads back only the chosen tokens, not (B, V) probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from owl.errors import ParameterError
from owl.params import GenerationParams

__all__ = ["GenerationParams", "ParameterError", "TokenHistory", "choose", "make_generator", "warp"]


class TokenHistory:
    """One row's tokens so far, in a buffer that grows by doubling.

    The penalties read every row's whole history at every step; kept as a tensor, a batch's
    histories become one (B, T) matrix with one copy per row instead of one Python conversion
    per token.
    """

    def __init__(self, tokens: Sequence[int] = ()):
        self._buffer = torch.zeros(max(16, 2 * len(tokens)), dtype=torch.long)
        self._length = 0
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        if self._length == len(self._buffer):
            grown = torch.zeros(2 * len(self._buffer), dtype=torch.long)
            grown[: self._length] = self._buffer
            self._buffer = grown
        self._buffer[self._length] = token
        self._length += 1

    def tensor(self) -> torch.Tensor:
        return self._buffer[: self._length]

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        return iter(self.tensor().tolist())


def history_matrix(history: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tokens, right-padded with 0, and (B,) lengths, on ``device``."""
    rows = [
        h.tensor() if isinstance(h, TokenHistory) else torch.tensor(list(h), dtype=torch.long)
        for h in history
    ]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    matrix = torch.zeros(len(rows), max(1, int(lengths.max())) if rows else 1, dtype=torch.long)
    for row, tokens in enumerate(rows):
        matrix[row, : len(tokens)] = tokens
    return matrix.to(device, non_blocking=True), lengths.to(device, non_blocking=True)


def apply_repetition_penalty(
    logits: torch.Tensor, history: Sequence[Sequence[int]], penalties: Sequence[float]
) -> None:
    """In place: divide positive and multiply negative logits of already seen tokens."""
    if all(p == 1.0 for p in penalties):
        return
    tokens, lengths = history_matrix(history, logits.device)
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)
    seen = (torch.arange(tokens.shape[1], device=logits.device) < lengths.unsqueeze(1)) & (
        penalty != 1.0
    ).unsqueeze(1)
    # Only the seen entries are read and written (a token seen twice is written twice, alike).
    rows, steps = seen.nonzero(as_tuple=True)
    columns = tokens[rows, steps]
    values = logits[rows, columns]
    factor = penalty[rows]
    logits[rows, columns] = torch.where(values < 0, values * factor, values / factor)


def apply_no_repeat_ngram(
    logits: torch.Tensor, history: Sequence[Sequence[int]], sizes: Sequence[int]
) -> None:
    """In place: forbid every token that would repeat an n-gram already in the row's history."""
    for n in sorted({n for n in sizes if n > 0}):
        rows = [row for row, size in enumerate(sizes) if size == n and len(history[row]) + 1 >= n]
        if not rows:
            continue
        tokens, lengths = history_matrix([history[row] for row in rows], logits.device)
        width = tokens.shape[1] - n + 1  # n-gram starts that fit in the matrix
        if width < 1:
            continue
        # Start i repeats when tokens i .. i+n-2 equal the row's last n-1; its n-th token is banned.
        starts = torch.arange(width, device=logits.device)
        repeats = starts.unsqueeze(0) <= (lengths - n).unsqueeze(1)
        for j in range(n - 1):
            last = tokens.gather(1, (lengths - n + 1 + j).clamp(min=0).unsqueeze(1))
            repeats &= tokens[:, j : j + width] == last
        which, start = repeats.nonzero(as_tuple=True)
        row_index = torch.tensor(rows, device=logits.device)
        logits[row_index[which], tokens[which, start + n - 1]] = -float("inf")


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
    logits = logits.to(torch.float32, copy=True)  # the penalties work in place; the caller's stay
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
    # Inverse-CDF sampling where the logits are: each row's uniform comes from its own generator
    # (so a seeded request repeats, alone or batched), and only the chosen tokens are read back.
    uniform = torch.tensor(
        [1.0 - float(torch.rand((), generator=generators[row])) for row in sampled_rows],  # in (0, 1]
        device=logits.device,
    )
    cumulative = warped.softmax(dim=-1).cumsum(dim=-1)
    target = uniform.unsqueeze(1) * cumulative[:, -1:]
    sampled = (cumulative < target).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    return greedy.index_copy(0, rows, sampled).tolist()


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
