"""The README's examples run as written: its Python blocks execute, its commands parse, its setup is the Makefile's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from peftkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_blocks(language: str) -> list[str]:
    """The bodies of the README's ```<language> fenced blocks, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)


def shell_commands() -> list[str]:
    """Every command line of the README's ```bash blocks, comments stripped."""
    lines = (line.split("#", 1)[0].strip() for block in code_blocks("bash") for line in block.splitlines())
    return [line for line in lines if line]


def test_setup_is_exactly_make_demo_and_make_test() -> None:
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", setup, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1
    assert [line.strip() for line in blocks[0].splitlines() if line.strip()] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: setup\n\t\$\(VENV\)/bin/peftkit demo$", makefile, flags=re.MULTILINE)
    assert re.search(r"^test: setup\n\t\$\(PY\) -m pytest", makefile, flags=re.MULTILINE)


def test_every_cli_example_parses() -> None:
    """Each `peftkit ...` line in the README is a valid command line for the current CLI."""
    parser = build_parser()
    examples = [shlex.split(c) for c in shell_commands() if c.startswith("peftkit ")]
    assert {e[1] for e in examples} >= {"demo", "info", "merge"}
    for argv in examples:
        parser.parse_args(argv[1:])  # exits (fails the test) on an unknown command or option


@pytest.mark.integration
def test_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All ```python blocks, executed in order in one namespace (they form one session), in a
    scratch directory so the files they write land there."""
    blocks = code_blocks("python")
    assert len(blocks) >= 6
    assert any("load_base()" in b for b in blocks)  # they use the real default model: integration
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {i + 1} failed:\n{block}") from e
    # The session ended with a merged model on disk that plain transformers loads.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out/readme/merged")
    assert not any("lora" in k for k in merged.state_dict())
    assert (tmp_path / "out/readme/from-hf-peft/adapter_model.safetensors").is_file()
