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

__all__ = [
    "GenerationParams",
    "Histories",
    "ParameterError",
    "TokenHistory",
    "choose",
    "choose_tokens",
    "make_generator",
    "needs_choosing",
    "warp",
]


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


class Histories:
    """A batch's histories on the logits' device: (B, T) tokens right-padded with 0, and lengths.

    Built from the rows' own histories; ``room`` leaves columns free for tokens appended on the
    device (``append``), so that decode steps can go on choosing before the host has read them.
    Each row's length is known on the host too: every step adds one token to every row.
    """

    def __init__(self, history: Sequence[Sequence[int]], device, room: int = 0):
        rows = [
            h.tensor() if isinstance(h, TokenHistory) else torch.tensor(list(h), dtype=torch.long)
            for h in history
        ]
        self.host_lengths = [len(r) for r in rows]
        tokens = torch.zeros(len(rows), max(self.host_lengths, default=0) + max(room, 1), dtype=torch.long)
        for row, seen in enumerate(rows):
            tokens[row, : len(seen)] = seen
        self.tokens = tokens.to(device, non_blocking=True)
        self.lengths = torch.tensor(self.host_lengths, dtype=torch.long).to(device, non_blocking=True)
        self._rows = torch.arange(len(rows), device=device)

    def append(self, chosen: torch.Tensor) -> None:
        """Each row's newly chosen token (B,), on the device, without reading it."""
        if max(self.host_lengths, default=0) >= self.tokens.shape[1]:
            raise RuntimeError("no room left in these histories")
        self.tokens[self._rows, self.lengths] = chosen
        self.lengths += 1
        self.host_lengths = [n + 1 for n in self.host_lengths]

    def select(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(rows, device=self.tokens.device)
        return self.tokens[index], self.lengths[index]


def _histories(history, device) -> Histories:
    return history if isinstance(history, Histories) else Histories(history, device)


def _dense(logits: torch.Tensor, dense: bool | None) -> bool:
    # Where the logits are on an accelerator, (B, V) masks cost next to nothing and need no read-back;
    # on a CPU, touching only the history's entries is several times faster (and a read-back is free).
    return logits.device.type != "cpu" if dense is None else dense


def _marked(shape, tokens: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(B, V) bool: which tokens of each row appear in ``tokens`` (B, T) at ``where``."""
    counts = torch.zeros(shape, dtype=torch.int32, device=tokens.device)
    return counts.scatter_add_(1, tokens, where.to(torch.int32)) > 0


def apply_repetition_penalty(
    logits: torch.Tensor,
    history: Histories | Sequence[Sequence[int]],
    penalties: Sequence[float],
    dense: bool | None = None,
) -> None:
    """In place: divide positive and multiply negative logits of already seen tokens."""
    if all(p == 1.0 for p in penalties):
        return
    history = _histories(history, logits.device)
    tokens = history.tokens
    penalty = torch.tensor(penalties, dtype=logits.dtype).to(logits.device, non_blocking=True)
    seen = (torch.arange(tokens.shape[1], device=logits.device) < history.lengths.unsqueeze(1)) & (
        penalty != 1.0
    ).unsqueeze(1)
    if _dense(logits, dense):
        hit = _marked(logits.shape, tokens, seen)
        factor = penalty.unsqueeze(1)
        logits.copy_(torch.where(hit, torch.where(logits < 0, logits * factor, logits / factor), logits))
        return
    # Only the seen entries are read and written (a token seen twice is written twice, alike).
    rows, steps = seen.nonzero(as_tuple=True)
    columns = tokens[rows, steps]
    values = logits[rows, columns]
    factor = penalty[rows]
    logits[rows, columns] = torch.where(values < 0, values * factor, values / factor)


def apply_no_repeat_ngram(
    logits: torch.Tensor,
    history: Histories | Sequence[Sequence[int]],
    sizes: Sequence[int],
    dense: bool | None = None,
) -> None:
    """In place: forbid every token that would repeat an n-gram already in the row's history."""
    if not any(n > 0 for n in sizes):
        return
    history = _histories(history, logits.device)
    for n in sorted({n for n in sizes if n > 0}):
        rows = [row for row, size in enumerate(sizes) if size == n and history.host_lengths[row] + 1 >= n]
        if not rows:
            continue
        tokens, lengths = history.select(rows)
        width = tokens.shape[1] - n + 1  # n-gram starts that fit in the matrix
        if width < 1:
            continue
        # Start i repeats when tokens i .. i+n-2 equal the row's last n-1; its n-th token is banned.
        starts = torch.arange(width, device=logits.device)
        repeats = starts.unsqueeze(0) <= (lengths - n).unsqueeze(1)
        for j in range(n - 1):
            last = tokens.gather(1, (lengths - n + 1 + j).clamp(min=0).unsqueeze(1))
            repeats &= tokens[:, j : j + width] == last
        row_index = torch.tensor(rows, device=logits.device)
        if _dense(logits, dense):
            banned = _marked((len(rows), logits.shape[1]), tokens[:, n - 1 : n - 1 + width], repeats)
            logits[row_index] = logits[row_index].masked_fill(banned, -float("inf"))
        else:
            which, start = repeats.nonzero(as_tuple=True)
            logits[row_index[which], tokens[which, start + n - 1]] = -float("inf")


def warp(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    largest_k: int | None = None,
) -> torch.Tensor:
    """Temperature, top-k and top-p for every row at once; each argument is one value per row.

    ``largest_k``: the largest top-k among the rows (0 for none), if the caller knows it without
    reading ``top_k`` back from the device.
    """
    logits = logits / temperature.unsqueeze(1)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    largest = int(k.max()) if largest_k is None else min(largest_k or vocab, vocab)
    kth = torch.topk(logits, largest, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    logits = logits.masked_fill(logits < kth, -float("inf"))
    # Top-p as transformers does it: drop the low tail whose mass is at most 1 - top_p, keep at least one.
    ordered, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p).unsqueeze(1)
    drop[:, -1] = False
    drop = drop & (top_p < 1).unsqueeze(1)
    return logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))


