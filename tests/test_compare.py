"""peftkit compare, end to end on the tiny model: train four variants, score them, read the report back;
a rerun retrains nothing; a changed variant retrains only itself; bad input is refused before work."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftkit.cli import main
from peftkit.compare.settings import read_settings
from peftkit.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"
VARIANTS = ["lora-r4", "ia3", "prompt", "full"]


pytestmark = pytest.mark.usefixtures("one_thread_per_training_child")


def experiment_text(base: Path, ia3_lr: str = "1e-2") -> str:
    return f"""
base: {base}
data: task:dates
max_examples: 40
max_steps: 3
batch_size: 4
max_length: 200
lr: 1e-2
variants:
  - {{name: lora-r4, lora: {{r: 4}}}}
  - {{name: ia3, method: ia3, lr: {ia3_lr}}}
  - {{name: prompt, method: prompt}}
  - {{name: full, method: full, lr: 1e-3}}
evaluate:
  examples: 6
  forgetting_examples: 4
  general_text_chars: 2000
  batch_size: 8
"""


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tmp_path_factory):
    """(experiment file, out dir, printed output) of one comparison run through the CLI."""
    root = tmp_path_factory.mktemp("compare")
    experiment = root / "exp.yaml"
    experiment.write_text(experiment_text(tiny_model_dir))
    out = root / "out"
    capture = _Capture()
    with capture:
        assert main(["compare", str(experiment), "--out", str(out)]) == 0
    return experiment, out, capture.text


class _Capture:
    """stdout of a block (a module fixture cannot use capsys)."""

    def __enter__(self):
        import contextlib
        import io

        self.buffer = io.StringIO()
        self.redirect = contextlib.redirect_stdout(self.buffer)
        self.redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self.redirect.__exit__(*exc)
        self.text = self.buffer.getvalue()


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_the_report_has_every_variant_with_finite_numbers(compared):
    _, out, printed = compared
    data = results(out)
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["base", *VARIANTS]
    assert data["mixed"] and data["full_variant"] == "full"
    for name in VARIANTS:
        r = rows[name]
        for key in ("score", "perplexity", "perplexity_change_pct", "size_mb", "peak_rss_mb", "tokens_per_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (name, key, r[key])
        assert r["trainable_parameters"] > 0 and r["size_mb"] > 0 and r["peak_rss_mb"] > 50
        assert r["steps"] == 3 and not r["reused"]
        assert set(r["other_tasks"]) == {"extract", "sentiment"}  # every built-in task but dates
        assert math.isfinite(r["other_tasks_mean_change"])
        expected = 100 * (r["perplexity"] / rows["base"]["perplexity"] - 1)
        assert r["perplexity_change_pct"] == pytest.approx(expected)
        assert (out / "logs" / f"{name}.log").is_file() and (out / "configs" / f"{name}.yaml").is_file()
        assert f"{name}: trained in" in printed
    assert rows["base"]["kind"] == "reference" and rows["base"]["trainable_parameters"] is None
    # full fine-tuning trains every weight, IA3 the fewest; the full model dwarfs the adapters on disk
    assert rows["full"]["trainable_parameters"] > rows["lora-r4"]["trainable_parameters"]
    assert rows["ia3"]["trainable_parameters"] < rows["prompt"]["trainable_parameters"]
    assert rows["full"]["size_mb"] > 3 * rows["lora-r4"]["size_mb"]
    # each model is scored on the same examples and text: the same counts
    assert {r["n"] for r in rows.values()} == {6} and len({r["text_tokens"] for r in rows.values()}) == 1
    assert rows["base"]["text_tokens"] > 1000  # 2000 characters of the shipped text, in windows


def test_scoring_cost_is_said_before_training_and_progress_during_scoring(compared):
    """Before anything trains: the models, examples per task and tokens of general text, and a time
    estimate from forwards of the base timed here; while scoring, a counted line per part."""
    _, out, printed = compared
    lines = printed.splitlines()
    plan = next(i for i, ln in enumerate(lines) if ln.startswith("scoring plan: "))
    assert plan < next(i for i, ln in enumerate(lines) if ln.startswith("training 4 variants"))
    assert lines[plan].startswith("scoring plan: 5 models (2 model loads); task:dates 6 examples (up to ")
    assert (
        "extract (forgetting) 4 examples" in lines[plan]
        and "sentiment (forgetting) 4 examples" in lines[plan]
    )
    windows = results(out)["general_text"]["tokens"] / 127  # scored: each window's tokens but its first
    assert f"general text {int(windows) * 128:,} tokens ({windows:.0f} windows of 128)" in lines[plan]
    estimate = lines[plan + 1]
    assert re.match(r"scoring estimate: up to about \d+ (s|min) on this machine, from the base model timed "
                    r"here \(a forward of \d+ x \d+ tokens took [\d.]+ s, a decode step [\d.]+ s", estimate)  # fmt: skip
    # each loaded copy (full fine-tuning's model, a second copy of the base for IA3, whose layers
    # LoRA's wrap too) counts its four parts: the task, two forgetting tasks and the general text
    progress = [ln.strip() for ln in lines if ln.strip().startswith("scoring [")]
    assert len(progress) >= 8 and [p.split("/")[0] for p in progress] == [
        "scoring [1", "scoring [2", "scoring [3", "scoring [4"] * (len(progress) // 4)  # fmt: skip
    assert re.match(r"scoring \[1/4\] task:dates: 6 examples x \d models?, up to 16 new tokens each "
                    r"\(elapsed \d+ s\)$", progress[0])  # fmt: skip
    assert progress[3].startswith("scoring [4/4] general text: ")
    assert lines.index(next(ln for ln in lines if "scoring [1/4]" in ln)) > plan + 2


def test_the_quick_run_advice_names_real_keys_and_makes_scoring_smaller(compared, tiny_model_dir):
    """The output says which evaluate: keys make a quick run; they are real keys, read as written, and
    with them the estimate is several times smaller than with the defaults (issue 18: scoring with
    the defaults dwarfed a two-step training)."""
    import dataclasses

    import yaml
    from transformers import AutoTokenizer

    from peftkit.compare import estimate as e
    from peftkit.compare.settings import general_text
    from peftkit.experiment.evaluation import EvalSettings

    _, _, printed = compared
    said = re.search(r"^quick run \(about .+\): set evaluate: (\{.*\}) \(docs/compare.md", printed, re.M)
    assert said and yaml.safe_load(said.group(1)) == {"forgetting_tasks": []}  # the fixture's only excess

    defaults = read_settings({}, "task:dates")
    advice = yaml.safe_load(e.quick_run_advice(defaults))
    assert set(advice) == {"examples", "forgetting_tasks", "general_text_chars"}
    assert set(advice) <= {f.name for f in dataclasses.fields(EvalSettings)}
    quick = read_settings(advice, "task:dates")  # accepted as written
    assert e.quick_run_advice(quick) == "" and e.quick_settings(defaults) == quick

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    parts = {s: e.scoring_parts(s, tokenizer, general_text(s)) for s in (defaults, quick)}
    assert [p.examples for p in parts[defaults][:3]] == [100, 50, 50] and len(parts[quick]) == 2
    timing = e.Timing(rows=16, tokens=100, prefill_s=2.0, decode_s=0.1, load_s=3.0)
    slow, fast = (e.estimate_seconds(parts[s], timing, [3]) for s in (defaults, quick))
    assert fast < slow / 4
    lines = e.plan_lines(e.Plan(parts[defaults], parts[quick], [3], timing), defaults)
    assert lines[1].startswith(f"scoring estimate: up to about {e.duration(slow)} on this machine")
    assert lines[2] == (f"quick run (about {e.duration(fast)}): set evaluate: {{examples: 20, "
                        "forgetting_tasks: [], general_text_chars: 4000} (docs/compare.md, Scoring cost)")  # fmt: skip


def test_report_md_table_names_every_model(compared):
    _, out, _ = compared
    lines = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| ")]
    header, *body = lines
    assert "trainable params" in header and "general-text ppl" in header and "score / full FT" in header
    assert [ln.split("|")[1].strip() for ln in body] == ["base", *VARIANTS]
    cells = [c.strip() for c in body[1].split("|")[1:-1]]
    assert len(cells) == len(header.split("|")) - 2 and cells[1] == "LoRA r=4"
    assert re.fullmatch(r"[\d.]+ \([+-]\d+\.\d%\)", cells[9])  # perplexity and its change


def test_plots_are_pngs_and_the_html_embeds_them_without_external_resources(compared):
    _, out, _ = compared
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 3
    for name, data in zip(["score_vs_params", "score_vs_time", "forgetting_vs_score"], embedded, strict=True):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 5000
        assert base64.b64decode(data) == png
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing loaded from elsewhere
    assert "http://" not in page and "https://" not in page
    for name in ["base", *VARIANTS]:
        assert f"<td>{name}</td>" in page


def test_a_rerun_retrains_nothing_and_a_changed_variant_retrains_alone(compared, tiny_model_dir, capsys):
    experiment, out, _ = compared
    summaries = {v: (out / "runs" / v / "summary.json").stat().st_mtime_ns for v in VARIANTS}
    assert main(["compare", str(experiment), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ": trained in" not in printed and ": training" not in printed
    assert printed.count(": reused the finished run") == 4
    assert "scores are cached" in printed  # nothing evaluated again either
    assert all(r["reused"] for r in results(out)["rows"] if r["kind"] == "variant")
    assert summaries == {v: (out / "runs" / v / "summary.json").stat().st_mtime_ns for v in VARIANTS}

    cached = {v: (out / "eval" / f"{v}.json").stat().st_mtime_ns for v in ["base", *VARIANTS]}
    experiment.write_text(experiment_text(tiny_model_dir, ia3_lr="5e-3"))
    assert main(["compare", str(experiment), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.findall(r"\] (\S+): trained in", printed) == ["ia3"]
    rows = {r["name"]: r for r in results(out)["rows"]}
    assert [v for v in VARIANTS if not rows[v]["reused"]] == ["ia3"]
    rescored = [v for v, t in cached.items() if (out / "eval" / f"{v}.json").stat().st_mtime_ns != t]
    assert rescored == ["ia3"]


def test_mixed_text_perplexity_matches_one_adapter_at_a_time(compared, tiny_model_dir):
    from peftkit import AdaptedModel, load_base
    from peftkit.compare.text import text_perplexity, text_windows

    _, out, _ = compared
    model, tok = load_base(str(tiny_model_dir), dtype="float32")
    am = AdaptedModel(model)
    am.load_adapter(out / "runs" / "lora-r4" / "adapter-last", "lora")
    am.load_adapter(out / "runs" / "prompt" / "adapter-last", "prompt")
    windows = text_windows(tok, "It is a truth universally acknowledged. " * 20, 64)
    assert len(windows) == len(tok("It is a truth universally acknowledged. " * 20)["input_ids"]) // 64
    mixed = text_perplexity(am, windows, [None, "lora", "prompt"], batch_size=5)
    for name in (None, "lora", "prompt"):
        alone = text_perplexity(am, windows, [name], batch_size=2)[name]
        assert mixed[name][0] == pytest.approx(alone[0], rel=1e-4) and mixed[name][1] == alone[1]
    assert mixed["lora"][0] != pytest.approx(mixed[None][0], rel=1e-4)  # the adapter does change it
    plain = text_perplexity(load_base(str(tiny_model_dir), dtype="float32")[0], windows, [None])
    assert plain[None][0] == pytest.approx(mixed[None][0], rel=1e-4)


def test_ctrl_c_starts_no_other_variant_and_the_same_command_resumes(tiny_model_dir, tmp_path, capsys):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while the first of two variants
    trains: that run saves a checkpoint, the queued variants never start, compare exits 130 saying how
    to go on. The same command again resumes it; the report marks its time and memory as partial."""
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(f"""
base: {tiny_model_dir}
data: task:dates
max_examples: 40
max_steps: 2
batch_size: 4
max_length: 200
lr: 1e-2
variants:
  - {{name: lora-r4, lora: {{r: 4}}, max_steps: 60}}
  - {{name: prefix, method: prefix, prefix: {{num_virtual_tokens: 4, prefix_projection: true}}}}
evaluate: {{examples: 2, forgetting_tasks: [], general_text_chars: 500}}
""")
    out = tmp_path / "out"
    proc = _start_compare(experiment, out)
    try:
        _wait_for_a_step(proc, out / "runs" / "lora-r4" / "metrics.jsonl")
        os.killpg(proc.pid, signal.SIGINT)  # the first variant is training: its first step is logged
        printed, _ = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        _kill(proc)
    assert proc.returncode == 130, printed
    assert "0 variant(s) finished, 1 stopped" in printed and "Run the same command again" in printed
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["lora-r4.log"]  # nothing else started
    assert any((out / "runs" / "lora-r4" / "checkpoints").iterdir())

    assert main(["compare", str(experiment), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.findall(r"\] (\S+): trained in", printed) == ["lora-r4", "prefix"]
    assert "resuming from" in (out / "logs" / "lora-r4.log").read_text()
    rows = {r["name"]: r for r in results(out)["rows"]}
    assert rows["lora-r4"]["steps"] == 60
    assert [n for n, r in rows.items() if r["resumed"]] == ["lora-r4"]
    report = (out / "report.md").read_text()
    cells = {ln.split("|")[1].strip(): ln.split("|") for ln in report.splitlines() if ln.startswith("| ")}
    assert cells["lora-r4"][5].strip().endswith("†") and cells["lora-r4"][7].strip().endswith("†")
    assert "†" not in cells["prefix"][5] + cells["prefix"][7]
    assert "† resumed after an interruption: train time and peak memory are the last process's only" in report
    # prefix tuning with a projection: what trained is not what is saved, and a note says so
    assert rows["prefix"]["method"] == "prefix tuning (projection)"
    assert "prefix tuning (projection): trainable params count what trained" in report


@pytest.mark.parametrize("how, group", [("SIGTERM", True), ("SIGHUP", False)])
def test_sigterm_and_sighup_stop_compare_as_ctrl_c_does(tiny_model_dir, tmp_path, how, group):
    """SIGTERM (`timeout` sends it to the whole process group; `kill`, docker, Kubernetes, Slurm and
    systemd send it too) or SIGHUP (a closed terminal, to compare alone) while the first variant
    trains: as with Ctrl-C, that run is told to stop and saves a checkpoint, compare waits for it,
    starts no other variant, says what was left and how to go on, and exits 128 + the signal."""
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(f"""
base: {tiny_model_dir}
data: task:dates
max_examples: 40
batch_size: 4
max_length: 200
eval_every: 1000000
variants:
  - {{name: first, max_steps: 1000000}}
  - {{name: second, max_steps: 2}}
evaluate: {{examples: 2, forgetting_tasks: [], general_text_chars: 500}}
""")
    out = tmp_path / "out"
    proc = _start_compare(experiment, out)
    sig = getattr(signal, how)
    try:
        _wait_for_a_step(proc, out / "runs" / "first" / "metrics.jsonl")
        (os.killpg if group else os.kill)(proc.pid, sig)
        printed, _ = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        _kill(proc)
    assert proc.returncode == 128 + sig, printed
    assert f"stopped by {how}: 0 variant(s) finished, 1 stopped" in printed, printed
    assert "1 not started. Run the same command again" in printed
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["first.log"]  # the second never started
    run = out / "runs" / "first"
    assert any((run / "checkpoints").iterdir()) and (run / "adapter-last").is_dir()
    assert json.loads((run / "summary.json").read_text())["interrupted"] is True
    assert "stopping after this step to save a checkpoint" in (out / "logs" / "first.log").read_text()


# A hang guard only, sized for a slow, loaded machine: no test waits on how fast the machine is.
HANG_GUARD_S = 900


def _start_compare(experiment: Path, out: Path) -> subprocess.Popen:
    """`peftkit compare` as a terminal's job: its own process group, SIGINT not ignored (a CI runner's
    background job starts with it ignored), one thread per training run."""
    command = [sys.executable, "-m", "peftkit", "compare", str(experiment), "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def _wait_for_a_step(proc: subprocess.Popen, metrics: Path) -> None:
    """Until the run has logged its first step, so a signal lands mid-run (however slow the machine)."""
    while proc.poll() is None and not _has_a_line(metrics):
        time.sleep(0.02)
    assert proc.poll() is None, f"compare exited before the run took a step:\n{proc.communicate()[0]}"


def _has_a_line(path: Path) -> bool:
    try:
        return b"\n" in path.read_bytes()
    except OSError:
        return False


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_resumption_is_read_from_the_metrics_record_times(tmp_path):
    from peftkit.compare.report import was_resumed

    def run(times: list[float]) -> Path:
        lines = [json.dumps({"time": t, "step": i + 1, "loss": 1.0}) for i, t in enumerate(times)]
        (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return tmp_path

    # one process: its records lie within its training loop's seconds (rounded to 0.1 s)
    assert not was_resumed(run([100.0, 101.0, 102.04]), {"seconds": 2.0})
    # records up to the checkpoint came from an earlier process, before this one started
    assert was_resumed(run([50.0, 51.0, 100.0, 101.0, 102.0]), {"seconds": 2.1})
    assert not was_resumed(run([100.0]), {"seconds": 2.0}) and not was_resumed(run([1.0, 9.0]), {})
    (tmp_path / "metrics.jsonl").unlink()
    assert not was_resumed(tmp_path, {"seconds": 2.0})


def test_bases_that_share_a_last_part_get_their_own_rows_and_cache_files(tmp_path):
    from peftkit.compare.scoring import models_to_score, reference_names

    for d in ("a/m", "b/m", "c/n", "shared"):
        (tmp_path / d).mkdir(parents=True)
    a, b, n, shared = (str(tmp_path / d) for d in ("a/m", "b/m", "c/n", "shared"))
    names = reference_names([a, b, n, f"{tmp_path}/a/../a/m", f"{shared}/"], shared)
    assert names[shared] == names[f"{shared}/"] == "base" and names[n] == "base[n]"
    assert re.fullmatch(r"base\[m-[0-9a-f]{8}\]", names[a]) and re.fullmatch(
        r"base\[m-[0-9a-f]{8}\]", names[b]
    )
    assert names[a] != names[b] and names[f"{tmp_path}/a/../a/m"] == names[a]  # one directory, one row
    assert reference_names([a], shared)[a] == "base[m]"  # no hash unless two bases need one

    def variant(name: str, base: str, quantize: str | None = None) -> SimpleNamespace:
        config = SimpleNamespace(base=base, quantize=quantize)
        return SimpleNamespace(name=name, config=config, is_full=False, weights_dir=tmp_path / name)

    models = models_to_score([variant("on-a", a), variant("on-b", b), variant("q-a", a, "nf4")], shared)
    rows = {m.name: m for m in models}
    assert list(rows) == ["base", names[a], names[b], names[a] + "+nf4", "on-a", "on-b", "q-a"]
    assert len({m.name for m in models}) == len(models)  # one cache file (eval/NAME.json) per row
    assert (rows["on-a"].reference, rows["on-b"].reference, rows["q-a"].reference) == (
        names[a],
        names[b],
        names[a],
    )
    assert rows[names[a] + "+nf4"].reference == names[a]  # the 4-bit base against its full-precision self


def test_a_quantized_base_row_shows_the_quantization_loss_against_the_full_precision_base():
    from peftkit.compare.report import build_rows, table_cells
    from peftkit.compare.scoring import Model, Scores

    models = [Model("base", "m", None, None, "base"), Model("base+nf4", "m", "nf4", None, "base")]
    scores = {
        "base": Scores(score=0.5, n=4, forgetting={"extract": 0.5}, perplexity=10.0, text_tokens=9, seconds=0),
        "base+nf4": Scores(score=0.4, n=4, forgetting={"extract": 0.3}, perplexity=11.0, text_tokens=9, seconds=0),
    }  # fmt: skip
    base, quantized = build_rows(models, scores, [], "m")
    assert quantized["reference"] == "base" and quantized["perplexity_change_pct"] == pytest.approx(10.0)
    assert quantized["other_tasks_mean_change"] == pytest.approx(-0.2)
    assert "(+10.0%)" in table_cells(quantized)[9] and table_cells(quantized)[10].startswith("-20.0 (")
    assert base["perplexity_change_pct"] == 0 and "%" not in table_cells(base)[9]  # itself: no change shown


@pytest.mark.parametrize(
    "body, words",
    [
        (
            "variants: [{lr: 1e-3}]\nevaluate: {exampels: 5}",
            "unknown key 'exampels' (did you mean 'examples'?)",
        ),
        ("data: {data}\nvariants: [{lr: 1e-3}]", "is a file, so compare cannot tell what to score"),
        ("variants: [{name: base, lr: 1e-3}]", "named 'base'"),
        ("lr: 1e-3", "no variants"),
        ("variants: [{lr: 1e-3}]\nevaluate: {forgetting_tasks: [datez]}", "unknown task 'datez'"),
        ("variants: [{lora: {r: 0}}]", "variant 'lora.r=0'"),
    ],
)
def test_bad_experiments_are_refused_in_one_line(tmp_path, capsys, body, words):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(body.replace("{data}", str(data)))
    assert main(["compare", str(experiment), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_out_dir_of_other_files_is_refused(tmp_path, capsys):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("variants: [{lr: 1e-3}]")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert main(["compare", str(experiment), "--out", str(out)]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(["compare", str(experiment), "--out", str(out), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_the_working_directory_and_its_parents_are_refused_even_when_marked(tmp_path, capsys, monkeypatch):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("variants: [{lr: 1e-3}]")
    (tmp_path / "compare.json").write_text('{"kind": "peftkit compare"}')
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path.parent)):
        assert main(["compare", str(experiment), "--out", out]) == 2
        assert "the working directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json", "exp.yaml"]


def test_evaluate_defaults_follow_the_training_task():
    s = read_settings({}, "task:sentiment")
    assert (s.data, s.metric, s.forgetting_tasks) == ("task:sentiment", "accuracy", ("dates", "extract"))
    assert (s.examples, s.forgetting_examples, s.general_text) == (100, 50, None)
    s = read_settings({"data": "task:extract", "forgetting_tasks": ["task:dates"]}, "some.jsonl")
    assert (s.metric, s.forgetting_tasks) == ("json_match", ("dates",))
    with pytest.raises(ConfigError, match="examples must be at least 1"):
        read_settings({"examples": 0}, "task:dates")
    with pytest.raises(ConfigError, match="must be an integer"):
        read_settings({"examples": "many"}, "task:dates")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "examples").glob("compare_*.yaml")), ids=lambda p: p.name
)
def test_shipped_compare_experiments_read(path):
    from peftkit.experiment import read_experiment

    experiment = read_experiment(path)  # every variant's config is built, and so checked
    settings = read_settings(experiment.evaluation, experiment.config().data)
    assert experiment.variants and settings.data == "task:dates"
