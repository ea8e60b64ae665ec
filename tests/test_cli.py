"""The `peftkit` command line: the generator that turns typed functions into argparse, and each command."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from conftest import VOCAB, tiny_llama
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from peftkit import AdaptedModel, AdapterFileError, LoraConfig, __version__
from peftkit.base import DEFAULT_BASE, load_base
from peftkit.cli import COMMANDS, build_parser, main


# -- the generator -------------------------------------------------------------------------------
def toy(
    name: str,
    files: list[str],
    count: int = 3,
    ratio: float = 0.5,
    mode: Literal["fast", "slow"] = "fast",
    verbose: bool = False,
    cache: bool = True,
    out: Path = Path("out/toy"),
    label: str | None = None,
    tags: list[str] | None = None,
) -> int:
    """Greet someone, for the generator's tests.

    A second paragraph that only the command's own --help shows.

    Args:
        name: who to greet
        files: files to read
        count: how many times, a help text that continues
            on a second line
        ratio: a fraction
        mode: how to run
        verbose: say more
        cache: keep results
        out: where to write
        label: an optional label
        tags: labels, repeatable
    """
    return count


def parse(*argv: str) -> dict:
    args = vars(build_parser({"toy": toy}).parse_args(["toy", *argv]))
    assert args.pop("_fn") is toy
    args.pop("_parser")
    return args


def test_generator_maps_signature_to_arguments() -> None:
    assert parse("bob", "a.txt", "b.txt") == {
        "name": "bob",
        "files": ["a.txt", "b.txt"],
        "count": 3,
        "ratio": 0.5,
        "mode": "fast",
        "verbose": False,
        "cache": True,
        "out": Path("out/toy"),
        "label": None,
        "tags": None,
    }
    args = parse("bob", "a", "--count", "7", "--ratio", "0.25", "--mode", "slow", "--verbose", "--no-cache")
    assert (args["count"], args["ratio"], args["mode"], args["verbose"], args["cache"]) == (
        7,
        0.25,
        "slow",
        True,
        False,
    )
    assert isinstance(args["count"], int) and isinstance(args["ratio"], float)
    assert parse("bob", "a", "--out", "x/y", "--label", "L")["out"] == Path("x/y")
    # A repeated list option adds up (`--tags a b --tags c`), as people type it; it does not keep the last.
    assert parse("bob", "a", "--tags", "x", "y", "--tags", "z")["tags"] == ["x", "y", "z"]


@pytest.mark.parametrize(
    "argv",
    [["toy"], ["toy", "bob"], ["toy", "bob", "a", "--mode", "medium"], ["toy", "bob", "a", "--count", "x"]],
    ids=["no-positionals", "missing-list", "bad-choice", "bad-int"],
)
def test_generator_rejects_bad_command_lines(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser({"toy": toy}).parse_args(argv)
    assert e.value.code == 2
    assert "usage: peftkit toy" in capsys.readouterr().err


def test_generator_help_comes_from_docstring_and_signature(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser({"toy": toy}).parse_args(["toy", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "Greet someone, for the generator's tests." in text
    assert "A second paragraph that only the command's own --help shows." in text
    assert "NAME who to greet" in text and "FILES files to read" in text
    assert "how many times, a help text that continues on a second line (default: 3)" in text
    assert "--mode {fast,slow} how to run (default: fast)" in text
    assert "--verbose, --no-verbose say more (default: --no-verbose)" in text
    assert "--label LABEL an optional label --tags" in text  # None is no default to show
    assert "--out OUT where to write (default: out/toy)" in text
    with pytest.raises(SystemExit):
        build_parser({"toy": toy}).parse_args(["--help"])
    assert "toy Greet someone, for the generator's tests." in " ".join(capsys.readouterr().out.split())


def test_generator_refuses_undocumented_or_unsupported_parameters() -> None:
    def undocumented(x: int = 1) -> None:
        """No Args section."""

    def unsupported(x: dict | None = None) -> None:
        """Bad type.

        Args:
            x: a dict
        """

    with pytest.raises(TypeError, match="'x' is not documented"):
        build_parser({"u": undocumented})
    with pytest.raises(TypeError, match="does not support type"):
        build_parser({"u": unsupported})


def command_parsers(top: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """{"generate": its parser, "registry show": ...} for every command of the real CLI."""
    found = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                        walk(sub, f"{prefix}{name} ")
                    else:
                        found[prefix + name] = sub

    walk(top or build_parser(), "")
    return found


def swapped(flag: str) -> str:
    body = flag[2:]
    return "--" + (body.replace("-", "_") if "-" in body else body.replace("_", "-"))


def test_every_option_of_every_command_takes_both_spellings() -> None:
    """`--max_new_tokens` and `--max-new-tokens` alike, in every command; --help shows one of them."""
    checked = 0
    for name, parser in command_parsers().items():
        positionals = [a for a in parser._actions if not a.option_strings and a.nargs not in ("?", "*")]
        for action in parser._actions:
            shown = [f for f in action.option_strings if f.startswith("--") and f != "--help"]
            if action.help == argparse.SUPPRESS or not shown or swapped(shown[0]) == shown[0]:
                continue
            assert len({f.replace("_", "-") for f in shown if not f.startswith("--no-")}) == 1, (name, shown)
            value = [] if action.nargs == 0 else [str((action.choices or ["1"])[0])]
            namespace, extras = parser.parse_known_args(
                ["p"] * len(positionals) + [swapped(shown[0]), *value]
            )
            assert extras == [], (name, shown[0], extras)
            assert getattr(namespace, action.dest) not in (None, argparse.SUPPRESS), (name, shown[0])
            checked += 1
    assert checked > 100


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["generate", "--adapters", "a"], "adapter", ["a"]),
        (["chat", "--adapters", "a"], "adapter", ["a"]),
        (["eval", "task:dates", "--adapter", "a"], "adapters", ["a"]),
        (["serve", "--adapter", "a"], "adapters", ["a"]),
        (["combine", "--adapter", "a", "--out", "o"], "adapters", ["a"]),
        (["train", "--out", "o"], "overrides:output_dir", "o"),
        (["train", "--output-dir", "o"], "overrides:output_dir", "o"),
        (["demo", "--output_dir", "o"], "out", Path("o")),
        (["compare", "x.yaml", "--output-dir", "o"], "out", Path("o")),
        (["tune", "x.yaml", "--output_dir", "o"], "out", Path("o")),
    ],
)
def test_one_idea_one_set_of_names(argv: list[str], dest: str, value: object) -> None:
    """--adapter/--adapters and --out/--output-dir/--output_dir mean the same in every command."""
    assert vars(build_parser().parse_args(argv))[dest] == value


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "base", "adapter", "--out", "o"],
        ["merge", "base", "adapter", "--output-dir", "o"],
        ["merge", "--out-dir", "o", "base", "adapter"],
        ["combine", "--adapters", "a", "b", "--out", "o"],
        ["registry", "export", "ref", "--out", "o"],
    ],
)
def test_a_positional_output_takes_out_too(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """main() hands the command the value given as --out in the positional's place."""
    import peftkit.cli as cli

    seen: dict = {}
    real = cli.build_parser

    def recording_parser(
        commands=None, **options
    ):  # every command replaced by one that records its arguments
        parser = real(commands, **options)
        for sub in command_parsers(parser).values():
            sub.set_defaults(_fn=lambda **kw: seen.update(kw) or 0)
        return parser

    monkeypatch.setattr(cli, "build_parser", recording_parser)
    assert main(argv) == 0
    assert Path("o") in seen.values() and not any(k.endswith("@alias") for k in seen)


