"""`peftkit train`: registered with the CLI when the parser is built."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

from ..command_args import ConfigOptions, Positional
from .config import field_defaults, field_help


def train(
    config: Annotated[Path | None, Positional()] = None,
    resume: bool = False,
    overwrite: bool = False,
    allow_changed_inputs: bool = False,
    register: str | None = None,
    registry: str | None = None,
    overrides: Annotated[dict[str, Any], ConfigOptions(field_help, field_defaults)] | None = None,
) -> int:
    """Fine-tune a base model on a dataset (LoRA by default) and save the adapter.

    Reads the YAML config (every key optional; defaults fill the rest), applies any `--KEY VALUE`
    options on top, validates the result (unknown or invalid keys are named), and trains. The run
    directory gets the resolved config.yaml, metrics.jsonl, TensorBoard logs, loss.png, checkpoints,
    adapter-last/ and (with validation) adapter-best/. The output_dir must be new, empty or this
    command's own earlier run: one that holds another run is refused unless --resume or --overwrite
    is given, and one that holds other files is refused. Ctrl-C, SIGTERM and SIGHUP (what `timeout`,
    `docker stop`, Kubernetes, Slurm pre-emption and systemd send) stop the run after the current
    step, saving a checkpoint that --resume continues from and adapter-last; the exit code is 128 +
    the signal's number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP). A second signal aborts at
    once. Launch with torchrun for data parallelism: `torchrun --nproc_per_node 2 -m peftkit train
    CONFIG`.

    Args:
        config: a YAML file of config keys (see the options below for every key)
        resume: continue from the newest checkpoint in the run's output_dir
        overwrite: delete the previous run's files in output_dir first (other files are kept)
        allow_changed_inputs: resume even though the data or the base model differ from the
            checkpoint's (the change is recorded in the adapter's training.json)
        register: register the resulting adapter (adapter-best, else adapter-last) in the adapter
            registry under this name, as its next draft version
        registry: the registry for --register (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        overrides: config keys set on the command line
    """
    from ..errors import ConfigError
    from .config import FULL, load_config
    from .loop import train as run_training
    from .step import PASSED_ON

    if PASSED_ON is not None:  # compare/tune's stop before training began: a clean interruption too
        signal.signal(PASSED_ON, signal.default_int_handler)
    resolved = load_config(config, overrides or {})
    reg = None
    if register is not None:  # checked before the run: a bad name or registry must not waste it
        from ..registry import Registry
        from ..registry.refs import check_name

        if resolved.method == FULL:
            raise ConfigError("--register keeps adapters; method full saves a whole model (drop --register)")
        check_name(register)
        reg = Registry.open(registry)
    # A stop signal raises TrainingInterrupted (a KeyboardInterrupt with the signal's number), which the
    # CLI turns into exit status 128 + that number (130, 143, 129), as supervisors and compare/tune read it.
    result = run_training(
        resolved, resume=resume, overwrite=overwrite, allow_changed_inputs=allow_changed_inputs
    )
    where = result.adapter_dir or result.model_dir
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s); saved {where}"
    )
    if reg is not None and result.adapter_dir is not None:
        about = f"{resolved.method} on {resolved.data}, {result.steps} steps, from {result.output_dir}"
        version = reg.register(register, result.adapter_dir, description=about)
        print(f"registered {version.ref} ({version.stage}) in {reg.root}")
    return 0
