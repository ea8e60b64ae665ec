"""Which command-line options peftkit's own messages suggest, and which commands can show each message:
read from the source, for `test_error_flags.py`.

The messages: every string literal that is not a docstring (an f-string as one text, "{}" for its
fields) and every `option("name", value)` call (`--name`, `--no-name`). A literal that is nothing but
a flag is a command line being built (`["--resume"]`), not advice, and is skipped.

Who can show a message: the commands whose code reaches the function (or method, or module-level
constant) that holds it, through a call graph built by name: a call or reference to a function of the
same module or an imported one, `module.f`, `self.f`, and `obj.f` for any peftkit method named f
(dynamic dispatch through a field, `spec.describe(...)`, and names every builtin type has, `get`,
`items`, are not followed). It over-approximates: a path may exist that no input takes.
"""

from __future__ import annotations

import ast
import inspect
import io
import pathlib
import re
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import peftkit
from peftkit import cli

SRC = Path(peftkit.__file__).parent
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*)")
COMMAND_TEXT = re.compile(r"peftkit ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?([^`\n]*)")
Unit = tuple[str, str]  # (module, "function" | "Class.method" | "Class" | "CONSTANT" | "<module>")


# -- the source ----------------------------------------------------------------------------------
def module_of(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_path(module: str) -> Path:
    base = SRC.parent.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


@cache
def modules() -> frozenset[str]:
    return frozenset(module_of(p) for p in SRC.rglob("*.py"))


@cache
def tree(module: str) -> ast.Module:
    return ast.parse(source_path(module).read_text(encoding="utf-8"))


def _is_docstring(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


@cache
def units(module: str) -> dict[str, list[ast.AST]]:
    """The module cut into units: top-level functions, methods ("Class.method"), each class's other
    statements ("Class"), each module-level assignment (its name), and the rest ("<module>")."""
    out: dict[str, list[ast.AST]] = {"<module>": []}
    for node in tree(module).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = [node]
        elif isinstance(node, ast.ClassDef):
            rest: list[ast.AST] = [*node.decorator_list, *node.bases]
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{item.name}"] = [item]
                elif not _is_docstring(item):
                    rest.append(item)
            out[node.name] = rest
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for name in [t.id for t in targets if isinstance(t, ast.Name)] or ["<module>"]:
                out.setdefault(name, []).append(node)
        elif not isinstance(node, (ast.Import, ast.ImportFrom)) and not _is_docstring(node):
            out["<module>"].append(node)
    return out


# -- the messages ----------------------------------------------------------------------------------
def texts(node: ast.AST) -> Iterator[str]:
    """Every string literal under `node` but docstrings, f-strings whole, and option(...) calls."""
    skip = {
        id(n.body[0].value)
        for n in ast.walk(node)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and n.body
        and _is_docstring(n.body[0])
    }
    parts = {id(v) for n in ast.walk(node) if isinstance(n, ast.JoinedStr) for v in n.values}
    for n in ast.walk(node):
        if isinstance(n, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in n.values)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip | parts:
            yield n.value
        elif isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "option":
            args = [a.value for a in n.args if isinstance(a, ast.Constant)]
            if args and isinstance(args[0], str):
                yield f"pass --{'' if len(args) < 2 or args[1] else 'no-'}{args[0].replace('_', '-')}"


def suggestions(text: str) -> Iterator[tuple[str | None, str]]:
    """(the command a flag is written for, or None for "the command showing it"; the flag), in one text.
    A flag after "peftkit COMMAND" in the same stretch of text (up to a backtick) is that command's."""
    if FLAG.fullmatch(text.strip()):
        return  # ["--resume"]: a command line being built
    spans = []
    for m in COMMAND_TEXT.finditer(text):
        words = [m.group(1)] + ([m.group(2)] if m.group(1) in cli.GROUPS and m.group(2) else [])
        if words[0] in cli.COMMANDS or words[0] in cli.GROUPS:
            spans.append((m.start(3), m.end(3), " ".join(words)))
    for m in FLAG.finditer(text):
        yield next((name for start, end, name in spans if start <= m.start() < end), None), m.group(0)


# -- the call graph --------------------------------------------------------------------------------
@cache
def imports(module: str) -> dict[str, tuple[str, str | None]]:
    """{local name: (peftkit module, attribute or None for the module itself)}; other libraries'
    names map to ("", None), so `AutoModel.from_pretrained` is never taken for a peftkit method."""
    package = module if source_path(module).name == "__init__.py" else module.rpartition(".")[0]
    out: dict[str, tuple[str, str | None]] = {}
    for n in ast.walk(tree(module)):
        if isinstance(n, ast.Import):
            for a in n.names:
                local = a.asname or a.name.split(".")[0]
                out[local] = (a.name if a.asname else local, None) if a.name in modules() else ("", None)
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = package.split(".")[: len(package.split(".")) - n.level + 1]
                base = ".".join(parts + ([n.module] if n.module else []))
            for a in n.names:
                full = f"{base}.{a.name}"
                if not base.startswith("peftkit"):
                    out[a.asname or a.name] = ("", None)
                else:
                    out[a.asname or a.name] = (full, None) if full in modules() else (base, a.name)
    return out


@cache
def _everyday_names() -> frozenset[str]:
    import torch

    kinds = (dict, list, set, str, bytes, pathlib.Path, io.TextIOWrapper, threading.Thread, object)
    return frozenset(name for kind in (*kinds, torch.nn.Module, torch.Tensor) for name in dir(kind))


@cache
def _fields() -> frozenset[str]:
    """Annotated class attributes anywhere in peftkit: a call through one is dynamic dispatch."""
    return frozenset(
        item.target.id
        for m in modules()
        for n in ast.walk(tree(m))
        if isinstance(n, ast.ClassDef)
        for item in n.body
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
    )


@cache
def _methods_named() -> dict[str, list[Unit]]:
    out: dict[str, list[Unit]] = {}
    for m in modules():
        for u in units(m):
            name = u.partition(".")[2]
            if name and name not in _everyday_names() and name not in _fields():
                out.setdefault(name, []).append((m, u))
    return out


def resolve(module: str, name: str, depth: int = 0) -> list[Unit]:
    """The units `name` means in `module`: defined there (a class brings its constructors), or imported."""
    defined = units(module)
    if name in defined:
        init = [f"{name}.{m}" for m in ("__init__", "__post_init__", "__call__") if f"{name}.{m}" in defined]
        return [(module, name), *((module, u) for u in init)]
    source, attr = imports(module).get(name, ("", None))
    return resolve(source, attr, depth + 1) if source and attr and depth < 10 else []


@cache
def calls(unit: Unit) -> frozenset[Unit]:
    module, name = unit
    names = imports(module)
    own_class = name.partition(".")[0] if "." in name else None
    out: set[Unit] = set()
    for node in units(module)[name]:
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                out.update(resolve(module, n.id))
            elif isinstance(n, ast.Attribute):
                receiver = n.value.id if isinstance(n.value, ast.Name) else None
                source, attr = names.get(receiver or "", (None, None))
                if source == "":
                    continue  # another library's name
                if source and attr is None:
                    out.update(resolve(source, n.attr))
                elif receiver in ("self", "cls") and own_class and f"{own_class}.{n.attr}" in units(module):
                    out.add((module, f"{own_class}.{n.attr}"))
                else:
                    out.update(_methods_named().get(n.attr, []))
    return frozenset(out)


@cache
def reach(start: Unit) -> frozenset[Unit]:
    """Every unit `start` may run, at any depth (never the CLI module's other commands)."""
    seen, todo = {start}, [start]
    while todo:
        for unit in calls(todo.pop()) - seen:
            if unit[0] != "peftkit.cli":
                seen.add(unit)
                todo.append(unit)
    return frozenset(seen)


# -- the commands ----------------------------------------------------------------------------------
def commands() -> dict[str, Unit]:
    """{"train": its function's unit, "registry show": ..., ...}: every command the parser has."""
    _parser()  # imports the command modules
    found = dict(cli.COMMANDS)
    for group, (_, functions) in cli.GROUPS.items():
        found |= {f"{group} {name}": fn for name, fn in functions.items()}
    return {name: (inspect.unwrap(fn).__module__, inspect.unwrap(fn).__name__) for name, fn in found.items()}


@cache
def _parser():  # noqa: ANN202 (an argparse.ArgumentParser)
    return cli.build_parser()


@cache
def parser_for(name: str):  # noqa: ANN201 (an argparse.ArgumentParser)
    parser = _parser()
    for word in name.split():
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[word]
    return parser


def accepts(name: str, flag: str) -> bool:
    """Whether `peftkit NAME` takes `flag` in some spelling (`--max_steps` is `--max-steps`); an
    abbreviation does not count."""
    return flag.replace("_", "-") in {s.replace("_", "-") for s in parser_for(name)._option_string_actions}


def shown(start: Unit) -> Iterator[tuple[Unit, str | None, str]]:
    """(where, the command it is written for or None, flag) of every suggestion `start` may show."""
    for unit in sorted(reach(start)):
        for owner, flag in unit_suggestions(unit):
            yield unit, owner, flag


@cache
def unit_suggestions(unit: Unit) -> tuple[tuple[str | None, str], ...]:
    return tuple(s for node in units(unit[0])[unit[1]] for text in texts(node) for s in suggestions(text))
