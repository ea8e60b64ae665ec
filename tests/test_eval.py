"""Evaluation: metrics on hand-checked cases, generation and perplexity on a tiny random Llama with a
tiny ChatML-like tokenizer (mixed batches == per-adapter runs, input order kept), the `eval`,
`generate` and `chat` commands, and a few integration tests on the real default model."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peftkit import AdaptedModel, ConfigError, LoraConfig
from peftkit.base import DEFAULT_BASE, load_base
from peftkit.cli import main
from peftkit.data.encode import IGNORE_INDEX, encode
from peftkit.data.example import Example, Message
from peftkit.errors import DataError, RequestError
from peftkit.eval import commands
from peftkit.eval.generation import decode_answer, generate_answers, perplexity
from peftkit.eval.metrics import METRICS, _lcs_length, get_metric
from peftkit.eval.metrics import accuracy as acc
from peftkit.eval.metrics import exact_match as em
from peftkit.eval.metrics import json_match as jm
from peftkit.eval.metrics import rouge_l as rl
from peftkit.eval.metrics import token_f1 as f1
from peftkit.eval.run import evaluate, format_table

# ids 0, 1, 2 = unk, bos, eos: the tiny Llama's config defaults, so its generation config agrees
SPECIAL = ("<unk>", "<|im_start|>", "<|im_end|>")


# -- metrics -------------------------------------------------------------------------------------
def test_exact_match() -> None:
    assert em("2021-03-05", " 2021-03-05\n") == 1.0
    assert em("a  b\tc", "a b c") == 1.0  # whitespace runs collapse
    assert em("2021-03-05.", "2021-03-05") == 0.0  # punctuation counts
    assert em("Paris", "paris") == 0.0  # case counts
    assert em("", "") == 1.0 and em("", "x") == 0.0


def test_json_match() -> None:
    ref = '{"name": "Ana Silva", "city": "Porto", "order_id": "AB-12345"}'
    assert jm('{"city":"Porto","order_id":"AB-12345","name":"Ana Silva"}', ref) == 1.0  # order, spacing
    assert jm('\n {"name": "Ana Silva", "city": "Porto", "order_id": "AB-12345"} ', ref) == 1.0
    assert jm('{"name": "Ana Silva", "city": "Porto"}', ref) == 0.0  # missing key
    assert jm('{"name": "Ana Silva", "city": "Porto", "order_id": "AB-12345", "x": 1}', ref) == 0.0
    assert jm('{"name": "ana silva", "city": "Porto", "order_id": "AB-12345"}', ref) == 0.0  # values exact
    assert jm("{'name': 'Ana Silva'}", ref) == 0.0  # not JSON
    assert jm(ref + " Hope this helps!", ref) == 0.0  # trailing text: not a JSON value
    assert jm("", ref) == 0.0
    assert jm('{"a": 1}', '{"a": "1"}') == 0.0  # types count ...
    assert jm('{"a": true}', '{"a": 1}') == 0.0 and jm('{"a": 1}', '{"a": true}') == 0.0
    assert jm('{"a": 1.0}', '{"a": 1}') == 1.0  # ... but 1 and 1.0 are the same number
    assert jm("[1, 2]", "[2, 1]") == 0.0 and jm('[{"b": [null]}]', '[{"b": [null]}]') == 1.0
    with pytest.raises(DataError, match="the reference is not valid JSON"):
        jm("{}", "{oops")


def test_accuracy() -> None:
    assert acc("Positive.", "positive") == 1.0
    assert acc("  NEUTRAL\n", "neutral") == 1.0
    assert acc('"negative"', "negative") == 1.0 and acc("negative!", "negative") == 1.0
    assert acc("The review is positive.", "positive") == 0.0  # the label must be the whole answer
    assert acc("positively", "positive") == 0.0 and acc("", "positive") == 0.0


def test_token_f1() -> None:
    # articles and punctuation dropped: [cat, sat, on, mat] vs [cat, sat, on, hat] -> P = R = 3/4
    assert f1("The cat sat on the mat.", "a cat sat on a hat") == pytest.approx(0.75)
    assert f1("cat cat", "cat") == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))  # counts are clipped
    assert f1("Cat!", "cat") == 1.0 and f1("dog", "cat") == 0.0
    assert f1("", "") == 1.0 and f1("the", "") == 1.0 and f1("", "cat") == 0.0


def test_rouge_l() -> None:
    # LCS "the cat on the mat" = 5 of 6 tokens each way
    assert rl("the cat sat on the mat", "The cat lay on the mat") == pytest.approx(5 / 6)
    assert rl("a b c d", "a c") == pytest.approx(2 * 0.5 * 1 / 1.5)  # P = 2/4, R = 2/2
    assert rl("d c b a", "a b c d") == pytest.approx(0.25)  # order matters (LCS 1)
    assert rl("", "") == 1.0 and rl("x", "") == 0.0 and rl("x", "y") == 0.0


def test_lcs_matches_the_full_table() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 8))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        assert _lcs_length(a, b) == table[-1][-1]


def test_metric_registry() -> None:
    assert set(METRICS) == {"exact_match", "json_match", "accuracy", "token_f1", "rouge_l"}
    assert set(typing.get_args(commands.MetricName)) == {"auto", *METRICS}  # the CLI's choices
    rng = random.Random(1)
    for name, fn in METRICS.items():
        for _ in range(50):
            p, r = (
                " ".join(rng.choice(["a", "B", "c.", "1"]) for _ in range(rng.randint(0, 4))) for _ in "pr"
            )
            if name == "json_match":
                p, r = json.dumps(p), json.dumps(r)
            assert 0.0 <= fn(p, r) <= 1.0 and fn(r, r) == 1.0
    with pytest.raises(ConfigError, match=r"unknown metric 'exact' \(did you mean 'exact_match'\?\)"):
        get_metric("exact")


# -- a tiny model and tokenizer ------------------------------------------------------------------
def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny Llama's vocabulary with a ChatML-like template."""
    vocab = {t: i for i, t in enumerate([*SPECIAL, "system", "user", "assistant"])}
    vocab |= {f"w{i}": len(vocab) + i for i in range(VOCAB - len(vocab))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    return tok


def lively_llama(seed: int = 0) -> torch.nn.Module:
    """The tiny Llama with large random weights, so that its answers depend on the prompt."""
    torch.manual_seed(seed)
    model = tiny_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.5)
    return model


