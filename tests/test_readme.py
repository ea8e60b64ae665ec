"""The README's examples run as written: its Python blocks execute, its commands parse, its setup is the Makefile's."""

from __future__ import annotations

import json
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
    assert re.search(
        r"^test: setup( browser)?( promtool)?\n\t\$\(PY\) -m pytest", makefile, flags=re.MULTILINE
    )


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


# What each README command gets appended when the test runs it: the same command on a small budget
# (argparse keeps the last value of an option, so these override the README's own values).
BUDGET = {
    "demo": ["--steps", "2", "--n-test", "2", "--min-score", "0"],
    "train": [
        *"--max_steps 2 --checkpoint_every 1 --batch_size 2 --val_fraction 0.01 --eval_every 2".split(),
        "--progress",
        "false",
    ],
    "eval": ["--n", "2", "--max-new-tokens", "4"],
    "generate": ["--max-new-tokens", "4"],
    "chat": ["--max-new-tokens", "4"],
    "tour": ["--max-new-tokens", "2"],
    "compare": ["--max_steps", "2", "--eval_every", "2"],  # the shared keys, for every variant
}
# The README's placeholders for the reader's own files, made in the scratch directory.
PLACEHOLDERS = (
    "my_data.jsonl",
    "data/test.jsonl",
    "my_prompts.jsonl",
    "path/to/hf-model-dir",
    "path/to/adapter",
)


def _make_placeholders(root: Path) -> None:
    """The files the README's commands name as the reader's own: data, prompts, a model directory
    and an adapter for it."""
    import shutil

    from peftkit import AdaptedModel, LoraConfig, load_base
    from peftkit.base.cache import default_cache_dir
    from peftkit.base.sources import resolve_source

    (root / "examples").symlink_to(ROOT / "examples")  # the shipped configs, as in a checkout
    support = ROOT / "examples/data/support.jsonl"
    shutil.copy(support, root / "my_data.jsonl")
    (root / "data").mkdir()
    shutil.copy(support, root / "data/test.jsonl")
    (root / "my_prompts.jsonl").write_text('{"prompt": "Say hello."}\n{"prompt": "Name a colour."}\n')
    model, _ = load_base()  # converts the built-in GGUF into the cache if no test did yet
    (root / "path/to").mkdir(parents=True)
    (root / "path/to/hf-model-dir").symlink_to(
        default_cache_dir() / "models" / resolve_source("smollm2-135m").cache_name
    )
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    AdaptedModel.attach(model, config).save_adapter(root / "path/to/adapter")


def _stand_in_for_the_builtin(cache: Path, model_dir: Path) -> None:
    """Put a tiny model where `load_base("smollm2-135m")` finds its converted checkpoint in the cache
    `cache` (what the first load of the GGUF writes: the model directory and its fingerprint sidecar),
    so every command that names the built-in model, or uses it by default, runs on the tiny one."""
    import shutil

    from transformers import AutoModelForCausalLM

    from peftkit.base import model_fingerprint
    from peftkit.base.catalog import DEFAULT_BASE
    from peftkit.base.load import SIDECAR_NAME
    from peftkit.base.sources import resolve_source

    entry = cache / "models" / resolve_source(DEFAULT_BASE).cache_name
    shutil.copytree(model_dir, entry)
    fingerprint = model_fingerprint(AutoModelForCausalLM.from_pretrained(entry))
    (entry / SIDECAR_NAME).write_text(json.dumps({"fingerprint": fingerprint, "source": "test", "format": 1}))


def test_shell_commands_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_model_dir: Path
) -> None:
    """Every `peftkit` command line of the README runs, in order, as a reader would type it (with a
    small step and example budget appended), and exits 0. `make demo` runs its `peftkit demo`;
    `make test` is this suite. The built-in model is a tiny stand-in here (in a private cache, where
    the converted GGUF would be): the commands are what is tested, and on the real model they took
    six minutes of the suite's fifteen on a 2-core CPU; the real model's own tests are the
    `integration` ones (test_integration.py, the Python examples below, test_base, test_eval)."""
    import io
    import sys

    from peftkit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))  # also for the processes it starts
    _stand_in_for_the_builtin(tmp_path / "cache", tiny_model_dir)
    _make_placeholders(tmp_path)
    commands = [c for c in shell_commands() if c != "make test"]
    assert commands[0] == "make demo" and all(c.startswith(("peftkit ", "curl ")) for c in commands[1:])
    commands[0] = "peftkit demo"
    assert all(p in " ".join(commands) for p in PLACEHOLDERS), (
        "a placeholder is no longer used: update the list"
    )
    server = None
    for line in commands:
        argv = shlex.split(line)[1:]
        if line.startswith("peftkit serve"):
            server = _Server(argv)  # in the background, as in the reader's first shell
            continue
        if line.startswith("curl "):  # from the reader's second shell, to the server started above
            assert server is not None, f"`{line}` needs the server the README starts before it"
            server.check(line)
            continue
        if "--resume" in argv:
            argv += [*BUDGET["train"], "--max_steps", "3"]  # one step more than the run it continues
        else:
            argv += BUDGET.get(argv[0], [])
        monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n/quit\n"))  # for chat
        code = main(argv)
        output = capsys.readouterr()
        assert code == 0, f"`{line}` exited {code}:\n{output.err[-3000:]}"
    assert server is not None and server.stop() == 0  # Ctrl-C: a clean shutdown
    assert (tmp_path / "runs/extract-dora/checkpoints/step-00000003").is_dir()  # the resume continued
    assert json.loads((tmp_path / "scores.json").read_text())["settings"]["adapters"]
    from transformers import AutoModelForCausalLM

    for merged in ("out/merged-dates", "out/merged"):
        AutoModelForCausalLM.from_pretrained(tmp_path / merged)


class _Server:
    """The README's `peftkit serve` line in a subprocess on a free port (the README's port replaced),
    waited for until it is ready; `check` runs a README `curl` line against it."""

    def __init__(self, argv: list[str]) -> None:
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.readme_port = argv[argv.index("--port") + 1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "peftkit", *argv, "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 900  # a hang guard: it waits for /ready, however slow the machine
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"peftkit serve exited:\n{self.process.stdout.read()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("peftkit serve did not become ready within 900 s")

    def check(self, line: str) -> None:
        import subprocess

        argv = [a.replace(f":{self.readme_port}/", f":{self.port}/") for a in shlex.split(line)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"`{line}` failed: {done.stderr}"
        body = json.loads(done.stdout)
        assert "error" not in body, body
        if "/chat/completions" in line:
            assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0
        else:
            assert body["data"], body

    def stop(self) -> int:
        import signal

        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=900)
