"""What the serving engine takes and gives, on token ids only (the HTTP layer owns text).

engine = Engine.start(model, tokenizer, loader, EngineConfig())  # loader: adapter key -> directory
async for out in engine.generate(prompt_ids, "support-bot@3", SamplingParams(max_tokens=32)):
    out.token_id, out.logprob, out.finish_reason  # one TokenOutput per generated token
engine.stop(deadline=10.0)  # in-flight requests finish, or end with ShuttingDownError
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PeftkitError, RequestError


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded. temperature 0 is greedy (argmax), as in the OpenAI API."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # a per-request generator: the same seed gives the same tokens
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's end-of-sequence ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k most likely

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise RequestError(f"temperature must be between 0 and 2, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError(f"logprobs must be between 0 and 20, not {self.logprobs}")


@dataclass(frozen=True)
class TokenOutput:
    """One generated token of one request, in order. The last one has `finish_reason` set."""

    token_id: int
    logprob: float | None = None  # log-probability of token_id (when logprobs was asked for)
    top_logprobs: dict[int, float] = field(default_factory=dict)  # the k most likely, when asked
    finish_reason: str | None = None  # "stop" (EOS or a stop id: the token is that id), "length"


class AdapterLoadError(RequestError):
    """An adapter a request names could not be loaded (bad files, another base model, too large a
    rank for the server's slots); only the requests that name it fail. `public` is what a client is
    told: the adapter and why, without the server's paths (the full message goes to the log)."""

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or message

    @classmethod
    def of(cls, key: str, error: Exception) -> AdapterLoadError:
        """The error for adapter `key` failing to load with `error`: in full for the log, and for the
        client the reason only (no paths, no operator hints)."""
        if isinstance(error, AdapterLoadError):
            return error
        from ..errors import (
            AdapterFileError,
            BaseModelMismatchError,
            RegistryIntegrityError,
            ShapeMismatchError,
        )

        reasons = [
            (BaseModelMismatchError, "it was trained for another base model (its fingerprint differs)"),
            (ShapeMismatchError, "its tensors do not fit the served base model"),
            (AdapterFileError, "its files are missing, damaged or not an adapter"),
            (RegistryIntegrityError, "its stored files do not match their checksums"),
        ]
        why = next((text for kind, text in reasons if isinstance(error, kind)), "it could not be loaded")
        return cls(
            f"adapter {key!r} cannot be served: {error}",
            f"adapter {key!r} cannot be served: {why} (the server's log has the details)",
        )


class ParamError(RequestError):
    """A request parameter is out of the server's limits; `param` names it (HTTP 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(RequestError):
    """The engine's waiting queue is at its limit; retry later (HTTP 429)."""


class ShuttingDownError(RequestError):
    """The server is stopping and takes no new requests (HTTP 503)."""


class EngineError(PeftkitError):
    """The engine failed on a step (a bug, or the machine): the requests in that step end with it
    (HTTP 500); the engine keeps serving the others."""


class EngineUnavailableError(PeftkitError):
    """The engine is not running (it stopped, or failed to start): HTTP 503."""


class AdapterBusyError(RequestError):
    """An adapter cannot be unloaded while requests use it (HTTP 409)."""


class AdapterNotLoadedError(RequestError):
    """The adapter to unload is not in a slot (HTTP 404)."""