def words(i: int, n: int) -> str:
    return " ".join(f"w{(7 * i + 3 * j) % 55}" for j in range(n))


def make_examples(n: int = 12) -> list[Example]:
    """Prompts of 1-6 words (different lengths, so batches need padding) and 2-word answers."""
    return [Example.from_pair(words(i, 1 + i % 6), words(i + 1, 2)) for i in range(n)]


def with_adapters(model: torch.nn.Module, names: tuple[str, ...] = ("a", "b")) -> AdaptedModel:
    am = AdaptedModel(model)
    for k, name in enumerate(names):
        torch.manual_seed(100 + k)
        am.add_adapter(name, LoraConfig(r=4, lora_alpha=16, init_lora_weights=False), trainable=False)
    return am


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return chat_tokenizer()


# -- generation ----------------------------------------------------------------------------------
def test_batched_generation_equals_one_by_one_in_input_order(tok: PreTrainedTokenizerFast) -> None:
    model, prompts = lively_llama(), [e.prompt for e in make_examples()]
    batched = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=5)
    single = [generate_answers(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) >= 10  # the answers depend on the prompt, so the order check means something
    assert any(len(a.split()) < 6 for a in batched)  # some rows stopped at <|im_end|> ...
    assert not any("<|im" in a for a in batched)  # ... which is not part of the answer


def test_generation_stops_at_end_of_turn_and_respects_max_new_tokens(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_llama()
    model.lm_head = torch.nn.Linear(16, VOCAB, bias=True)  # logits = bias: one token always wins
    prompts = [e.prompt for e in make_examples(3)]
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[tok.convert_tokens_to_ids("w5")] = 1.0
    assert generate_answers(model, tok, prompts, max_new_tokens=4) == ["w5 w5 w5 w5"] * 3
    with torch.no_grad():
        model.lm_head.bias[tok.eos_token_id] = 2.0
    assert generate_answers(model, tok, prompts, max_new_tokens=4) == [""] * 3
    eos, w = tok.eos_token_id, tok.convert_tokens_to_ids(["w1", "w2", "w3"])
    assert decode_answer(tok, [w[0], w[1], eos, w[2]], [eos]) == "w1 w2"  # nothing after the stop token


def test_generation_keeps_the_models_mode(tok: PreTrainedTokenizerFast) -> None:
    model = lively_llama().train()
    generate_answers(model, tok, [make_examples(1)[0].prompt], max_new_tokens=2)
    assert model.training


def test_perplexity_matches_a_direct_computation(tok: PreTrainedTokenizerFast) -> None:
    model, examples = lively_llama(), make_examples(7)
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            enc = encode(ex, tok, train_on="last")
            logp = model(torch.tensor([enc.input_ids])).logits[0].log_softmax(-1)  # (T, V)
            for t, label in enumerate(enc.labels):
                if label != IGNORE_INDEX:  # label t is predicted from position t - 1
                    nll, count = nll - logp[t - 1, label].item(), count + 1
    assert count == 7 * 3  # two answer words and <|im_end|> per example
    expected = math.exp(nll / count)
    assert perplexity(model, tok, examples, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tok, examples, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert perplexity(FullLogits(model), tok, examples, batch_size=3) == pytest.approx(expected, rel=1e-5)


class FullLogits(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep`: perplexity must use the full logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> typing.Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_mixed_evaluation_equals_per_adapter_runs(tok: PreTrainedTokenizerFast) -> None:
    am, examples = with_adapters(lively_llama()), make_examples()
    kw = {"metric": "token_f1", "adapters": [None, "a", "b"], "max_new_tokens": 5, "batch_size": 4}
    mixed = evaluate(am, tok, examples, **kw)
    separate = evaluate(am, tok, examples, mixed=False, **kw)
    assert [r.adapter for r in mixed.results] == ["base", "a", "b"] and mixed.mixed
    for m, s in zip(mixed.results, separate.results, strict=True):
        assert m.predictions == s.predictions and m.score == s.score and m.n == s.n == 12
        assert m.perplexity == pytest.approx(s.perplexity, rel=1e-5)
    # ... and both equal plain runs: the active adapter alone, and the base with adapters disabled.
    prompts = [e.prompt for e in examples]
    for name in ("a", "b"):
        am.set_adapter(name)
        assert generate_answers(am, tok, prompts, max_new_tokens=5) == mixed[name].predictions
        assert perplexity(am, tok, examples) == pytest.approx(mixed[name].perplexity, rel=1e-5)
    with am.disable_adapters():
        assert generate_answers(am, tok, prompts, max_new_tokens=5) == mixed["base"].predictions
    assert mixed["a"].predictions != mixed["base"].predictions != mixed["b"].predictions  # meaningful


def test_scores_samples_and_table(tok: PreTrainedTokenizerFast) -> None:
    model, examples = lively_llama(), make_examples(8)
    answers = generate_answers(model, tok, [e.prompt for e in examples], max_new_tokens=5)
    # References: the model's own answers for the first half, something else for the rest.
    refs = [a if i < 4 else "w0 w0 w0" for i, a in enumerate(answers)]
    examples = [Example.from_pair(e.prompt[-1].content, r) for e, r in zip(examples, refs, strict=True)]
    report = evaluate(
        model, tok, examples, metric="exact_match", adapters=[None], max_new_tokens=5, samples=2
    )
    (result,) = report.results
    assert result.score == 0.5 and result.predictions == answers and result.perplexity > 1
    assert [(s.prompt, s.reference, s.prediction) for s in result.samples] == [
        (examples[i].prompt[-1].content, refs[i], answers[i]) for i in range(2)
    ]
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["adapter", "exact_match", "perplexity", "n", "seconds"]
    assert lines[2].split()[:4] == ["base", "0.500", f"{result.perplexity:.3f}", "8"]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert json.loads(json.dumps(report.to_dict()))["results"][0]["score"] == 0.5
    no_ppl = evaluate(
        model, tok, examples, metric="exact_match", adapters=[], max_new_tokens=5, with_perplexity=False
    )
    assert no_ppl["base"].perplexity is None and "-" in format_table(no_ppl).splitlines()[2].split()


def test_bad_requests(tok: PreTrainedTokenizerFast) -> None:
    model, examples = lively_llama(), make_examples(2)
    prompts = [e.prompt for e in examples]
    with pytest.raises(RequestError, match="need a peftkit.AdaptedModel"):
        generate_answers(model, tok, prompts, max_new_tokens=2, adapter_names=["a", None])
    with pytest.raises(RequestError, match="1 adapter names for 2 prompts"):
        generate_answers(model, tok, prompts, max_new_tokens=2, adapter_names=[None])
    with pytest.raises(RequestError, match="must be distinct"):
        evaluate(
            with_adapters(model), tok, examples, metric="exact_match", adapters=["a", "a"], max_new_tokens=2
        )
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate(model, tok, examples, metric="bleu", adapters=[None], max_new_tokens=2)


# -- the commands --------------------------------------------------------------------------------
@pytest.fixture
def base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The lively tiny Llama saved as an HF model directory with its tokenizer; a private cache."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "base"
    lively_llama().save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def adapter_dirs(base_dir: Path, tmp_path: Path) -> list[Path]:
    model, _ = load_base(str(base_dir))
    am = with_adapters(model, ("a", "b"))
    return [am.save_adapter(tmp_path / "adapters" / name, name) for name in ("a", "b")]


def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in examples))
    return path


def test_eval_command_matches_evaluate(
    base_dir: Path, adapter_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    examples = make_examples(10)
    data = write_jsonl(tmp_path / "data.jsonl", examples)
    argv = ["eval", data, "--base", base_dir, "--adapters", *adapter_dirs, "--n", 8, "--batch-size", 5]
    code, out, err = run(
        [*argv, "--max-new-tokens", 4, "--samples", 1, "--json", tmp_path / "r.json"], capsys
    )
    assert code == 0, err
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split() == ["adapter", "exact_match", "perplexity", "n", "seconds"]
    assert [line.split()[0] for line in table[2:]] == ["base", "a", "b"]
    assert "== a\nprompt:     " + examples[0].prompt[-1].content in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["settings"]["n"] == 8 and saved["settings"]["max_new_tokens"] == 4
    model, tokenizer = load_base(str(base_dir))
    am = AdaptedModel(model)
    for d in adapter_dirs:
        am.load_adapter(d, d.name)
    expected = evaluate(
        am, tokenizer, examples[:8], metric="exact_match", adapters=[None, "a", "b"], max_new_tokens=4
    )
    for got, want in zip(saved["results"], expected.results, strict=True):
        assert (got["adapter"], got["predictions"], got["n"]) == (want.adapter, want.predictions, 8)
        assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-5)
    # auto max_new_tokens for a file: the longest reference (2 words) + 8
    code, out, err = run([*argv[:5], "--json", tmp_path / "auto.json", "--no-perplexity"], capsys)
    saved = json.loads((tmp_path / "auto.json").read_text())
    assert (
        code == 0 and saved["settings"]["max_new_tokens"] == 10 and saved["results"][0]["perplexity"] is None
    )


@pytest.mark.parametrize(
    "task, metric", [("dates", "exact_match"), ("extract", "json_match"), ("sentiment", "accuracy")]
)
def test_eval_command_uses_the_tasks_metric(
    task: str, metric: str, base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from peftkit.data.tasks import TASKS

    argv = ["eval", f"task:{task}", "--base", base_dir, "--n", 2, "--json", tmp_path / "r.json"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert out.splitlines()[0].split()[1] == metric
    saved = json.loads((tmp_path / "r.json").read_text())
    assert (
        saved["settings"]["max_new_tokens"] == TASKS[task].max_new_tokens
        and saved["settings"]["split"] == "test"
    )


def test_eval_command_errors(base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["eval", "task:datez", "--base", base_dir], capsys)
    assert code == 2 and out == "" and err.strip().startswith("error: unknown task 'datez' (did you mean")
    code, out, err = run(["eval", tmp_path / "nope.jsonl", "--base", base_dir], capsys)
    assert code == 2 and "no such file or directory" in err and "loading base model" not in err
    code, out, err = run(["eval", "task:dates", "--adapters", tmp_path / "missing"], capsys)
    assert code == 2 and "adapter directory not found" in err and "loading base model" not in err


def test_generate_command(
    base_dir: Path, adapter_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lines = tmp_path / "prompts.txt"
    lines.write_text("w5 w6 w7\n\nw8\n")
    rows = tmp_path / "prompts.jsonl"
    chat = [
        {"role": "user", "content": "w9"},
        {"role": "assistant", "content": "w10"},
        {"role": "user", "content": "w11"},
    ]
    rows.write_text(json.dumps({"prompt": "w12 w13"}) + "\n" + json.dumps({"messages": chat}) + "\n")
    argv = [
        "generate",
        "--prompt",
        "w1 w2",
        "w3",
        "--prompts",
        lines,
        "--base",
        base_dir,
        "--max-new-tokens",
        5,
    ]
    code, out, err = run([*argv, "--adapter", adapter_dirs[0]], capsys)
    assert code == 0, err
    model, tokenizer = load_base(str(base_dir))
    am = AdaptedModel.from_pretrained(model, adapter_dirs[0])
    prompts = [[Message("user", p)] for p in ("w1 w2", "w3", "w5 w6 w7", "w8")]
    answers = generate_answers(am, tokenizer, prompts, max_new_tokens=5)
    assert out == "".join(f">>> {p[-1].content}\n{a}\n\n" for p, a in zip(prompts, answers, strict=True))
    code, out, err = run(
        ["generate", "--prompts", rows, "--base", base_dir, "--max-new-tokens", 5, "--system", "w4"], capsys
    )
    assert code == 0, err
    prompts = [
        [Message("system", "w4"), Message("user", "w12 w13")],
        [Message("system", "w4")] + [Message(**m) for m in chat],
    ]
    with am.disable_adapters():
        answers = generate_answers(am, tokenizer, prompts, max_new_tokens=5)
    assert out == "".join(f">>> {p[-1].content}\n{a}\n\n" for p, a in zip(prompts, answers, strict=True))
    rows.write_text('{"prompt": "w1"}\n{"text": "w2"}\n')
    code, out, err = run(["generate", "--prompts", rows, "--base", base_dir], capsys)
    assert code == 2 and "prompts.jsonl: line 2: expected a JSON object" in err and "loading base" not in err
    code, out, err = run(["generate", "--base", base_dir], capsys)
    assert code == 2 and "no prompts" in err


# The `peftkit` entry point (`python -m peftkit.cli` would register the commands on a second copy of cli).
CLI = "import sys; from peftkit.cli import main; sys.exit(main())"


def test_chat_command_keeps_history_and_resets(base_dir: Path, tmp_path: Path) -> None:
    env = os.environ | {"PEFTKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CLI, "chat", "--base", str(base_dir), "--max-new-tokens", "4"],
        input="w3 w4\nw5\n\n/reset\nw5\n/quit\nw6\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    model, tokenizer = load_base(str(base_dir))
    first = generate_answers(model, tokenizer, [[Message("user", "w3 w4")]], max_new_tokens=4)[0]
    history = [Message("user", "w3 w4"), Message("assistant", first), Message("user", "w5")]
    second = generate_answers(model, tokenizer, [history], max_new_tokens=4)[0]
    fresh = generate_answers(model, tokenizer, [[Message("user", "w5")]], max_new_tokens=4)[0]
    assert second != fresh  # the history changes the answer, so the check below means something
    assert proc.stdout.splitlines() == [first, second, fresh]  # nothing after /quit
    assert "(new conversation)" in proc.stderr


# -- the real default model (SmolLM2-135M) -------------------------------------------------------
# Base-model scores measured on the first 100 test examples (greedy; float32 and bfloat16 alike):
# dates 0.07, extract 0.24-0.25, sentiment 0.00; on the first 16, which the test uses to stay cheap:
# 0.06, 0.31, 0.00. It does not follow the requested formats: "The date in ISO 8601 format is: ...",
# multi-line JSON with invented keys, "The review is positive".
BASE_CEILING = {"dates": 0.3, "extract": 0.5, "sentiment": 0.25}


@pytest.fixture(scope="module")
def smollm() -> tuple:
    return load_base(DEFAULT_BASE)


@pytest.mark.integration
@pytest.mark.parametrize("name", list(BASE_CEILING))
def test_the_base_model_scores_low_on_the_tasks(name: str, smollm: tuple) -> None:
    from peftkit.data.tasks import TASKS

    model, tokenizer = smollm
    task = TASKS[name]
    longest = max(len(tokenizer(e.answer)["input_ids"]) for e in task.examples("train"))
    assert longest + 1 <= task.max_new_tokens  # room for the longest answer and its end-of-turn token
    report = evaluate(
        model, tokenizer, task.examples("test", 16), metric=task.metric, adapters=[None],
        max_new_tokens=task.max_new_tokens, with_perplexity=False,
    )  # fmt: skip
    predictions = report["base"].predictions
    assert report["base"].score <= BASE_CEILING[name], predictions
    assert len(set(predictions)) >= 4 and not any("<|im_end|>" in p for p in predictions)  # real answers


@pytest.mark.integration
def test_generate_command_on_the_real_model(capsys: pytest.CaptureFixture) -> None:
    prompt = "What is the capital of France? Answer with one word."
    code, out, err = run(["generate", "--prompt", prompt, "--max-new-tokens", 12], capsys)
    assert code == 0, err
    assert out.startswith(f">>> {prompt}\n") and "Paris" in out.splitlines()[1]
