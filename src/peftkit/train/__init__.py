"""Fine-tuning: the training loop, loss, schedules, checkpoints and the `train` command.

from peftkit.train import TrainConfig, train
result = train(TrainConfig(data="task:dates", max_steps=80))
"""

from .config import TrainConfig, load_config
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
