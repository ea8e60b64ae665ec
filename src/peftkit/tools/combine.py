"""`peftkit combine`'s library side: read the LoRA adapter files (or registry references), check they
can be combined before the base model loads, open them on their base, combine (the math is
`peftkit.methods.lora_combine`) and save the new adapter."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import AdapterFileError, RequestError
from ..formats import peft as fmt
from ..methods.lora_combine import (  # noqa: F401 (peftkit.combine's names)
    HOWS,
    CombineResult,
    check_request,
    combine_adapters,
    combined_rank,
    merge_task_tensors,
)


def combine_files(
    out: str | Path,
    adapter_dirs: list[str | Path],
    weights: list[float],
    how: str = "svd",
    *,
    density: float | None = None,
    rank: int | None = None,
    base: str | None = None,
    name: str = "combined",
    seed: int | None = None,
    check_base: bool = True,
    registry: str | None = None,
) -> CombineResult:
    """`peftkit combine`: load the saved LoRA adapters onto their base, combine them and save the new
    adapter to `out` in the PEFT format. `base` defaults to the base the first adapter records;
    `weights` empty means 1 for each adapter; check_base=False loads them onto a `base` whose
    fingerprint differs from the one they record. The request, the files and whether their ranks allow
    `how` are checked before the base model loads."""
    from ..identity import AdapterIdentity
    from ..naming import adapter_name_from
    from ..paths import input_clash
    from .opening import open_model, read_adapters

    weights = list(weights) if weights else [1.0] * len(adapter_dirs)  # unset: each weighs 1
    if how not in HOWS or not adapter_dirs:
        check_request(len(adapter_dirs), weights, how, density, rank)
    sources = read_adapters([(str(i), d) for i, d in enumerate(adapter_dirs)], registry)
    names: list[str] = []
    for i, source in enumerate(sources):  # each adapter named after its directory, unique
        names.append(adapter_name_from(source.directory.name, [*names, name]))
        sources[i] = replace(source, name=names[-1])
    clash = input_clash(Path(out), [("adapter directory", s.directory) for s in sources])
    if clash:
        raise RequestError(f"the output directory {out} {clash}; choose a directory of its own")
    fmt.check_adapter_out(Path(out))  # new, empty or an adapter's: said before the slow load
    recorded: dict[Path, tuple[str | None, str | None]] = {}  # dir -> (base name, base fingerprint)
    ranks: dict[str, int] = {}
    for source in sources:
        files, d = source.files, source.directory
        spec = fmt.method_of(files.config, files.directory)
        if spec.name != "lora":
            raise AdapterFileError(f"{d} is a {spec.label} adapter; combine takes LoRA adapters only")
        identity = AdapterIdentity.from_metadata(files.metadata)
        recorded[d] = (files.config.get("base_model_name_or_path") or None, identity.base_fingerprint)
        ranks[str(d)] = max(
            (t.shape[0] for k, t in files.tensors.items() if k.endswith("lora_A.weight")), default=0
        )
    # Whether the adapters can be combined this way at all is known from the files: said before the
    # weights are checked and before the slow base-model load.
    combined_rank(how, ranks, rank if how == "svd" else None)
    check_request(len(adapter_dirs), weights, how, density, rank)
    prints = {d: fp for d, (_, fp) in recorded.items() if fp}
    if len(set(prints.values())) > 1:
        listed = ", ".join(f"{d} ({fp[:12]})" for d, fp in prints.items())
        raise AdapterFileError(f"the adapters were trained on different base models: {listed}")
    base = base or next((b for b, _ in recorded.values() if b), None)
    if base is None:
        raise RequestError("the adapters record no base model; name it with --base")
    am = open_model(base, sources, tokenizer="optional", check_base=check_base, registry=registry).model
    result = am.combine(names, weights, name, how, density=density, rank=rank, seed=seed)
    am.save_adapter(out, name)
    return result
