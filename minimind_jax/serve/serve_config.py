"""The server's typed configuration: frozen dataclasses, each checking its own bounds once.

`ServeConfig` is what `serve` runs: the model (`LoadConfig`), the batched decoder's bounds
(`EngineConfig`), what the API allows and assumes (`ServeSettings`), and where it listens. The
`serve` command reads its flags into one (serve/command.py), each flag made from its field, so
each default is written once, here or in the dataclass it comes from (a request's sampling
defaults are `SamplingConfig`'s); benchmarks and tests build one directly.
"""

from __future__ import annotations

import dataclasses

from minimind_jax.errors import UserError
from minimind_jax.infer.infer_config import LoadConfig, field_default
from minimind_jax.infer.sampling import SamplingConfig


def _sampling_default(name: str):
    return field_default(SamplingConfig, name)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Bounds of the batched decoder (serve/engine.py)."""

    max_batch: int = 8  # slots: completions decoding at once
    max_queue: int = 64  # completions waiting for a slot; more are refused
    max_context: int = 1024  # prompt + new tokens of one completion
    batch_wait_s: float = 0.01  # how long an idle worker waits for more arrivals to prefill
    seed: int = 0  # sampling seed of the first completion that brings none (then counting up)
    prefill_chunk: int = 256  # longer prompts: this many tokens per decode step, not at once

    def __post_init__(self):
        problems = []
        if self.max_context < 2:
            problems.append(f"--max_context must be >= 2, got {self.max_context}")
        if self.max_batch < 1 or self.max_queue < 1:
            problems.append("--max_batch and --max_queue must be >= 1")
        if self.prefill_chunk < 1:
            problems.append(f"--prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.batch_wait_s < 0:
            problems.append(f"--batch_wait_ms must be >= 0, got {self.batch_wait_s * 1000}")
        if problems:
            raise UserError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What the server allows and assumes when a request leaves a field out."""

    model_name: str = "minimind"
    api_key: str | None = None
    max_tokens_cap: int = 512  # a request asking for more is refused
    default_max_tokens: int = _sampling_default("max_new_tokens")
    max_context: int | None = None  # prompt + max_tokens of one request; None: the engine's
    temperature: float = _sampling_default("temperature")
    top_p: float = _sampling_default("top_p")
    top_k: int = _sampling_default("top_k")  # every request's (the API has no top_k)
    repetition_penalty: float = _sampling_default("repetition_penalty")
    system: str | None = None  # used when the messages carry no system message
    max_n: int = 8  # choices per request

    def __post_init__(self):
        problems = []
        if self.max_tokens_cap < 1:
            problems.append(f"--max_tokens must be >= 1, got {self.max_tokens_cap}")
        if not 1 <= self.default_max_tokens <= self.max_tokens_cap:
            problems.append(f"--default_max_tokens must be in [1, --max_tokens], got "
                            f"{self.default_max_tokens}")
        if problems:
            raise UserError("; ".join(problems))
        self.sampling_for(self.default_max_tokens)  # the defaults' bounds: SamplingConfig's

    def sampling_for(self, max_new_tokens: int, **given: float | None) -> SamplingConfig:
        """A request's sampling of `max_new_tokens` tokens: the `given` temperature, top_p or
        repetition_penalty (None: not given), else this server's; top_k this server's."""
        names = ("temperature", "top_p", "top_k", "repetition_penalty")
        return SamplingConfig(max_new_tokens=max_new_tokens, **{
            name: getattr(self, name) if given.get(name) is None else given[name]
            for name in names})


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """What `serve` runs: the model (None: the caller brings its own, as benchmarks do), the
    decoder's bounds, the API's settings, where it listens, and whether it warms up."""

    load: LoadConfig | None = None
    engine: EngineConfig = EngineConfig()
    settings: ServeSettings = ServeSettings()
    host: str = "127.0.0.1"
    port: int = 8998
    warm_up: bool = True  # compile the common batch shapes in the background while serving
    log_level: str = "info"  # uvicorn's
