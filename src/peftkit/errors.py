"""The errors peftkit raises for bad input. Each message names the problem and the fix."""

from __future__ import annotations


class PeftkitError(Exception):
    """Base class for every error peftkit raises on purpose."""


class ConfigError(PeftkitError, ValueError):
    """A config key is unknown or its value is invalid."""


class TargetError(PeftkitError, ValueError):
    """The requested target modules match nothing, or match a layer type that cannot be adapted."""


class AdapterFileError(PeftkitError, ValueError):
    """An adapter directory or file is missing, corrupt, a pickle, or not in the PEFT format."""


class ShapeMismatchError(AdapterFileError):
    """An adapter's tensors do not fit the base model's layers."""


class BaseModelMismatchError(PeftkitError, ValueError):
    """An adapter was trained on a different base model than the one it is being loaded into."""


class AdapterStateError(PeftkitError, RuntimeError):
    """An operation does not fit the adapters' current state (e.g. a mixed batch while merged)."""


class AdapterNotFoundError(PeftkitError, KeyError):
    """No adapter of that name is attached."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class RequestError(PeftkitError, ValueError):
    """A call's arguments do not fit (e.g. adapter_names of the wrong length for the batch)."""


class DataError(PeftkitError, ValueError):
    """A dataset file or row is malformed (the message names the file, the line and what is wrong)."""


class BaseModelError(PeftkitError, ValueError):
    """A base model could not be found or loaded."""


class CheckpointError(PeftkitError, ValueError):
    """A training checkpoint cannot be resumed from: missing, corrupt, non-finite, or made from other
    data or another base model."""


class TrainingDivergedError(PeftkitError, RuntimeError):
    """The loss, the gradient or the weights stopped being finite (NaN or inf)."""


class RegistryError(PeftkitError, ValueError):
    """The adapter registry refused a request: an unknown name or version, a database it cannot use."""


class UnknownAdapterError(RegistryError):
    """The registry holds no adapter of that name."""


class OtherBaseVersionError(RegistryError, BaseModelMismatchError):
    """A registered version was trained on another base model than the one it is resolved for."""


class RegistryIntegrityError(RegistryError):
    """A stored file does not match its recorded hash (tampered, truncated or missing)."""


class TrainingInterrupted(KeyboardInterrupt):
    """A stop signal (Ctrl-C, SIGTERM or SIGHUP: number `signum`) stopped a training run after step
    `step`, saved as `checkpoint` to resume from.

    A KeyboardInterrupt, not a PeftkitError: the user asked for it, and callers that let Ctrl-C end
    the program keep doing so. A command exits with 128 + signum, as a shell reports a process that
    the signal ended (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""

    def __init__(self, step: int, checkpoint: object | None, signum: int = 2) -> None:
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


def option(name: str, value: bool = True) -> str:
    """An option in the words of both audiences, for messages that reach command-line users and Python
    callers alike: option("overwrite") is '--overwrite (overwrite=True in Python)', option("check_base",
    False) is '--no-check-base (check_base=False in Python)'."""
    flag = name.replace("_", "-")
    return f"--{flag if value else 'no-' + flag} ({name}={value} in Python)"


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """A ' (did you mean X?)' hint for a misspelt key, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
