"""Experiments over several training runs: the file `compare` and `tune` read, and the runner that
trains one config in its own process. See `config.read_experiment` and `runner.run_training`."""

from .config import Experiment, Variant, read_experiment
from .runner import Outcome, RunFailed, run_training

__all__ = ["Experiment", "Outcome", "RunFailed", "Variant", "read_experiment", "run_training"]
