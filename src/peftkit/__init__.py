"""peftkit: parameter-efficient fine-tuning of language models, in the HF PEFT on-disk format."""

from . import moved
from .core.adapted import AdaptedModel
from .errors import (
    AdapterFileError,
    AdapterNotFoundError,
    AdapterStateError,
    BaseModelError,
    BaseModelMismatchError,
    CheckpointError,
    ConfigError,
    DataError,
    PeftkitError,
    RequestError,
    ShapeMismatchError,
    TargetError,
    TrainingDivergedError,
)
from .methods import METHODS, LoraConfig
from .methods.bottleneck_config import BottleneckConfig
from .methods.ia3_config import IA3Config
from .methods.prefix import PrefixTuningConfig
from .methods.prompt import PromptTuningConfig
from .version import __version__ as __version__

moved.install()


def load_base(*args, **kwargs):  # noqa: ANN002, ANN003
    """Load a base model and its tokenizer; see `peftkit.base.load_base`."""
    from .base import load_base as _load_base

    return _load_base(*args, **kwargs)


__all__ = [
    "METHODS",
    "AdaptedModel",
    "AdapterFileError",
    "AdapterNotFoundError",
    "AdapterStateError",
    "BaseModelError",
    "BaseModelMismatchError",
    "BottleneckConfig",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "IA3Config",
    "LoraConfig",
    "PeftkitError",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "RequestError",
    "ShapeMismatchError",
    "TargetError",
    "TrainingDivergedError",
    "load_base",
]
