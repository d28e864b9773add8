"""Generation parameters: one frozen dataclass, validated once, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from owl.errors import ParameterError


@dataclass(frozen=True)
class GenerationParams:
    """Everything that shapes one answer. ``max_new_tokens`` counts answer tokens only."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    no_repeat_ngram_size: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    # Benchmarks only: keep generating past the end-of-sequence token.
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ParameterError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise ParameterError(
                f"temperature must be above 0 when sampling, got {self.temperature}; turn sampling off for greedy"
            )
        if self.temperature < 0:
            raise ParameterError(f"temperature must not be negative, got {self.temperature}")
        if self.top_k < 0:
            raise ParameterError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ParameterError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ParameterError(f"repetition_penalty must be above 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ParameterError(
                f"no_repeat_ngram_size must be 0 (off) or positive, got {self.no_repeat_ngram_size}"
            )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ParameterError("stop strings must not be empty")

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationParams:
        """Parameters from transformers-style generate kwargs; unknown names are an error."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ParameterError(
                f"unknown generation parameters: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if "stop" in kwargs and kwargs["stop"] is not None:
            stop = kwargs["stop"]
            kwargs["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        return cls(**{k: v for k, v in kwargs.items() if v is not None})
