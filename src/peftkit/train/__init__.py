"""Fine-tuning: the training loop, loss, schedules, checkpoints and the `train` command.

from peftkit.train import TrainConfig, train
result = train(TrainConfig(data="task:dates", max_steps=80))
"""

from ..errors import CheckpointError, TrainingDivergedError, TrainingInterrupted
from .config import TrainConfig, load_config
from .loop import TrainResult, train

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "load_config",
    "train",
]
