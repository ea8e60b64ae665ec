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
    overwrite: bool = False,
    allow_changed_inputs: bool = False,
    overrides: Annotated[dict[str, Any], ConfigOptions(field_help)] | None = None,
) -> int:
    """Fine-tune a base model on a dataset (LoRA by default) and save the adapter.

    Reads the YAML config (every key optional; defaults fill the rest), applies any `--KEY VALUE`
    options on top, validates the result (unknown or invalid keys are named), and trains. The run
    directory gets the resolved config.yaml, metrics.jsonl, TensorBoard logs, loss.png, checkpoints,
    adapter-last/ and (with validation) adapter-best/. An output_dir that holds another run is
    refused unless --resume or --overwrite is given. Ctrl-C stops after the current step and saves a
    checkpoint that --resume continues from (exit code 130); a second Ctrl-C aborts at once. Launch
    with torchrun for data parallelism: `torchrun --nproc_per_node 2 -m peftkit train CONFIG`.

    Args:
        config: a YAML file of config keys (see the options below for every key)
        resume: continue from the newest checkpoint in the run's output_dir
        overwrite: delete the previous run's files in output_dir first (other files are kept)
        allow_changed_inputs: resume even though the data or the base model differ from the
            checkpoint's (the change is recorded in the adapter's training.json)
        overrides: config keys set on the command line
    """
    from .config import load_config
    from .loop import train as run_training

    result = run_training(
        load_config(config, overrides or {}),
        resume=resume,
        overwrite=overwrite,
        allow_changed_inputs=allow_changed_inputs,
    )
    where = result.adapter_dir or result.model_dir
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s); saved {where}"
    )
    return 0
