"""Whether an evaluation scores an adapter on its own training data: a score on examples it learned
from is not a held-out score, and `peftkit eval` says so beside it.

`peftkit train` records the hash of the exact training examples in the adapter (`dataset_hash`, see
`peftkit.data.files.dataset_hash`) and its resolved config beside it (training_config.yaml: which
share went to validation, the seed, max_examples, the system prompt). So the training examples can be
rebuilt from the evaluated data the way training built them; when the rebuilt set's hash is the
recorded one, they are known exactly and the scored examples that are among them can be counted.
Nothing is claimed when they cannot be rebuilt (another tool's adapter, other data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.data.example import Example

CONFIG_FILE = "training_config.yaml"  # written beside the adapter by `peftkit train`


def trained_on(
    adapter_dir: Path, data: str, examples: list[Example], metadata: dict[str, str] | None = None
) -> int | None:
    """How many of `examples` (read from `data`) the adapter at `adapter_dir` was trained on; None when
    that cannot be known. `metadata`: the adapter file's, when it was read already. Never raises for an
    unreadable sidecar: the evaluation goes on without a note."""
    from peftkit.data.files import dataset_hash

    recorded = _recorded_hash(adapter_dir, metadata)
    if recorded is None:
        return None
    if dataset_hash(examples) == recorded:  # exactly the training set, in order
        return len(examples)
    training = _rebuilt_training_set(adapter_dir, data, recorded)
    if training is None:
        return None
    keys = {_key(e) for e in training}
    return sum(_key(e) in keys for e in examples)


def _recorded_hash(adapter_dir: Path, metadata: dict[str, str] | None) -> str | None:
    from peftkit.errors import PeftkitError
    from peftkit.formats.peft import read_adapter
    from peftkit.identity import AdapterIdentity

    try:
        metadata = read_adapter(adapter_dir).metadata if metadata is None else metadata
        return AdapterIdentity.from_metadata(metadata).dataset_hash
    except PeftkitError:
        return None


def _rebuilt_training_set(adapter_dir: Path, data: str, recorded: str) -> list[Example] | None:
    """The training examples as `peftkit train` chose them from `data` (before any system prompt was
    added), if choosing them that way gives the recorded hash; else None."""
    from peftkit.data.files import dataset_hash, split_examples
    from peftkit.data.source import load_data
    from peftkit.errors import PeftkitError

    config = _training_config(adapter_dir)
    if config is None:
        return None
    try:
        task = data.startswith("task:")  # a task's training split, whichever split is evaluated
        rows = load_data("task:" + data[5:].partition(":")[0] if task else data, split="train")
        if config.get("val_data") is None:
            rows = split_examples(
                rows, float(config.get("val_fraction", 0)), seed=int(config.get("seed", 0))
            )[0]
        if config.get("max_examples") is not None:
            rows = rows[: int(config["max_examples"])]
        system = config.get("system")
        trained = [e.with_system(system) for e in rows] if system else rows
    except (PeftkitError, OSError, ValueError, TypeError):
        return None
    return rows if dataset_hash(trained) == recorded else None


def _training_config(adapter_dir: Path) -> dict[str, Any] | None:
    import yaml

    directory = adapter_dir.parent if adapter_dir.is_file() else adapter_dir
    try:
        config = yaml.safe_load((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def _key(example: Example) -> str:
    """An example's identity: its turns, as `dataset_hash` reads them."""
    return json.dumps(example.to_dict(), sort_keys=True, ensure_ascii=False)
