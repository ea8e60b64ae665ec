"""`peftkit compress`'s library side: read a LoRA adapter's files (a directory or a registry reference),
reduce each layer's rank by SVD (the math is `peftkit.methods.lora_compress`) and write an ordinary
PEFT LoRA adapter. No base model is loaded: ΔW = s·B·A is known from the files alone.

    result = compress_adapter("runs/x/adapter-best", "out/x-r4", rank=4)
    print(result.table())        # per layer: rank, parameters, bytes, relative error; then the totals

The output has every layer's scaling exactly 1 (the scale is folded into the factors): r is the
largest kept rank, lora_alpha = r, and each layer of another rank has rank_pattern and alpha_pattern
entries equal to its rank, keyed by its module path (escaped: PEFT reads the keys as regexes matched
against a dotted suffix of the name). vLLM ignores the patterns but computes the same scaling 1 from
lora_alpha / r. Everything else in the files is kept: modules_to_save tensors, trained biases, the
other config keys and the safetensors metadata (peftkit's base fingerprint among them).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import AdapterFileError, RequestError, option
from ..formats import peft as fmt
from ..io import is_nonempty_dir
from ..methods.lora_compress import FACTOR_SUFFIXES, CompressedLayer, check_target, compress_layer
from ..methods.lora_config import LoraConfig
from ..terminal import printable

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
"""The --dtype choices: the new factors are stored in it (default: each factor's own input dtype)."""


@dataclass(frozen=True)
class LayerRow:
    """One layer before and after: its rank, parameters and bytes (A and B together), and the relative
    error ‖ΔW − ΔW'‖_F / ‖ΔW‖_F; norm_sq and error_sq are those squared norms, for the totals."""

    module: str
    rank_before: int
    rank_after: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    relative_error: float
    norm_sq: float
    error_sq: float


@dataclass(frozen=True)
class CompressResult:
    """What `compress_adapter` wrote: the per-layer rows, the new adapter's r, and the tensors copied
    unchanged (modules_to_save, trained biases: `other_params`, `other_bytes`)."""

    adapter: str
    out: str
    target: str  # "rank 4" or "energy 0.95"
    r: int
    rows: tuple[LayerRow, ...]
    other_params: int = 0
    other_bytes: int = 0

    def total(self, column: str) -> int:
        """The sum of a row column over all layers ("params_before", "bytes_after", ...)."""
        return sum(getattr(row, column) for row in self.rows)

    @property
    def relative_error(self) -> float:
        """‖ΔW − ΔW'‖_F / ‖ΔW‖_F over all layers together (each layer's ΔW one block of the whole)."""
        norm_sq = sum(row.norm_sq for row in self.rows)
        return math.sqrt(sum(row.error_sq for row in self.rows) / norm_sq) if norm_sq > 0 else 0.0

    def summary(self) -> str:
        """The total line: rank, parameters and bytes before -> after, and the overall error."""
        before = max(row.rank_before for row in self.rows)
        params = _change(self.total("params_before"), self.total("params_after"), "fewer")
        size = _change(self.total("bytes_before"), self.total("bytes_after"), "smaller")
        return (
            f"total: r {before} -> {self.r} on {len(self.rows)} layers ({self.target}); parameters {params}; "
            f"bytes {size}; relative error {self.relative_error:.4g} (‖ΔW − ΔW'‖ / ‖ΔW‖ over all layers)"
        )

    def table(self) -> str:
        """The per-layer table, then the total line (and a line for the tensors copied unchanged)."""
        header = ("module", "rank", "params", "bytes", "rel. error")
        cells = [header] + [
            (
                printable(row.module),
                f"{row.rank_before} -> {row.rank_after}",
                f"{row.params_before:,} -> {row.params_after:,}",
                f"{row.bytes_before:,} -> {row.bytes_after:,}",
                f"{row.relative_error:.4f}",
            )
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
        # The module column reads left-aligned, the numbers right-aligned so their digits line up.
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
            for line in cells
        ]
        lines.append(self.summary())
        if self.other_params:
            copied = f"{self.other_params:,} parameters ({self.other_bytes:,} bytes)"
            lines.append(f"copied unchanged: {copied} of modules_to_save and trained biases")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the fields, the rows, the totals and the overall error."""
        totals = {c: self.total(c) for c in ("params_before", "params_after", "bytes_before", "bytes_after")}
        return {
            **{k: v for k, v in asdict(self).items() if k != "rows"},
            "layers": [asdict(row) for row in self.rows],
            **totals,
            "relative_error": self.relative_error,
        }


def _change(before: int, after: int, less: str) -> str:
    saved = 100 * (before - after) / before if before else 0.0
    return f"{before:,} -> {after:,} ({saved:.1f}% {less})"


def compress_adapter(
    adapter: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    registry: str | None = None,
) -> CompressResult:
    """`peftkit compress`: each LoRA layer of `adapter` (a directory or a registry reference) truncated
    to at most `rank` singular values, or to the fewest that keep the fraction `energy` of the layer's
    Σ σ² (exactly one of the two), written to `out` as a PEFT LoRA adapter (see the module docstring).

    dtype: "fp16" or "bf16" stores the new factors in it (None: each factor's input dtype). OUT may
    not be, hold or lie inside the adapter, and an existing non-empty OUT is refused unless
    `overwrite` (and then only one that holds an adapter). All of that is checked before any work."""
    from ..registry.paths import adapter_path

    check_target(rank, energy)
    if dtype is not None and dtype not in DTYPES:
        raise RequestError(f"dtype {dtype!r} is not one compress stores; choose {' or '.join(DTYPES)}")
    path, out = adapter_path(adapter, registry), Path(out)
    directory = path.parent if path.is_file() else path
    _check_out(out, directory, overwrite)
    files = fmt.read_adapter(path)
    config = _lora_config(files)
    factors = _factor_keys(files)
    tensors, rows = dict(files.tensors), []
    for module, (a_key, b_key) in factors.items():
        a, b = files.tensors[a_key], files.tensors[b_key]
        r, alpha = config.rank_and_alpha(module)
        _check_factors(files.directory, module, a, b, r)
        layer = compress_layer(a, b, config.scaling(r, alpha), rank=rank, energy=energy)
        tensors[a_key] = layer.a.to(DTYPES[dtype] if dtype else a.dtype).contiguous()
        tensors[b_key] = layer.b.to(DTYPES[dtype] if dtype else b.dtype).contiguous()
        rows.append(_row(module, (a, b), (tensors[a_key], tensors[b_key]), layer))
    new_r = max(row.rank_after for row in rows)
    ranks = {row.module: row.rank_after for row in rows}
    fmt.write_adapter(out, _new_config(files.config, ranks, new_r), tensors, files.metadata)
    others = [t for k, t in files.tensors.items() if not any(k in pair for pair in factors.values())]
    return CompressResult(
        adapter=str(directory),
        out=str(out),
        target=f"rank {rank}" if rank is not None else f"energy {energy}",
        r=new_r,
        rows=tuple(rows),
        other_params=sum(t.numel() for t in others),
        other_bytes=_nbytes(*others),
    )


def _row(
    module: str, before: tuple[Tensor, Tensor], after: tuple[Tensor, Tensor], layer: CompressedLayer
) -> LayerRow:
    """The report row of one layer: its factors (A, B) before and after, and what the SVD dropped."""
    return LayerRow(
        module=module,
        rank_before=int(before[0].shape[0]),
        rank_after=layer.rank,
        params_before=sum(t.numel() for t in before),
        params_after=sum(t.numel() for t in after),
        bytes_before=_nbytes(*before),
        bytes_after=_nbytes(*after),
        relative_error=layer.relative_error,
        norm_sq=layer.norm_sq,
        error_sq=layer.error_sq,
    )


def _check_out(out: Path, adapter_dir: Path, overwrite: bool) -> None:
    """OUT is not, inside or around the adapter; and new, empty, or (with `overwrite`) an adapter's."""
    from ..paths import input_clash

    clash = input_clash(out, [("adapter directory", adapter_dir)])
    if clash:
        raise RequestError(f"the output directory {out} {clash}; choose a directory of its own")
    fmt.check_adapter_out(out)  # not a file, nor the working directory, nor a directory of other files
    if is_nonempty_dir(out) and not overwrite:  # so it holds an adapter: replaced only when asked to
        raise RequestError(
            f"{out} already holds an adapter; pass {option('overwrite')} to replace it, or choose a new directory"
        )


def _lora_config(files: fmt.AdapterFiles) -> LoraConfig:
    """The adapter's LoraConfig; any other method, and DoRA, refused (with why)."""
    spec, config = fmt.config_from_peft(files.config, files.directory)
    if spec.name != "lora":
        raise AdapterFileError(
            f"{files.directory} is not a LoRA adapter but {spec.label}: IA³, prompt, prefix and bottleneck "
            "adapters are not low-rank, so there is no rank to reduce; compress takes LoRA and rsLoRA adapters"
        )
    if config.use_dora:
        raise AdapterFileError(
            f"{files.directory} is a DoRA adapter: its magnitude vector scales each output row by "
            "m / ‖W + ΔW‖, which depends on the full ΔW and the base weight W, so truncating ΔW alone "
            "would not keep the adapter's effect; compress takes LoRA and rsLoRA adapters (`peftkit merge` "
            "folds a DoRA adapter into its base model instead)"
        )
    return config


def _factor_keys(files: fmt.AdapterFiles) -> dict[str, tuple[str, str]]:
    """Module path -> the file keys of its (A, B) factors, modules in natural order (layers.2 before
    layers.10); a module with A but no B is refused."""
    keys = set(fmt.layer_keys(files.tensors))
    found: dict[str, tuple[str, str]] = {}
    for a_suffix, b_suffix in FACTOR_SUFFIXES:
        for key in keys:
            if not key.endswith("." + a_suffix):
                continue
            module = key.removesuffix("." + a_suffix)
            if f"{module}.{b_suffix}" not in keys:
                raise AdapterFileError(
                    f"{files.directory / fmt.WEIGHTS_FILE} has {a_suffix} but no {b_suffix} for {module}; "
                    "the file is incomplete"
                )
            found[module] = (fmt.layer_key(module, a_suffix), fmt.layer_key(module, b_suffix))
    if not found:
        raise AdapterFileError(f"{files.directory / fmt.WEIGHTS_FILE} holds no LoRA factors to compress")
    return dict(sorted(found.items(), key=lambda item: _natural(item[0])))


def _natural(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _check_factors(directory: Path, module: str, a: Tensor, b: Tensor, r: int) -> None:
    """The factors fit each other and the config's rank, and are finite (an SVD of NaN is no answer)."""
    if a.shape[0] != r or b.dim() < 2 or b.shape[1] != r:
        raise AdapterFileError(
            f"{directory}: adapter_config.json gives {module} rank {r}, its factors have shapes "
            f"{tuple(a.shape)} (A) and {tuple(b.shape)} (B); the adapter does not load as it is"
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterFileError(f"{directory}: the factors of {module} are not finite (NaN or inf)")


def _new_config(old: dict[str, Any], ranks: dict[str, int], r: int) -> dict[str, Any]:
    """The adapter_config.json: the old one with r, lora_alpha = r, no rsLoRA, and a rank_pattern and
    alpha_pattern entry (alpha = rank) for each layer of another rank, so every scaling is exactly 1."""
    patterns = {re.escape(module): rank for module, rank in ranks.items() if rank != r}
    return {
        **old,
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
    }


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
