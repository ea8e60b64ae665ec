"""peftkit: parameter-efficient fine-tuning of language models, in the HF PEFT on-disk format."""

__version__ = "0.1.0"

from .adapted import AdaptedModel  # noqa: E402
from .errors import (  # noqa: E402
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
from .methods import METHODS, LoraConfig  # noqa: E402
from .methods.bottleneck_config import BottleneckConfig  # noqa: E402
from .methods.ia3_config import IA3Config  # noqa: E402
from .methods.prefix import PrefixTuningConfig  # noqa: E402
from .methods.prompt import PromptTuningConfig  # noqa: E402


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
