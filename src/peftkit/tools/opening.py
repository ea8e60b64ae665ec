"""The one way to open a model with its adapters: resolve registry references, read each adapter's
files once (a bad file fails before the slow base-model load), load the base, attach the adapters and
write the audit entry a registered version loaded onto another base needs.

    opened = open_model("smollm2-135m", [("dates", "dates@production")], dtype="auto")
    opened.model.generate(...)   # an AdaptedModel with "dates" loaded

merge, combine, eval/generate/chat, the registry's gate, compare and serve all open models here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import TargetError
from ..formats.peft import AdapterFiles, read_adapter

Log = Callable[[str], None]


@dataclass(frozen=True, eq=False)  # one source is one reading of the files: compared by identity
class AdapterSource:
    """One adapter to open: its name on the model, its files (read and checked once), and whether a
    registry reference named it (loading it onto another base is then audited)."""

    name: str
    files: AdapterFiles
    from_registry: bool = False

    @property
    def directory(self) -> Path:
        return self.files.directory


Adapters = Sequence["tuple[str, str | Path] | AdapterSource"]


@dataclass
class OpenedModel:
    """What `open_model` opened: the model (an AdaptedModel, or the bare base when no adapter was
    asked for), its tokenizer (None for a base saved without one, with tokenizer="optional"), and
    with together="passes" the adapters that could not share the model with those loaded first."""

    model: Any
    tokenizer: Any
    sources: list[AdapterSource] = field(default_factory=list)  # every adapter asked for, as read
    waiting: list[AdapterSource] = field(default_factory=list)


def read_adapters(adapters: Adapters, registry: str | None = None) -> list[AdapterSource]:
    """Each (name, directory or registry reference) as a source: references resolved to their verified
    files, a training run's directory refused with the adapter inside it named, every file read."""
    from ..registry.paths import adapter_path

    sources = []
    for entry in adapters:
        if isinstance(entry, AdapterSource):
            sources.append(entry)
            continue
        name, where = entry
        from_registry = not Path(where).exists()
        sources.append(AdapterSource(name, read_adapter(adapter_path(where, registry)), from_registry))
    return sources


def open_model(
    base: str,
    adapters: Adapters = (),
    *,
    dtype: Any = "auto",  # a name ("auto", "float32", ...) or a torch dtype
    quantize: str | None = None,
    check_base: bool = True,
    registry: str | None = None,
    device: str | None = None,
    tokenizer: Literal["required", "optional"] = "required",
    dtype_advice: str | None = None,
    together: Literal["refuse", "passes"] = "refuse",
    adapted: bool | None = None,
    log: Log | None = None,
) -> OpenedModel:
    """Open `base` with `adapters` attached (see the module docstring).

    together: "refuse" makes two adapters that cannot share one model (two methods on one module) an
    error a command-line user can act on; "passes" loads what fits and returns the rest as `waiting`.
    adapted: wrap the base in an AdaptedModel (None: when adapters are given or the base is 4-bit,
    whose adapted generate decodes fast). log: where the progress lines go (None: nowhere).
    """
    from transformers.utils import logging as hf_logging

    from ..base import load_base
    from ..core.adapted import AdaptedModel

    sources = read_adapters(adapters, registry)  # before the slow load: a bad file fails first
    say = log or (lambda message: None)
    hf_logging.disable_progress_bar()  # our progress line instead of transformers' bars
    say(f"loading base model {base} ...")
    model, tok = load_base(
        base, dtype=dtype, device=device, quantize=quantize, tokenizer=tokenizer, dtype_advice=dtype_advice
    )
    if not (adapted if adapted is not None else bool(sources) or bool(quantize)):
        return OpenedModel(model, tok, sources)
    am = AdaptedModel(model)
    waiting = attach_adapters(
        am, sources, base=base, check_base=check_base, registry=registry, together=together, log=say
    )
    return OpenedModel(am, tok, sources, waiting)


def attach_adapters(
    am: Any,
    sources: Sequence[AdapterSource],
    *,
    base: str,
    check_base: bool = True,
    registry: str | None = None,
    together: Literal["refuse", "passes"] = "refuse",
    log: Log | None = None,
) -> list[AdapterSource]:
    """Load each source onto `am` (checked before anything changes); a registered version loaded onto a
    base it does not record (check_base=False) goes into the registry's audit log. Returns the sources
    that could not share the model with those loaded before them (together="passes": each of the others
    still joins; with "refuse" that is an error)."""
    from ..registry.paths import audit_base_override

    say = log or (lambda message: None)
    waiting: list[AdapterSource] = []
    for source in sources:
        say(f"loading adapter {source.directory} as {source.name!r} ...")
        try:
            am.load_adapter(source.files, source.name, check_base=check_base)
        except TargetError as err:
            if not am.adapters:  # alone on the base: the adapter's own problem, worded by the check
                raise
            if together == "passes":
                waiting.append(source)
                continue
            raise TargetError(
                f"adapter {source.name!r} cannot be active together with {', '.join(map(repr, am.adapters))}: "
                f"{str(err).split('. ')[0]}. Give them one at a time (`peftkit eval --adapters A B` "
                "scores adapters of different methods side by side)"
            ) from None
        if not check_base and source.from_registry:
            audit_base_override(source.directory, base, am.base_fingerprint(), registry)
    return waiting