def needs_choosing(params: GenerationParams) -> bool:
    """Whether a row's token is more than the argmax of its logits."""
    return params.do_sample or params.repetition_penalty != 1.0 or params.no_repeat_ngram_size > 0


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[GenerationParams],
    history: Histories | Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    dense: bool | None = None,
) -> torch.Tensor:
    """One token per row of (B, V) logits, as a (B,) tensor on their device; nothing is read back
    (on a CPU, nothing waits either way). ``history`` is each row's tokens so far."""
    if not any(needs_choosing(p) for p in params):
        return logits.argmax(dim=-1)
    logits = logits.to(torch.float32, copy=True)  # the penalties work in place; the caller's stay
    penalties = [p.repetition_penalty for p in params]
    sizes = [p.no_repeat_ngram_size for p in params]
    if any(p != 1.0 for p in penalties) or any(n > 0 for n in sizes):
        history = _histories(history, logits.device)  # one (B, T) copy for both penalties
        apply_repetition_penalty(logits, history, penalties, dense)
        apply_no_repeat_ngram(logits, history, sizes, dense)
    greedy = logits.argmax(dim=-1)
    sampled_rows = [row for row, p in enumerate(params) if p.do_sample]
    if not sampled_rows:
        return greedy
    chosen = [params[r] for r in sampled_rows]

    def per_row(values, dtype=None) -> torch.Tensor:  # host values, copied over without waiting
        return torch.tensor(values, dtype=dtype).to(logits.device, non_blocking=True)

    rows = per_row(sampled_rows)
    warped = warp(
        logits[rows],
        per_row([p.temperature for p in chosen], torch.float32),
        per_row([p.top_k for p in chosen]),
        per_row([p.top_p for p in chosen], torch.float32),
        largest_k=max(p.top_k for p in chosen) if all(p.top_k > 0 for p in chosen) else 0,
    )
    # Inverse-CDF sampling where the logits are: each row's uniform comes from its own generator
    # (so a seeded request repeats, alone or batched), and only the chosen tokens are read back.
    uniform = per_row(
        [1.0 - float(torch.rand((), generator=generators[row])) for row in sampled_rows],  # in (0, 1]
        torch.float32,
    )
    cumulative = warped.softmax(dim=-1).cumsum(dim=-1)
    target = uniform.unsqueeze(1) * cumulative[:, -1:]
    sampled = (cumulative < target).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    return greedy.index_copy(0, rows, sampled)


def choose(
    logits: torch.Tensor,
    params: Sequence[GenerationParams],
    history: Histories | Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of (B, V) logits; ``history`` is each row's tokens so far."""
    return choose_tokens(logits, params, history, generators).tolist()


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
