"""`peftkit registry ...`: the adapter registry from the command line (tables for people, --json for scripts)."""

from __future__ import annotations

import json as _json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from ..command_args import Positional
from ..policy import promote
from ..terminal import printable
from .gate import Gate
from .store import Registry, Version


def _print_json(value: Any) -> None:
    print(_json.dumps(value, indent=2))


def _report(json: bool, data: Any, text: str) -> None:
    """`data` as JSON for scripts, else one line for people."""
    if json:
        _print_json(data)
    else:
        print(printable(text))


def _print_versions(versions: list[Version], json: bool) -> None:
    if json:
        _print_json([v.to_dict() for v in versions])
        return
    rows = [("version", "stage", "method", "base", "by", "created", "digest")]
    for v in versions:
        base = (v.base_fingerprint or "")[7:19] or "unknown"
        rows.append((v.ref, v.stage, v.method, base, v.created_by, v.created_at, v.digest[:12]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(printable("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()))


def registry_register(
    name: str,
    adapter_dir: Path,
    description: str = "",
    tag: list[str] | None = None,
    parent: str | None = None,
    user: str | None = None,
    registry: str | None = None,
    json: bool = False,
) -> None:
    """Register an adapter directory as the next version of NAME (a draft); identical files are a no-op.

    Args:
        name: the adapter's name in the registry (letters, digits, '.', '_', '-')
        adapter_dir: the adapter directory (adapter_config.json + adapter_model.safetensors, and the
            training files `peftkit train` writes beside them)
        description: free text kept with the version
        tag: a free-form tag (repeat the option for several)
        parent: the version this one derives from (a reference: NAME@N)
        user: who registers (default: $PEFTKIT_USER, else the OS user)
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the version as JSON
    """
    reg = Registry.open(registry)
    before = {v.number for v in reg.versions(name)}
    version = reg.register(
        name, adapter_dir, user=user, description=description, tags=tag or [], parent=parent
    )
    if version.number in before:  # the same files again: said, so a rerun is not taken for a new version
        _note(f"{adapter_dir} is identical to {version.ref} ({version.stage}); no new version")
    _print_versions([version], json)


def registry_list(
    name: Annotated[str | None, Positional()] = None, registry: str | None = None, json: bool = False
) -> None:
    """List the registered versions (of one adapter, if NAME is given).

    Args:
        name: only this adapter's versions
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print JSON instead of a table
    """
    _print_versions(Registry.open(registry, create=False).versions(name), json)


def registry_show(ref: str, registry: str | None = None, json: bool = False) -> None:
    """Everything a version records: stage, method, base fingerprint, files, facts.

    Args:
        ref: NAME (its production version), NAME@STAGE, NAME@N or NAME@sha256:PREFIX
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print JSON
    """
    version = _shown_version(Registry.open(registry, create=False), ref)
    if json:
        _print_json(version.to_dict())
        return
    for key, value in version.to_dict().items():
        text = ", ".join(f"{k} ({s[:12]})" for k, s in value.items()) if key == "files" else value
        if key != "facts":
            print(printable(f"{key:<18}{text}"))


def _shown_version(reg: Registry, ref: str) -> Version:
    """The version `registry show REF` shows: a bare NAME with no production version shows its latest
    version, with a note that says which one and that none is in production."""
    if "@" in ref:
        return reg.resolve_version(ref)
    versions = reg.versions(ref)
    if not versions or any(v.stage == "production" for v in versions):
        return reg.resolve_version(ref)  # its production version, or the error naming what exists
    latest = versions[-1]
    _note(f"{ref!r} has no production version; showing its latest, {latest.ref} ({latest.stage})")
    return latest


def _note(text: str) -> None:
    """One `peftkit: ...` line on stderr: stdout stays the table or the JSON scripts read."""
    print(printable(f"peftkit: {text}"), file=sys.stderr)


def registry_path(ref: str, registry: str | None = None, json: bool = False) -> None:
    """Print the directory of a version's verified files (for tools that take an adapter directory,
    e.g. vLLM's --lora-modules NAME=PATH).

    Args:
        ref: NAME (its production version), NAME@STAGE, NAME@N or NAME@sha256:PREFIX
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print {"ref": NAME@N, "path": DIR}
    """
    reg = Registry.open(registry, create=False)
    version = reg.resolve_version(ref)
    path = reg.resolve(version.ref)
    if json:
        _print_json({"ref": version.ref, "path": str(path)})
    else:
        print(path)


def registry_promote(
    ref: str,
    to: Literal["staging", "production"] = "staging",
    force: bool = False,
    reason: str = "",
    user: str | None = None,
    registry: str | None = None,
    json: bool = False,
) -> None:
    """Promote a version: draft -> staging -> production (the production version it replaces is archived).

    Args:
        ref: the version (NAME@N, NAME@staging, ...)
        to: staging or production
        force: skip the evaluation gate (recorded in the audit log)
        reason: why, for the audit log
        user: who promotes (default: $PEFTKIT_USER, else the OS user)
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the version as JSON, with the gate's result ("gate") when the gate ran
    """
    reg = Registry.open(registry, create=False)
    version = promote(reg, ref, to, force=force, reason=reason, user=user)
    if not json:
        print(printable(f"{version.ref} is in {version.stage}"))
        return
    # The gate's result is stored with the promotion: the newest promote entry of this version.
    entries = [e for e in reg.history(version.name) if e.action == "promote" and e.version == version.number]
    gate = entries[-1].details.get("gate") if entries else None
    _print_json(version.to_dict() | ({"gate": gate} if gate is not None else {}))


def registry_gate(
    name: str,
    data: str,
    metric: Literal["auto", "exact_match", "json_match", "accuracy", "token_f1", "rouge_l"] = "auto",
    n: int = 100,
    min_score: float | None = None,
    max_perplexity: float | None = None,
    margin: float = 0.0,
    base: str | None = None,
    max_new_tokens: int = 0,
    user: str | None = None,
    registry: str | None = None,
    json: bool = False,
) -> None:
    """Set the evaluation gate NAME's versions pass on their way to production.

    The gate evaluates the candidate next to the base model and the current production version (in the
    same mixed batches) and passes when the candidate changes the base model's outputs, meets the
    thresholds, and scores no more than --margin below the production version.

    Args:
        name: the adapter
        data: the eval set: a built-in task (task:dates) or a data file, which the registry stores by hash
        metric: the metric (auto: the task's own, exact_match for files)
        n: how many examples
        min_score: the candidate's score must be at least this
        max_perplexity: the candidate's perplexity of the reference answers must be at most this
        margin: how far below the production version's score the candidate may be
        base: the base model to evaluate on (default: the one each version records)
        max_new_tokens: tokens to generate per answer; 0 = auto, as `peftkit eval` (the task's, or
            the longest reference answer + 8)
        user: who sets it (default: $PEFTKIT_USER, else the OS user)
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the stored gate as JSON (a data file's path is then the registry's copy)
    """
    gate = Gate(data, metric, n, min_score, max_perplexity, margin, base, max_new_tokens)
    stored = Registry.open(registry).set_gate(name, gate, user=user)
    _report(json, stored.to_dict(), f"gate for {name}: {stored.to_dict()}")


def registry_demote(
    ref: str,
    to: Literal["draft", "staging", "archived"] = "archived",
    reason: str = "",
    user: str | None = None,
    registry: str | None = None,
    json: bool = False,
) -> None:
    """Demote a version: to staging, to draft, or out of use (archived).

    Args:
        ref: the version (NAME@N, NAME@production, ...)
        to: staging, draft or archived
        reason: why, for the audit log
        user: who demotes (default: $PEFTKIT_USER, else the OS user)
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the version as JSON
    """
    version = Registry.open(registry, create=False).demote(ref, to, reason=reason, user=user)
    _report(json, version.to_dict(), f"{version.ref} is in {version.stage}")


def registry_rollback(
    name: str, reason: str = "", user: str | None = None, registry: str | None = None, json: bool = False
) -> None:
    """Put the previous production version of NAME back in production, in one step.

    Args:
        name: the adapter
        reason: why, for the audit log
        user: who rolls back (default: $PEFTKIT_USER, else the OS user)
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the version now in production as JSON
    """
    version = Registry.open(registry, create=False).rollback(name, reason=reason, user=user)
    _report(json, version.to_dict(), f"{version.ref} is in production again")


def registry_delete(
    ref: str, reason: str = "", user: str | None = None, registry: str | None = None, json: bool = False
) -> None:
    """Delete a version (not one in production, nor the parent of another); `gc` then frees its files.

    Args:
        ref: the version (NAME@N)
        reason: why, for the audit log
        user: who deletes (default: $PEFTKIT_USER, else the OS user)
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the deleted version as JSON
    """
    version = Registry.open(registry, create=False).delete(ref, reason=reason, user=user)
    _report(json, version.to_dict(), f"deleted {version.ref} (its files stay until `peftkit registry gc`)")


def registry_gc(grace: float = 3600.0, registry: str | None = None, json: bool = False) -> None:
    """Remove stored files that no version refers to any more.

    Args:
        grace: keep unreferenced files younger than this many seconds (a registration in progress
            stores its files before it records the version)
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print {"removed": [the sha256 of each file removed]}
    """
    removed = Registry.open(registry, create=False).gc(grace=grace)
    if json:
        _print_json({"removed": removed})
    else:
        print(f"removed {len(removed)} unreferenced file(s)")


def registry_export(ref: str, out: Path, registry: str | None = None, json: bool = False) -> None:
    """Write one version, its metadata and its adapter's audit entries to a self-contained .tar bundle.

    Args:
        ref: the version (NAME@N, NAME@production, ...)
        out: the bundle file to write (replaced atomically if it exists)
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print {"bundle": the file written, "version": the version exported}
    """
    from .bundle import export_bundle

    reg = Registry.open(registry, create=False)
    version = reg.resolve_version(ref)  # NAME@N from here on: the bundle and the output name one version
    bundle = export_bundle(reg, version.ref, out)
    _report(json, {"bundle": str(bundle), "version": version.to_dict()}, f"wrote {out}")


def registry_import(
    bundle: Path, user: str | None = None, registry: str | None = None, json: bool = False
) -> None:
    """Register the version in a bundle (checked whole before anything is written) as a new draft.

    Args:
        bundle: a .tar written by `peftkit registry export`
        user: who imports (default: $PEFTKIT_USER, else the OS user)
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print the version as JSON
    """
    from .bundle import import_bundle

    _print_versions([import_bundle(Registry.open(registry), bundle, user=user)], json)


def registry_history(
    name: Annotated[str | None, Positional()] = None, registry: str | None = None, json: bool = False
) -> None:
    """The audit log: every change, who made it and when (of one adapter, if NAME is given).

    Args:
        name: only this adapter's entries
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print JSON lines, one entry each (an export of the log)
    """
    for entry in Registry.open(registry, create=False).history(name):
        if json:
            print(_json.dumps(entry.to_dict()))
        else:
            version = f"{entry.name}@{entry.version}" if entry.version else entry.name
            details = {k: v for k, v in entry.details.items() if v not in ("", None)}
            print(printable(f"{entry.when}  {entry.who:<12} {entry.action:<9} {version:<20} {details}"))


def registry_check(registry: str | None = None, json: bool = False) -> int:
    """Verify the whole registry: every version's files against their hashes, and the audit chain.

    Exits 1 (listing each problem) if anything is wrong, 0 if the registry is sound.

    Args:
        registry: the registry directory (default: $PEFTKIT_REGISTRY, else ~/.peftkit/registry)
        json: print {"sound": true or false, "versions": how many were checked, "problems": [...]}
    """
    reg = Registry.open(registry, create=False)
    problems = reg.check()
    if json:
        _print_json({"sound": not problems, "versions": len(reg.versions()), "problems": problems})
        return 1 if problems else 0
    for problem in problems:
        print(printable(f"problem: {problem}"))
    print(
        f"{len(reg.versions())} versions checked: " + (f"{len(problems)} problem(s)" if problems else "sound")
    )
    return 1 if problems else 0
