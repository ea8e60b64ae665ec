"""`peftkit tune`: hyperparameter search with Optuna over an experiment file's `search:` section.

space.py      the search syntax, its defaults, checking and sampling
study.py      the study (OUT/study.db): budget, resume, the loop over trials
trial.py      one trial: a training child process whose validation curve feeds the pruner
objective.py  the `score` objective: the task metric on the validation examples
report.py     trials.md/.csv/.json, objective.png, importance.png and best.yaml
outdir.py     which directories tune may use, and one tune per directory at a time
"""

from .space import Param, parse_space
from .study import Settings, TuneResult, tune_experiment

__all__ = ["Param", "Settings", "TuneResult", "parse_space", "tune_experiment"]
