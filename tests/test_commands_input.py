"""What the merge, info, eval, generate and chat commands do with awkward input: one `error:` line and
exit code 2 before any slow work (never a traceback), and inputs left as they were.

Everything runs in-process on the tiny saved Llama of conftest (`tiny_model_dir`, a character-level
tokenizer), with a private peftkit cache per test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peftkit import AdaptedModel, LoraConfig
from peftkit.base import load_base
from peftkit.cli import main
from peftkit.naming import adapter_name_from
from peftkit.terminal import printable

ADAPTER = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def base(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


def save_adapter(base: Path, path: Path, name: str = "default") -> Path:
    model, _ = load_base(str(base), tokenizer="optional")
    return AdaptedModel.attach(model, ADAPTER, name).save_adapter(path)


def tokenizerless_base_and_adapter(tmp_path: Path) -> tuple[Path, Path]:
    """A model directory without tokenizer files (so any command that got as far as loading it would
    fail) in tmp_path/base, and an adapter for it in tmp_path/adapter: inputs to protect."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    return base, save_adapter(base, tmp_path / "adapter")


@pytest.fixture
def adapter(base: Path, tmp_path: Path) -> Path:
    return save_adapter(base, tmp_path / "adapter")


def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr) of this call alone."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(result: tuple[int, str, str], *needles: str, early: bool = True) -> None:
    """Exit code 2, nothing on stdout, one `error:` line naming every needle; with `early`, before
    the base model was loaded."""
    code, out, err = result
    assert code == 2 and out == "", (code, out, err)
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in last, last
    if early:
        assert err.count("\n") == 1 and "loading base model" not in err, err


