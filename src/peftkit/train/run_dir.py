"""A run's output directory: one run per directory (refused, overwritten or resumed, never mixed),
checked before the model loads, and cleaned of what interrupted writes left behind."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import yaml

from ..errors import BaseModelError, ConfigError, option
from ..io import is_leftover, is_nonempty_dir, remove_dir, restore_replaced, unwritable_reason
from ..paths import input_clash, input_paths
from ..terminal import printable
from .checkpoint import remove_incomplete
from .config import TrainConfig

# What `peftkit train` writes into its output directory: a run is these, and only these are cleared.
RUN_ENTRIES = (
    "config.yaml", "metrics.jsonl", "summary.json", "loss.png", "tensorboard", "checkpoints",
    "adapter-best", "adapter-last", "model-best", "model-last",
)  # fmt: skip
# What other peftkit commands write beside a run of their own (peftkit demo: its scores).
COMPANIONS = ("demo.json",)
# The saved results, each replaced whole by io.replace_dir.
SAVED = ("adapter-best", "adapter-last", "model-best", "model-last")


def run_dir(config: TrainConfig) -> Path:
    """The run's output directory: output_dir with {task} and {method} filled in."""
    return Path(config.output_dir.format(task=_data_name(config.data), method=config.method))


def check_run_dir(out: Path, *, resume: bool, overwrite: bool, inputs: list[tuple[str, Path]] = ()) -> None:
    """Refuse an output directory this run cannot use, before any heavy work.

    A directory that holds another run is refused unless the run is resumed or `overwrite` (which
    `clear_run` then carries out) is given; a non-empty directory that is not a peftkit run is
    refused, `overwrite` or not. The run's files never go into one of its `inputs` (the base model's
    directory, the data), nor into the home or root directory; with `overwrite`, which deletes
    the run's entries, the directory may not hold an input either.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory; choose another output_dir")
    resolved = out.expanduser().resolve()
    if resolved in (Path.home().resolve(), Path(resolved.anchor)):
        raise ConfigError(
            f"output_dir {out} is your home or the root directory; give the run a directory of its own"
        )
    # --overwrite deletes the run's entries: an input inside one of them (a base model saved as
    # model-last, say) would go too. Other files in the directory, the data among them, are kept.
    entries = [(what, path) for what, path in inputs if _inside_run_entry(path, out)] if overwrite else []
    clash = input_clash(out, list(inputs), ("is", "is inside")) or input_clash(out, entries, ("contains",))
    if clash:
        raise ConfigError(f"output_dir {out} {clash}; give the run a directory of its own (output_dir)")
    found = [name for name in run_files(out) if name in RUN_ENTRIES]  # leftovers alone are cleaned up
    if overwrite:
        _check_clearable(out)
    elif found and not resume:
        raise ConfigError(
            f"output_dir {out} holds a previous run ({_listed(found)}); pass {option('overwrite')} to "
            f"replace it, {option('resume')} to continue it, or choose another output_dir"
        )
    elif not found:
        _check_empty(out)
    _ensure_writable(out)


def local_inputs(config: TrainConfig) -> list[tuple[str, Path]]:
    """The local files the run reads (base model, data), which its output directory must keep clear of."""
    data = [config.data, config.val_data]
    inputs = [("data", Path(d)) for d in data if d and Path(d).expanduser().exists()]
    with contextlib.suppress(BaseModelError):  # a base that cannot load: its error comes with the load
        inputs += input_paths(config.base)
    return inputs


def claim(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Create `out` and clear the old run (overwrite) or what interrupted writes left there, saying
    what went; a resumed run first gets back a saved result an interrupted replacement moved aside
    (a new run's directory holds no run, so nothing there is its). Called once the data and the
    model have loaded: a run that fails to start leaves the directory as it was (or absent)."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        gone, what = clear_run(out), "the previous run's files"
    else:
        for name, source in restore_saved(out) if resume else []:
            _say(f"put back {out / name} from {source.name} (a replacement of it was interrupted)")
        gone, what = remove_leftovers(out), "leftovers of an interrupted run"
    if gone:
        _say(f"removed {what} from {out}: {', '.join(gone)}")


def run_files(out: Path) -> list[str]:
    """The names of the run files in `out` (and the leftovers of interrupted writes of them)."""
    if not out.is_dir():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if p.name in RUN_ENTRIES or any(is_leftover(p.name, of=entry) for entry in RUN_ENTRIES)
    )


def is_run_dir(out: Path) -> bool:
    """Whether `out` holds a peftkit run: a config.yaml that `peftkit train` wrote. It writes every
    key, so a hand-written config (say, the one passed to `peftkit train`) does not pass for one."""
    try:
        data = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and set(_SAVED_KEYS) <= set(data)


# Keys every saved config.yaml has held since the first release (later keys may be missing).
_SAVED_KEYS = (
    "base", "data", "val_data", "val_fraction", "max_examples", "system", "method", "lora", "max_length",
    "train_on", "truncation", "epochs", "max_steps", "batch_size", "grad_accum", "lr", "schedule",
    "warmup_ratio", "seed", "eval_every", "checkpoint_every", "output_dir", "tensorboard", "progress",
)  # fmt: skip


def clear_run(out: Path) -> list[str]:
    """Delete the run files from `out` (other files stay); return their names. config.yaml goes
    last, so a clear that is interrupted still leaves a directory that looks like a run."""
    names = sorted(run_files(out), key=lambda name: name == "config.yaml")
    for name in names:
        _remove(out / name)
    return names


def restore_saved(out: Path) -> list[tuple[str, Path]]:
    """Put back each saved result (adapter-best, ...) that is missing while the `.NAME.old-*` copy an
    interrupted replacement moved aside is there: it is the only copy. Returns (name, where from)."""
    restored = [(name, restore_replaced(out, name)) for name in SAVED]
    return [(name, source) for name, source in restored if source is not None]


def remove_leftovers(out: Path) -> list[str]:
    """Delete what interrupted writes left in `out` (temporary files and directories, incomplete
    checkpoints); return their names. Run `restore_saved` first: it keeps what is not debris."""
    gone = [name for name in run_files(out) if name not in RUN_ENTRIES]
    for name in gone:
        _remove(out / name)
    return gone + [f"checkpoints/{name}" for name in remove_incomplete(out / "checkpoints")]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_dir(path)
    else:
        path.unlink(missing_ok=True)  # a file, or a link (never followed)


def _inside_run_entry(path: Path, out: Path) -> bool:
    """Whether `path` lies in one of the entries of `out` that clearing a run deletes."""
    try:
        parts = path.expanduser().resolve().relative_to(out.expanduser().resolve()).parts
    except ValueError:  # not inside `out`
        return False
    return bool(parts) and parts[0] in RUN_ENTRIES


def _check_empty(out: Path) -> None:
    """A new run goes into a new or empty directory (or one holding only what interrupted writes of a
    run left, or another peftkit command's own files): never among a user's files, as every command
    that writes a directory decides (new, empty, or its own earlier output)."""
    ours = {*run_files(out), *COMPANIONS}
    others = [name for name in _entries(out) if name not in ours]
    if others:
        raise ConfigError(
            f"output_dir {out} is not empty ({_listed(others)}) and holds no peftkit run; a run needs a "
            "new or empty directory of its own: choose another output_dir"
        )


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _check_clearable(out: Path) -> None:
    if not is_nonempty_dir(out):
        return
    if not is_run_dir(out):  # (home and root were refused before, with or without a run)
        raise ConfigError(
            f"refusing to overwrite {out}: it is not empty and does not look like a peftkit run (no "
            "config.yaml written by peftkit train); choose an empty or new output_dir"
        )


def _ensure_writable(out: Path) -> None:
    """A read-only location fails now, not after training."""
    reason = unwritable_reason(out)
    if reason:
        raise ConfigError(
            f"output_dir {out} cannot be written: {reason}; choose another output_dir or fix its permissions"
        )


def _say(text: str) -> None:
    print(f"peftkit: {printable(text)}", file=sys.stderr, flush=True)


def _data_name(spec: str) -> str:
    if spec.startswith("task:"):
        return spec.split(":")[1]
    return Path(spec).stem or "data"
