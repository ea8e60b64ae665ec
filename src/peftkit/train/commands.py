"""`peftkit train`: registered with the CLI when the parser is built."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from ..cli import ConfigOptions, Positional, command
from .config import field_help


@command
def train(
    config: Annotated[Path | None, Positional()] = None,
    resume: bool = False,
    overrides: Annotated[dict[str, Any], ConfigOptions(field_help)] | None = None,
) -> int:
    """Fine-tune a base model on a dataset (LoRA by default) and save the adapter.

    Reads the YAML config (every key optional; defaults fill the rest), applies any `--KEY VALUE`
    options on top, validates the result (unknown or invalid keys are named), and trains. The run
    directory gets the resolved config.yaml, metrics.jsonl, TensorBoard logs, loss.png, checkpoints,
    adapter-last/ and (with validation) adapter-best/. Launch with torchrun for data parallelism:
    `torchrun --nproc_per_node 2 -m peftkit train CONFIG`.

    Args:
        config: a YAML file of config keys (see the options below for every key)
        resume: continue from the newest checkpoint in the run's output_dir
        overrides: config keys set on the command line
    """
    from .config import load_config
    from .loop import train as run_training

    result = run_training(load_config(config, overrides or {}), resume=resume)
    where = result.adapter_dir or result.model_dir
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s); saved {where}"
    )
    return 0