def snapshot(*dirs: Path) -> dict[str, str]:
    """Every file under `dirs` by its content hash: what a refused command must leave alone."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in dirs
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


# -- merge: never over its inputs; a base without a tokenizer merges ------------------------------------
@pytest.mark.parametrize(
    "out, relation",
    [
        ("base", "is the base model directory"),
        ("adapter", "is the adapter directory"),
        ("base/merged", "is inside the base model directory"),
        ("adapter/sub/merged", "is inside the adapter directory"),
        (".", "contains the"),
    ],
)
def test_merge_refuses_an_output_that_is_inside_or_around_an_input(
    tmp_path: Path, capsys: pytest.CaptureFixture, out: str, relation: str
) -> None:
    base, adapter = tokenizerless_base_and_adapter(tmp_path)
    before = snapshot(base, adapter)
    argv = ["merge", base, adapter, tmp_path / out, "--overwrite"]
    assert_refused(run(argv, capsys), relation, "would overwrite its input")
    assert snapshot(base, adapter) == before


def test_merge_refuses_a_symlink_to_its_base(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, adapter = tokenizerless_base_and_adapter(tmp_path)
    (tmp_path / "link").symlink_to(base)
    before = snapshot(base)
    assert_refused(run(["merge", base, adapter, tmp_path / "link", "--overwrite"], capsys), "is the base")
    assert snapshot(base) == before


@pytest.mark.parametrize(
    "out, needle",
    [
        ("desktop", "holds no saved model"),  # a directory of other files (config.json alone is no model)
        ("home", "is or holds your home directory"),
        (".", "is or holds the current working directory"),
        ("work", "is or holds the current working directory"),  # the working directory's parent
    ],
)
def test_merge_overwrite_replaces_only_a_model_directory(
    base: Path,
    adapter: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    out: str,
    needle: str,
) -> None:
    for name in ("desktop", "home", "work/sub"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "notes.txt").write_text("mine")
        (tmp_path / name / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "work/sub")
    target = Path(out) if out == "." else tmp_path / out
    before = snapshot(tmp_path / "desktop", tmp_path / "home", tmp_path / "work")
    assert_refused(run(["merge", base, adapter, target, "--overwrite"], capsys), needle)
    if out == ".":  # even an empty working directory: replacing it would strand the shell
        (tmp_path / "empty").mkdir()
        monkeypatch.chdir(tmp_path / "empty")
        assert_refused(run(["merge", base, adapter, "."], capsys), needle)
    assert snapshot(tmp_path / "desktop", tmp_path / "home", tmp_path / "work") == before


def test_merge_overwrite_replaces_a_merged_model(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The control for the refusals above: a directory holding a model is replaced whole."""
    out = tmp_path / "merged"
    assert run(["merge", base, adapter, out], capsys)[0] == 0
    (out / "stale.txt").write_text("from the old model")
    code, _, err = run(["merge", base, adapter, out, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()


def test_merge_output_is_checked_for_writing_before_the_load(
    base: Path, adapter: Path, read_only_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for out in (read_only_dir / "merged", read_only_dir / "new" / "merged"):
        assert_refused(run(["merge", base, adapter, out], capsys), f"{read_only_dir} is not writable")
    (tmp_path / "a-file").write_text("x")
    assert_refused(run(["merge", base, adapter, tmp_path / "a-file/merged"], capsys), "a-file is a file")


def test_merge_a_base_saved_without_a_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A plain model.save_pretrained directory merges (as with HF PEFT), into files anyone can read."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    model, tokenizer = load_base(str(base), tokenizer="optional")
    assert tokenizer is None
    am = AdaptedModel.attach(model, ADAPTER)
    am.save_adapter(tmp_path / "adapter")
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = am(x).logits
    umask = os.umask(0o022)
    try:
        code, _, err = run(["merge", base, tmp_path / "adapter", tmp_path / "merged"], capsys)
    finally:
        os.umask(umask)
    assert code == 0, err
    assert "no tokenizer files to copy" in err
    files = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "merged").iterdir()}
    assert files == {"config.json": 0o644, "generation_config.json": 0o644, "model.safetensors": 0o644}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_commands_that_need_a_tokenizer_say_how_to_add_one(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    tiny_llama().save_pretrained(tmp_path / "plain")
    argv = {"generate": ["--prompt", "hi"], "chat": [], "eval": ["task:dates"]}[command]
    code, out, err = run([command, *argv, "--base", tmp_path / "plain"], capsys)
    assert_refused(
        (code, out, err),
        f"no tokenizer files in {tmp_path / 'plain'}",
        "tokenizer.save_pretrained",
        early=False,
    )
    assert "sentencepiece" not in err


# -- adapter names: any directory name works; NAME=DIR chooses one -----------------------------------
def test_adapter_name_from_any_text() -> None:
    assert adapter_name_from("lora-v1.2") == "lora-v1_2"
    assert adapter_name_from("best adapter") == "best_adapter"
    assert adapter_name_from("items") == "items-2"  # an attribute of torch's ModuleDict
    assert adapter_name_from("__base__") == "base-2"  # "base" means the base model
    assert adapter_name_from("base") == "base-2"
    assert adapter_name_from("...") == "adapter"
    assert adapter_name_from("a", taken=["a", "a-2"]) == "a-3"


def test_eval_names_adapters_after_any_directory(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dirs = ["lora-v1.2", "best adapter", "items", "x/adapter-best", "y/adapter-best", "base"]
    paths = [save_adapter(base, tmp_path / d) for d in dirs]
    argv = ["eval", "task:dates", "--base", base, "--n", 1, "--max-new-tokens", 1, "--no-perplexity"]
    code, out, err = run([*argv, "--adapters", *paths, "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    names = ["lora-v1_2", "best_adapter", "items-2", "adapter-best", "adapter-best-2", "base-2"]
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["base", *names]
    settings = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert settings["adapter_names"] == names and settings["adapters"] == [str(p) for p in paths]


def test_eval_takes_name_equals_dir(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first, second = save_adapter(base, tmp_path / "a"), save_adapter(base, tmp_path / "dir=with=equals")
    argv = ["eval", "task:dates", "--base", base, "--n", 1, "--max-new-tokens", 1, "--no-perplexity"]
    code, out, err = run([*argv, "--adapters", f"a={second}", f"mine={first}", second], capsys)
    assert code == 0, err  # an existing directory with "=" in its name is a directory, not NAME=DIR
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["base", "a", "mine", "dir_with_equals"]
    for spec, needle in [
        (f"a.b={first}", "adapter name 'a.b' is invalid"),
        (f"base={first}", "adapter name 'base' means the base model"),
        (f"keys={first}", "adapter name 'keys' is reserved"),
    ]:
        assert_refused(run([*argv, "--adapters", spec], capsys), f"--adapters '{spec}'", needle)
    assert_refused(run([*argv, "--adapters", f"x={first}", f"x={second}"], capsys), "'x' is taken")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_take_any_adapter_directory(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    adapter = save_adapter(base, tmp_path / "items v1.2")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi\n")))
    argv = ["--prompt", "hi"] if command == "generate" else []
    code, _, err = run([command, *argv, "--base", base, "--adapter", adapter, "--max-new-tokens", 2], capsys)
    assert code == 0, err
    assert "as 'items_v1_2'" in err


# -- numbers, files and output locations are checked before the base model loads -----------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--prompt", "hi", "--max-new-tokens", 0], "--max-new-tokens must be at least 1, got 0"),
        (
            ["generate", "--prompt", "hi", "--max-new-tokens", -3],
            "--max-new-tokens must be at least 1, got -3",
        ),
        (["generate", "--prompt", "hi", "--batch-size", 0], "--batch-size must be at least 1, got 0"),
        (["chat", "--max-new-tokens", 0], "--max-new-tokens must be at least 1, got 0"),
        (["eval", "task:dates", "--max-new-tokens", -1], "--max-new-tokens must be at least 0 (0 = auto)"),
        (["eval", "task:dates", "--n", -5], "--n must be at least 0 (0 = all), got -5"),
        (["eval", "task:dates", "--batch-size", 0], "--batch-size must be at least 1, got 0"),
        (["eval", "task:dates", "--samples", -1], "--samples must be at least 0, got -1"),
    ],
)
def test_numbers_out_of_range_are_refused(
    base: Path, capsys: pytest.CaptureFixture, argv: list, needle: str
) -> None:
    assert_refused(run([*argv, "--base", base], capsys), needle)


PROMPT_FILES = {  # name: (bytes or None for a directory, what the error says)
    "binary": (bytes(range(256)), "is a binary file"),
    "latin-1": ("w1\ncafé\n".encode("latin-1"), "line 2: byte 0xe9 is not UTF-8 text"),
    "directory": (None, "is a directory"),
    "answered": (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
        "line 1: the last message is the assistant's",
    ),
    "system-only": (
        b'{"messages": [{"role": "system", "content": "s"}]}\n',
        "the last message is the system's",
    ),
}


@pytest.mark.parametrize("kind", list(PROMPT_FILES))
def test_prompt_files_that_cannot_be_used(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str
) -> None:
    content, needle = PROMPT_FILES[kind]
    path = tmp_path / "prompts.txt"
    path.mkdir() if content is None else path.write_bytes(content)
    assert_refused(run(["generate", "--prompts", path, "--base", base], capsys), str(path), needle)


def test_prompt_file_with_a_byte_order_mark(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffw1\n".encode())
    code, out, err = run(["generate", "--prompts", path, "--base", base, "--max-new-tokens", 1], capsys)
    assert code == 0 and out.startswith(">>> w1\n"), err


def test_eval_json_output_is_checked_before_the_evaluation(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["eval", "task:dates", "--base", base, "--n", 1, "--max-new-tokens", 1, "--json"]
    (tmp_path / "a-file").write_text("x")
    assert_refused(run([*argv, tmp_path], capsys), f"--json {tmp_path} is a directory")
    assert_refused(run([*argv, tmp_path / "a-file/r.json"], capsys), "a-file is a file")
    code, _, err = run([*argv, tmp_path / "new/dir/r.json", "--no-perplexity"], capsys)
    assert code == 0 and (tmp_path / "new/dir/r.json").is_file(), err  # missing directories are made


def test_eval_json_in_a_read_only_directory(
    base: Path, read_only_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    for target in (read_only_dir / "r.json", read_only_dir / "new" / "r.json"):
        argv = ["eval", "task:dates", "--base", base, "--json", target]
        assert_refused(run(argv, capsys), f"{read_only_dir} is not writable")


def test_eval_metric_that_cannot_score_the_references(base: Path, capsys: pytest.CaptureFixture) -> None:
    """json_match on dates (not JSON) once failed after the model had answered every example."""
    argv = ["eval", "task:dates", "--base", base, "--n", 3, "--metric", "json_match"]
    assert_refused(
        run(argv, capsys), "reference answer of example 1 is not valid JSON", "choose a text metric"
    )


def test_eval_json_replaces_its_own_report(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["eval", "task:dates", "--base", base, "--n", 1, "--max-new-tokens", 1, "--no-perplexity"]
    for n in (1, 2):  # the second run rewrites the first one's report
        code, _, err = run([*argv, "--n", n, "--json", tmp_path / "r.json"], capsys)
        assert code == 0, err
        assert json.loads((tmp_path / "r.json").read_text())["settings"]["n"] == n


@pytest.mark.parametrize("content", [b'{"lr": 0.001}', b"notes", b"\x00\xff binary"])
def test_eval_json_does_not_replace_a_file_that_is_not_a_report(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes
) -> None:
    other = tmp_path / "settings.json"
    other.write_bytes(content)
    argv = ["eval", "task:dates", "--base", base, "--n", 1, "--json", other]
    assert_refused(run(argv, capsys), "exists and is not an earlier peftkit eval report")
    assert other.read_bytes() == content


@pytest.mark.parametrize(
    "target, needle",
    [
        ("base/model.safetensors", "exists and is not an earlier peftkit eval report"),
        ("adapter/adapter_config.json", "exists and is not an earlier peftkit eval report"),
        ("data.jsonl", "is the data"),
        ("base", "is a directory"),
    ],
)
def test_eval_json_never_lands_on_an_input(
    tmp_path: Path, capsys: pytest.CaptureFixture, target: str, needle: str
) -> None:
    base, adapter = tokenizerless_base_and_adapter(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    )
    before = snapshot(tmp_path)
    argv = ["eval", data, "--base", base, "--adapters", adapter, "--json", tmp_path / target]
    assert_refused(run(argv, capsys), f"--json {tmp_path / target} {needle}")
    assert snapshot(tmp_path) == before


def test_eval_json_may_go_beside_an_input(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A new report destroys nothing, so it may go into the base model's or an adapter's directory."""
    import shutil

    own_base = Path(shutil.copytree(base, tmp_path / "base"))
    adapter = save_adapter(own_base, tmp_path / "adapter")
    argv = ["eval", "task:dates", "--base", own_base, "--adapters", adapter, "--n", 1, "--max-new-tokens", 1]
    for report in (own_base / "report.json", adapter / "report.json"):
        code, _, err = run([*argv, "--json", report], capsys)
        assert code == 0 and report.is_file(), err


def test_chat_skips_a_line_that_is_not_utf8(
    base: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"w1\ncaf\xe9\nw2\n/quit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run(["chat", "--base", base, "--max-new-tokens", 2], capsys)
    assert code == 0, err
    assert "skipped a line that is not UTF-8 text: byte 0xe9" in err
    assert len(out.splitlines()) == 2  # answers to w1 and w2, the conversation went on


# -- base fingerprints: the command line's own option ----------------------------------------------------
@pytest.fixture
def foreign(base: Path, tmp_path: Path) -> Path:
    """An adapter saved on another base with the same shapes: its fingerprint does not match."""
    other = tmp_path / "other-base"
    model, tokenizer = load_base(str(base))
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    return save_adapter(other, tmp_path / "foreign")


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "{base}", "{adapter}", "{out}"],
        [
            "eval",
            "task:dates",
            "--base",
            "{base}",
            "--adapters",
            "{adapter}",
            "--n",
            "1",
            "--max-new-tokens",
            "1",
        ],
        ["generate", "--prompt", "hi", "--base", "{base}", "--adapter", "{adapter}", "--max-new-tokens", "1"],
        ["chat", "--base", "{base}", "--adapter", "{adapter}", "--max-new-tokens", "1"],
    ],
    ids=["merge", "eval", "generate", "chat"],
)
def test_fingerprint_mismatch_names_no_check_base(
    base: Path,
    foreign: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
) -> None:
    argv = [a.format(base=base, adapter=foreign, out=tmp_path / "merged") for a in argv]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code, out, err = run(argv, capsys)
    assert_refused(
        (code, out, err), "fingerprint", "--no-check-base (check_base=False in Python)", early=False
    )
    code, _, err = run([*argv, "--no-check-base"], capsys)
    assert code == 0, err


# -- info: the tensors' rank, and nothing a terminal would run -------------------------------------------
def test_info_reads_the_rank_from_the_tensors(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))  # the tensors have r = 2
    code, out, err = run(["info", adapter], capsys)
    assert code == 0, err
    rank = next(line for line in out.splitlines() if line.startswith("rank"))
    assert rank.split(None, 1)[1].startswith("r = 2; adapter_config.json disagrees for 4 layers")
    assert "config r = 8, tensors r = 2" in rank and "will not load" in rank
    assert "scaling 4 = lora_alpha / r" in out  # lora_alpha 8 / the real r 2
    facts = json.loads(run(["info", adapter, "--json"], capsys)[1])
    assert (facts["r"], facts["config_r"], len(facts["rank_mismatches"])) == (2, 8, 4)
    assert facts["rank_mismatches"][0] == {
        "module": "model.layers.0.self_attn.q_proj",
        "config": 8,
        "tensors": 2,
    }


def test_info_when_config_and_tensors_agree(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    facts = json.loads(run(["info", adapter, "--json"], capsys)[1])
    assert (facts["r"], facts["config_r"], facts["rank_mismatches"]) == (2, 2, [])
    assert "rank             r = 2\n" in run(["info", adapter], capsys)[1]


def test_info_escapes_control_characters_from_the_files(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    evil = "\x1b]0;owned\x07\x1b[2J\u202eevil\nsecond line"
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": evil}))
    weights = adapter / "adapter_model.safetensors"
    save_file(load_file(weights), str(weights), metadata={"peftkit_version": "\x1b[31m9"})
    code, out, err = run(["info", adapter], capsys)
    assert code == 0, err
    assert not any(c in out for c in "\x1b\x07\u202e") and len(out.splitlines()) == 12
    assert "base model       \\x1b]0;owned\\x07\\x1b[2J\\u202eevil\\nsecond line" in out
    assert "saved by         peftkit \\x1b[31m9" in out
    assert json.loads(run(["info", adapter, "--json"], capsys)[1])["base_model"] == evil  # JSON escapes


def test_error_lines_escape_control_characters(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no\x1b[2Jsuch"
    code, out, err = run(["info", missing], capsys)
    assert code == 2 and "\x1b" not in err and "no\\x1b[2Jsuch" in err


def test_printable_keeps_text_and_chosen_characters() -> None:
    assert printable("naïve 日本 👍🏽 a\tb") == "naïve 日本 👍🏽 a\\tb"
    assert printable("a\nb\tc\x1b", keep="\n\t") == "a\nb\tc\\x1b"


def test_a_path_too_long_for_the_filesystem_is_one_error_line(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    long = tmp_path / ("a" * 300)  # a name over the 255 bytes a Linux filesystem allows
    for argv in (
        ["train", "--base", base, "--data", long, "--max_steps", 1],
        ["train", "--base", base, "--data", "task:dates", "--output_dir", long / "run", "--max_steps", 1],
        ["info", long],
        ["merge", base, long, tmp_path / "merged"],
    ):
        code, out, err = run(argv, capsys)
        assert code == 2 and "Traceback" not in err and err.startswith("error: "), (argv, err)


def test_generate_refuses_a_blank_prompt(base: Path, capsys: pytest.CaptureFixture) -> None:
    assert_refused(
        run(["generate", "--prompt", "hello", " ", "--base", base], capsys), "PROMPT argument is blank"
    )


def test_logged_adapter_names_escape_control_characters(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    adapter = save_adapter(base, tmp_path / "e\x1b[31mvil")
    code, _, err = run(
        ["generate", "--prompt", "hi", "--base", base, "--adapter", adapter, "--max-new-tokens", 1], capsys
    )
    assert code == 0 and "\x1b" not in err and "e\\x1b[31mvil" in err, err