def test_a_positional_output_given_twice_or_not_at_all_is_a_usage_error(capsys) -> None:
    assert main(["merge", "base", "adapter"]) == 2
    assert "required: OUT_DIR (or --out OUT_DIR)" in capsys.readouterr().err
    assert main(["merge", "base", "adapter", "o", "--out", "p"]) == 2
    assert "OUT_DIR was given twice" in capsys.readouterr().err


def test_an_unknown_option_gets_a_did_you_mean_and_the_commands_usage(capsys) -> None:
    assert main(["generate", "--max_new_tokenz", "3", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: peftkit generate"), err
    assert (
        "unrecognized arguments: --max_new_tokenz 3 (--max_new_tokenz: did you mean --max-new-tokens?)" in err
    )
    assert main(["train", "--lora.rnak", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: peftkit train") and "did you mean --lora.r" in err


def test_a_prefix_is_not_an_option(capsys) -> None:
    """argparse's abbreviations read `--lora.rank 4` as `--lora.rank_pattern 4` (an error about a key
    the user never typed); every prefix is refused, with the option meant, by its other name too."""
    assert main(["train", "--lora.rank", "4"]) == 2
    assert (
        "unrecognized arguments: --lora.rank (--lora.rank: did you mean --lora.r?)" in capsys.readouterr().err
    )
    assert main(["eval", "task:dates", "--max-new", "3"]) == 2
    assert "--max-new: did you mean --max-new-tokens?" in capsys.readouterr().err


def test_the_other_spelling_reaches_the_command(capsys) -> None:
    """The issue's `peftkit generate --max_new_tokens ...` was "unrecognized arguments"; now the value
    arrives, and is checked, before any model loads."""
    assert main(["generate", "--max_new_tokens", "0", "--prompt", "hi"]) == 2
    assert "--max-new-tokens must be at least 1, got 0" in capsys.readouterr().err
    assert main(["eval", "task:dates", "--batch_size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


def test_train_out_is_not_ambiguous(capsys) -> None:
    """`train --out x` was "ambiguous option: --out could match --output_dir, --output-dir"."""
    assert main(["train", "--out", "x", "--max_steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "ambiguous" not in err and "max_steps" in err


def test_help_shows_every_default_as_it_is_typed(capsys) -> None:
    for name, parser in command_parsers().items():
        text = " ".join(parser.format_help().split())
        assert "None" not in text and "True" not in text and "False" not in text, name
    text = " ".join(command_parsers()["train"].format_help().split())
    for shown in ("--lr VALUE peak learning rate (AdamW) (default: 0.0002)", "(default: 16)",
                  "--max_steps VALUE stop after this many optimizer steps (default: null)",
                  "--eval_every VALUE validate every N optimizer steps", "--max_length VALUE", "(default: 512)"):  # fmt: skip
        assert shown in text, shown
    lora_r = text.split("--lora.r VALUE rank", 1)[1].split("--lora.lora_alpha VALUE", 1)
    assert "(default: 16)" in lora_r[0] and "(default: 32)" in lora_r[1].split("--lora.", 1)[0]


def test_registered_commands_defaults_come_from_their_signatures() -> None:
    parser = build_parser()
    for name, fn in COMMANDS.items():
        params = inspect.signature(fn).parameters.values()
        positionals = ["x"] * sum(p.default is inspect.Parameter.empty for p in params)
        args = vars(parser.parse_args([name, *positionals]))
        for p in params:
            if p.default is not inspect.Parameter.empty:
                assert args[p.name] == p.default, (name, p.name)
    assert inspect.signature(COMMANDS["tour"]).parameters["model"].default == DEFAULT_BASE


def test_entry_point_runs_as_a_subprocess() -> None:
    exe = Path(sys.executable).parent / "peftkit"
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    for name in ("info", "merge", "tour", "demo", "train", "eval", "generate", "chat"):
        assert f"    {name} " in done.stdout
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=900)
    assert done.stdout.strip() == f"peftkit {__version__}"


# -- info ----------------------------------------------------------------------------------------
def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr) of this call alone."""
    capsys.readouterr()  # drop what earlier steps printed (e.g. transformers' progress bars)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "flags, method, scaling",
    [
        ({}, "LoRA", "2 = lora_alpha / r"),
        ({"use_rslora": True}, "rsLoRA", "4 = lora_alpha / sqrt(r)"),
        ({"use_dora": True}, "DoRA", "2 = lora_alpha / r"),
    ],
)
def test_info_on_a_peftkit_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: dict, method: str, scaling: str
) -> None:
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, **flags
    )
    am = AdaptedModel.attach(tiny_llama(), config, name="mine")
    am.save_adapter(tmp_path / "ad")
    trainable, _ = am.trainable_parameters()

    code, out, _ = run(["info", tmp_path / "ad"], capsys)
    assert code == 0
    assert out.splitlines()[1].split() == ["method", method]
    assert "r = 4, overrides {'v_proj': 2}" in out
    assert f"lora_alpha       8 (scaling {scaling})" in out
    assert "targets          q_proj, v_proj (4 layers)" in out  # 2 decoder layers x 2 targets
    assert f"parameters       {trainable:,}" in out
    assert f"base fingerprint {am.base_fingerprint()[7:19]}" in out
    assert f"saved by         peftkit {__version__}" in out

    code, out, _ = run(["info", tmp_path / "ad", "--json"], capsys)
    facts = json.loads(out)
    assert facts["method"] == method and facts["r"] == 4 and facts["rank_pattern"] == {"v_proj": 2}
    assert facts["parameters"] == trainable
    assert facts["target_layers"] == 4 and facts["target_suffixes"] == ["q_proj", "v_proj"]
    assert facts["base_fingerprint"] == am.base_fingerprint() and facts["adapter_name"] == "mine"
    assert (
        facts["dtypes"] == ["float32"]
        and facts["size_bytes"] == (tmp_path / "ad/adapter_model.safetensors").stat().st_size
    )


def test_info_on_an_hf_peft_adapter(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import peft

    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "down_proj"],
        use_dora=True,
        modules_to_save=["lm_head"],
    )
    pm = peft.get_peft_model(tiny_llama(), config)
    pm.save_pretrained(tmp_path / "hf")
    trainable, _ = pm.get_nb_trainable_parameters()

    code, out, _ = run(["info", tmp_path / "hf"], capsys)
    assert code == 0
    assert "method           DoRA" in out
    assert "lora_alpha       16 (scaling 4 = lora_alpha / r)" in out
    assert "targets          q_proj, k_proj, down_proj (6 layers)" in out
    assert "modules_to_save  lm_head" in out
    assert "base fingerprint unknown (saved by HF PEFT)" in out
    assert f"saved by         HF PEFT {peft.__version__}" in out
    facts = json.loads(run(["info", tmp_path / "hf", "--json"], capsys)[1])
    # HF PEFT counts the trainable copy of lm_head once; the file holds exactly those tensors.
    assert facts["parameters"] == trainable
    assert facts["base_fingerprint"] is None


# -- errors --------------------------------------------------------------------------------------
def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_info_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert_one_line_error(*run(["info", tmp_path / "nope"], capsys), "adapter directory not found", "nope")

    am = AdaptedModel.attach(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    weights = am.save_adapter(tmp_path / "ad") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated mid-file
    assert_one_line_error(*run(["info", tmp_path / "ad"], capsys), "truncated or corrupt")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    assert_one_line_error(*run(["info", pickled], capsys), "pickle")

    save_file({"x": torch.zeros(1)}, str(weights))
    (tmp_path / "ad/adapter_config.json").write_text("{not json")
    assert_one_line_error(*run(["info", tmp_path / "ad"], capsys), "not valid JSON")


def test_debug_env_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTKIT_DEBUG", "1")
    with pytest.raises(AdapterFileError, match="adapter directory not found"):
        main(["info", str(tmp_path / "nope")])


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["no-such-command"]) == 2
    assert main(["merge", "only-one-arg"]) == 2
    assert main(["merge", "a", "b", "c", "--dtype", "int8"]) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


# -- merge ---------------------------------------------------------------------------------------
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny Llama's vocabulary (no download needed)."""
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<eos>": VOCAB - 2, "<unk>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


@pytest.fixture
def base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny Llama saved as a plain HF model directory with a tokenizer; a private peftkit cache."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_merge_writes_a_model_plain_transformers_loads(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model, _ = load_base(str(base_dir))
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)  # random: not a no-op
    am = AdaptedModel.attach(model, config)
    am.save_adapter(tmp_path / "ad")
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected = am(x).logits
        with am.disable_adapters():
            base_logits = am(x).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter changes the output

    code, out, err = run(["merge", base_dir, tmp_path / "ad", tmp_path / "merged"], capsys)
    assert code == 0, err
    assert "loading base model" in err and "done in" in err  # progress on stderr
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("w3 w5")["input_ids"] == [3, 5]

    # An existing output directory is kept unless --overwrite is given.
    assert_one_line_error(
        *run(["merge", base_dir, tmp_path / "ad", tmp_path / "merged"], capsys), "--overwrite"
    )
    code, _, err = run(
        ["merge", base_dir, tmp_path / "ad", tmp_path / "merged", "--overwrite", "--dtype", "bfloat16"],
        capsys,
    )
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16


def test_merge_refuses_an_adapter_trained_on_another_base(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(123)
    other = AdaptedModel.attach(tiny_llama(), LoraConfig(r=2))  # same shapes, other weights
    other.save_adapter(tmp_path / "other")
    code, out, err = run(["merge", base_dir, tmp_path / "other", tmp_path / "merged"], capsys)
    assert code == 2 and out == ""
    last = err.splitlines()[-1]  # after the progress lines of the base-model load
    assert last.startswith("error: ") and "was trained on base model" in last and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_merge_fails_fast_on_a_missing_adapter(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = run(["merge", base_dir, tmp_path / "missing", tmp_path / "merged"], capsys)
    assert_one_line_error(code, out, err, "adapter directory not found")
    assert "loading base model" not in err  # checked before the slow base load


# -- tour ----------------------------------------------------------------------------------------
def test_tour_runs_end_to_end_on_a_tiny_model(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The whole tour on a tiny random model: every check passes."""
    code, out, err = run(
        ["tour", "--model", base_dir, "--out", tmp_path / "demo", "--max-new-tokens", "6"], capsys
    )
    assert code == 0, out + err
    assert "[FAILED]" not in out and out.count("[ok]") == 7
    assert "every row equals the same prompt generated with that adapter alone (9/9 rows)" in out
    assert (tmp_path / "demo/adapter-A/adapter_model.safetensors").is_file()
    assert (tmp_path / "demo/merged-A/config.json").is_file()


@pytest.mark.parametrize(
    "case, needle",
    [
        ("tokens", "--max-new-tokens must be at least 1, got 0"),
        ("file", "is a file, so no directory can be made there"),
        ("base", "which is inside the base model directory"),
        ("not-a-model", "holds no saved model"),
        ("read-only", "is not writable"),
        ("not-an-adapter", "saves an adapter to"),
    ],
)
def test_tour_checks_its_arguments_before_loading(
    base_dir: Path, tmp_path: Path, read_only_dir: Path, capsys: pytest.CaptureFixture, case: str, needle: str
) -> None:
    """Each of these once failed only after the tour's slow steps (or wrote into the base model)."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "mine/merged-A").mkdir(parents=True)
    (tmp_path / "mine/merged-A/notes.txt").write_text("keep me")  # the tour replaces merged-A
    (tmp_path / "other/adapter-A").mkdir(parents=True)
    (tmp_path / "other/adapter-A/notes.txt").write_text("keep me")
    (tmp_path / "other/merged-A").mkdir()
    out = {"file": tmp_path / "a-file", "base": base_dir, "not-a-model": tmp_path / "mine"}.get(case)
    out = tmp_path / "other" if case == "not-an-adapter" else out
    out = read_only_dir if case == "read-only" else out or tmp_path / "tour"
    tokens = 0 if case == "tokens" else 2
    base_files = sorted(p.name for p in base_dir.iterdir())
    argv = ["tour", "--model", base_dir, "--out", out, "--max-new-tokens", tokens]
    assert_one_line_error(*run(argv, capsys), needle)
    assert (tmp_path / "mine/merged-A/notes.txt").read_text() == "keep me"
    assert (tmp_path / "other/adapter-A/notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in base_dir.iterdir()) == base_files


def test_a_shared_parameter_takes_its_help_from_its_type(capsys) -> None:
    """generate documents --registry, --dtype and --quantize through their types (command_args), not its
    docstring; a parameter with neither is refused when the parser is built."""
    from typing import get_args

    from peftkit.cli.generator import add_function
    from peftkit.command_args import AdapterRegistry, Help, Quantize

    assert main(["generate", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    for marked in (AdapterRegistry, Quantize):
        text = next(m for m in get_args(marked) if isinstance(m, Help)).text
        assert " ".join(text.split()) in shown

    def undocumented(registry: str | None = None) -> None:
        """Nothing.

        Args:
            other: not the parameter
        """

    with pytest.raises(TypeError, match="'registry' is not documented"):
        add_function(argparse.ArgumentParser().add_subparsers(), "x", undocumented)
