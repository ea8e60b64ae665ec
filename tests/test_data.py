"""peftkit.data: dataset files, chat-template encoding with loss masks, batching, splits and hashes."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from peftkit.data import (
    IGNORE_INDEX,
    Encoded,
    Example,
    Message,
    collate,
    dataset_hash,
    encode,
    encode_all,
    encode_prompt,
    length_grouped_batches,
    load_examples,
    padding_waste,
    split_examples,
)
from peftkit.errors import ConfigError, DataError

ROWS = [("What is 2+2?", "4"), ("Name a colour.", "Blue, like the sky.")]


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def chat_row(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def char_tok():
    """A character-level tokenizer with <s>/</s> turn markers and a ChatML-like template."""
    return char_tokenizer()


def label_runs(encoded: Encoded, tok) -> list[str]:
    """The decoded runs of consecutive trained-on tokens."""
    runs, run = [], []
    for label in (*encoded.labels, IGNORE_INDEX):
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs, run = [*runs, tok.decode(run)], []
    return runs


# ---------------------------------------------------------------- files


def test_every_file_format_parses_to_the_same_examples(tmp_path):
    pc = [{"prompt": p, "completion": c} for p, c in ROWS]
    files = {
        "chat.jsonl": "\n".join(json.dumps(chat_row(p, c)) for p, c in ROWS) + "\n\n",
        "pc.jsonl": "\n".join(json.dumps(r) for r in pc),
        "alpaca.jsonl": "\n".join(json.dumps({"instruction": p, "input": "", "output": c}) for p, c in ROWS),
        "list.json": json.dumps(pc, indent=2),
        "data.json": json.dumps({"data": [chat_row(p, c) for p, c in ROWS]}),
        "train.json": json.dumps({"train": pc}),
        "pc.csv": 'prompt,completion\nWhat is 2+2?,4\nName a colour.,"Blue, like the sky."\n',
        "chat.csv": "messages\n"
        + "".join('"' + json.dumps(chat_row(p, c)["messages"]).replace('"', '""') + '"\n' for p, c in ROWS),
    }
    expected = [Example.from_pair(p, c).messages for p, c in ROWS]
    for name, text in files.items():
        assert [e.messages for e in load_examples(write(tmp_path, name, text))] == expected, name


def test_sources_alpaca_input_system_and_meta(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "chat", "output": "cat", "id": 7},
        {"instruction": "Hi", "output": "Yo"},
    ]
    path = write(tmp_path, "a.jsonl", json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    first, second = load_examples(path, system="Be brief.")
    assert first.messages == (
        Message("system", "Be brief."),
        Message("user", "Translate.\n\nchat"),
        Message("assistant", "cat"),
    )
    assert (first.source, second.source, first.meta, second.meta) == (
        "a.jsonl:1",
        "a.jsonl:3",
        {"id": "7"},
        {},
    )
    own = [{"role": "system", "content": "Own."}, *chat_row("q", "a")["messages"]]
    (kept,) = load_examples(write(tmp_path, "s.jsonl", json.dumps({"messages": own})), system="Other.")
    assert kept.messages[0] == Message("system", "Own.")
    csv = 'prompt,completion\n"two\nlines",a\nnext,b\n'  # a quoted field spans lines 2-3
    assert [e.source for e in load_examples(write(tmp_path, "m.csv", csv))] == ["m.csv:2", "m.csv:4"]
    assert (
        load_examples(write(tmp_path, "d.json", json.dumps({"data": [rows[1]]})))[0].source
        == "d.json:data[0]"
    )


def test_explicit_format_and_unknown_format(tmp_path):
    path = write(tmp_path, "c.jsonl", json.dumps(chat_row("q", "a")))
    assert len(load_examples(path, format="messages")) == 1
    with pytest.raises(DataError, match="line 1: missing 'prompt'"):
        load_examples(path, format="prompt_completion")
    with pytest.raises(ConfigError, match="sharegpt"):
        load_examples(path, format="sharegpt")


def _bad_chat(*turns) -> str:
    return json.dumps(chat_row("q", "a")) + "\n" + json.dumps({"messages": list(turns)}) + "\n"


U, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
MALFORMED = [
    ("x.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', ["line 2", "not valid JSON"]),
    (
        "x.jsonl",
        _bad_chat(U, {"role": "bot", "content": "a"}),
        ["line 2", "item 2 has role 'bot'", "user, assistant"],
    ),
    (
        "x.jsonl",
        _bad_chat(U, {"role": "assistant", "content": ["a"]}),
        ["line 2", "item 2", "must be a string"],
    ),
    ("x.jsonl", _bad_chat(U, {"role": "assistant", "content": "  "}), ["line 2", "item 2 has empty content"]),
    (
        "x.jsonl",
        _bad_chat(U, {"role": "assistant"}),
        ["line 2", "item 2 is not an object with 'role' and 'content'"],
    ),
    ("x.jsonl", _bad_chat(U), ["line 2", "no assistant turn"]),
    ("x.jsonl", _bad_chat(U, A, U), ["line 2", "ends with a user turn (item 3)", "last turn must be"]),
    ("x.jsonl", _bad_chat(U, {"role": "system", "content": "s"}, A), ["line 2", "item 2 is a system turn"]),
    ("x.jsonl", _bad_chat(), ["line 2", "'messages' is empty"]),
    ("x.jsonl", '{"messages": "hi"}', ["line 1", "'messages' is of type str"]),
    (
        "x.jsonl",
        '{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}',
        ["line 2", "'prompt' is of type int"],
    ),
    ("x.jsonl", '{"prompt": "a", "completion": ""}', ["line 1", "'completion' is empty"]),
    ("x.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}', ["line 2", "missing 'completion'"]),
    (
        "x.jsonl",
        '{"prompt": "a", "completion": "b"}\n{"instruction": "a", "output": "b"}',
        ["line 2", "every row"],
    ),
    (
        "x.jsonl",
        '{"prompt": "a", "completions": "b"}',
        ["line 1", "has 'prompt' but no 'completion'", "'completions' (did you mean 'completion'?)"],
    ),
    ("x.jsonl", '{"promt": "a", "answer": "b"}', ["cannot tell", "'promt' (did you mean 'prompt'?)"]),
    ("x.jsonl", '{"prompt": "a", "completion": "b", "messages": []}', ["line 1", "several formats"]),
    ("x.jsonl", '["a", "b"]', ["line 1", "the row is of type list"]),
    ("x.jsonl", '{"instruction": "a", "input": 5, "output": "b"}', ["line 1", "'input' is of type int"]),
    ("x.csv", "prompt,completion\na,b\nc,d,e\n", ["line 3", "3 fields but the header has 2"]),
    ("x.csv", "prompt,completion\na,b\n,\n", ["line 3", "'prompt' is empty"]),
    ("x.csv", "messages\n[{bad\n", ["line 2", "'messages' column is not valid JSON"]),
    ("x.csv", "question,answer\na,b\n", ["line 2", "cannot tell"]),
    (
        "x.json",
        json.dumps([chat_row("q", "a"), {"messages": [U, {"role": "bot", "content": "a"}]}]),
        ["[1]", "'bot'"],
    ),
    ("x.json", '{"rows": []}', ["without a 'data' or 'train' list"]),
    ("x.json", "[\n{,\n", ["line 2", "not valid JSON"]),
    ("x.jsonl", "\n\n", ["no rows"]),
    ("x.csv", "prompt,completion\n", ["no rows"]),
    ("x.json", "[]", ["no rows"]),
    ("x.txt", "prompt: a", ["unsupported file type '.txt'"]),
]


@pytest.mark.parametrize(("name", "text", "fragments"), MALFORMED)
def test_malformed_rows_name_file_line_and_problem(tmp_path, name, text, fragments):
    path = write(tmp_path, name, text)
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


MISSING_FIELD = [  # the first row's keys say which format it meant: the field it lacks is named
    ('{"prompt": "a"}', "the row has 'prompt' but no 'completion'"),
    ('{"prompt": "a", "completion": null}', "the row has 'prompt' but its 'completion' is null"),
    ('{"instruction": "a"}', "the row has 'instruction' but no 'output'"),
    ('{"instruction": "a", "input": "b"}', "the row has 'instruction' but no 'output'"),
    ('{"input": "b", "output": "c"}', "the row has 'output' but no 'instruction'"),
]


@pytest.mark.parametrize(("text", "problem"), MISSING_FIELD)
def test_a_row_without_its_answer_names_the_missing_field(tmp_path, text, problem):
    path = write(tmp_path, "x.jsonl", text + "\n")
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 1: {problem}") and message.endswith("; add it"), message
    assert "did you mean" not in message  # no suggestion of a key the row already has


BIG = "1" + "0" * 5000  # more digits than Python turns into an int from text (4300)
DEEP = "[" * 5000 + "]" * 5000
UNREADABLE = [
    # Each of these used to escape as a traceback (ValueError, RecursionError, TypeError in the tokenizer).
    (
        "x.jsonl",
        f'{{"prompt": "a", "completion": "b", "id": {BIG}}}\n',
        ["line 1", "4300 digits", "as a string"],
    ),
    ("x.json", f'[{{"prompt": "a", "completion": "b", "id": {BIG}}}]', ["4300 digits"]),
    ("x.csv", f'messages\n"[{{""n"": {BIG}}}]"\n', ["line 2", "'messages' column", "4300 digits"]),
    ("x.json", DEEP, ["too deeply"]),
    ("x.jsonl", f'{{"prompt": "a", "completion": "b"}}\n{{"x": {DEEP}}}\n', ["line 2", "too deeply"]),
    (
        "x.jsonl",
        '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "a"}]}',
        ["line 1", "'messages' item 1 content", "unpaired surrogate (U+D800 at character 3)", "pairs"],
    ),
    ("x.jsonl", '{"prompt": "a", "completion": "\\udc00b"}', ["line 1", "'completion'", "U+DC00"]),
    (
        "x.jsonl",
        '{"instruction": "a", "input": "\\ud800", "output": "b"}',
        ["line 1", "'input'", "surrogate"],
    ),
    ("x.jsonl", '{"prompt": "a", "completion": "b", "note": "\\ud800"}', ["line 1", "'note'", "surrogate"]),
    ("x.json", json.dumps([chat_row("q", "a"), {"messages": [A]}]), ["[1]", "starts with an assistant turn"]),
    ("x.jsonl", _bad_chat(A, U, A), ["line 2", "starts with an assistant turn", "put the user turn"]),
]


@pytest.mark.parametrize(("name", "text", "fragments"), UNREADABLE)
def test_unreadable_rows_are_data_errors_naming_file_and_row(tmp_path, name, text, fragments):
    test_malformed_rows_name_file_line_and_problem(tmp_path, name, text, fragments)


def test_valid_surrogate_pairs_and_a_system_before_the_answer_still_load(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"prompt": "a", "completion": "b \\ud83d\\ude00"}\n')
    assert load_examples(path)[0].answer == "b \U0001f600"
    system_only = {"messages": [{"role": "system", "content": "s"}, A]}
    assert load_examples(write(tmp_path, "y.jsonl", json.dumps(system_only)))[0].answer == "a"


def test_encoding_a_conversation_that_starts_with_the_answer_names_it(char_tok):
    # Built in code, not read from a file: the encoder names the example instead of failing inside
    # the chat template on an empty prompt.
    example = Example((Message("assistant", "a"),), "mine:3")
    with pytest.raises(DataError, match="mine:3: the conversation starts with an assistant turn"):
        encode(example, char_tok)


def test_missing_paths_and_plain_directories(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not one saved with datasets"):
        load_examples(tmp_path)


def test_datasets_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the datasets package is optional")
    rows = [{"prompt": p, "completion": c} for p, c in ROWS]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    for name, source in (("dd", "dd:train[1]"), ("ds", "ds[1]")):
        examples = load_examples(tmp_path / name)
        assert [e.messages for e in examples] == [Example.from_pair(p, c).messages for p, c in ROWS]
        assert examples[1].source == source
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_examples(tmp_path / "ds")


def test_dataset_hash_is_stable_and_sensitive():
    examples = [Example.from_pair(p, c, source=f"f:{i}") for i, (p, c) in enumerate(ROWS)]
    digest = dataset_hash(examples)
    # pinned: lineage records made earlier must keep matching the same data
    assert digest == "sha256:9e945a37e59b0a4eb037123c7be9e86978ec561cb1084c098552fce292310a0d"
    assert dataset_hash([Example(e.messages, source="elsewhere") for e in examples]) == digest  # content only
    assert dataset_hash(examples[::-1]) != digest
    assert dataset_hash([examples[0], Example.from_pair(ROWS[1][0], ROWS[1][1] + " ")]) != digest
    assert dataset_hash([examples[0], Example.from_pair(*ROWS[1], system="s")]) != digest


def test_split_is_deterministic_disjoint_and_sized():
    examples = [Example.from_pair(str(i), str(i)) for i in range(50)]
    train, val = split_examples(examples, 0.2, seed=3)
    assert (train, val) == split_examples(examples, 0.2, seed=3)
    assert len(val) == 10 and sorted(train + val, key=lambda e: int(e.answer)) == examples
    assert val != split_examples(examples, 0.2, seed=4)[1]
    assert [len(split_examples(examples[:n], f, seed=0)[1]) for n, f in ((2, 0.01), (1, 0.5), (5, 0.0))] == [
        1,
        0,
        0,
    ]
    with pytest.raises(ConfigError, match="val_fraction"):
        split_examples(examples, 1.0, seed=0)


# ---------------------------------------------------------------- encoding (character tokenizer)

TWO_TURNS = Example(
    (
        Message("user", "Hi"),
        Message("assistant", "Hello!"),
        Message("user", "2+2?"),
        Message("assistant", "4"),
    ),
    "t:1",
)


def test_encode_labels_cover_assistant_turns_and_end_markers(char_tok):
    encoded = encode(TWO_TURNS, char_tok)
    assert char_tok.decode(encoded.input_ids) == (
        "<s>user\nHi</s>\n<s>assistant\nHello!</s>\n<s>user\n2+2?</s>\n<s>assistant\n4</s>"
    )
    assert label_runs(encoded, char_tok) == ["Hello!</s>", "4</s>"]
    assert label_runs(encode(TWO_TURNS, char_tok, train_on="last"), char_tok) == ["4</s>"]
    assert encode(TWO_TURNS, char_tok, train_on="all").labels == encoded.input_ids
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(encoded.input_ids, encoded.labels))
    prompt = encode_prompt(TWO_TURNS.prompt, char_tok)
    assert list(encoded.input_ids[: len(prompt)]) == prompt
    assert set(encoded.labels[len(prompt) :]) != {IGNORE_INDEX} and len(encoded) == len(encoded.input_ids)


def test_plain_format_without_a_chat_template(char_tok):
    plain = char_tok.__class__(
        tokenizer_object=char_tok.backend_tokenizer, eos_token="</s>", pad_token="<pad>"
    )
    assert not plain.chat_template
    example = Example.from_pair("Say hi", "hi", system="Be nice.")
    encoded = encode(example, plain)
    assert plain.decode(encoded.input_ids) == "Be nice.\nSay hi\nhi</s>"
    assert label_runs(encoded, plain) == ["hi</s>"]
    assert plain.decode(encode_prompt(example.prompt, plain)) == "Be nice.\nSay hi\n"


def test_truncation_modes(char_tok):
    example = Example.from_pair("a long question " * 3, "short", source="f.jsonl:9")
    full = encode(example, char_tok, max_length=4096)
    answer = len("short") + 1  # "</s>" is one token
    limit = answer + 5
    left = encode(example, char_tok, max_length=limit)
    assert left.input_ids == full.input_ids[-limit:] and label_runs(left, char_tok) == ["short</s>"]
    assert encode(example, char_tok, max_length=answer) is None  # no prompt token would be left
    right = encode(example, char_tok, max_length=len(full) - 2, truncation="right")
    assert right.input_ids == full.input_ids[:-2] and label_runs(right, char_tok) == ["shor"]
    assert encode(example, char_tok, max_length=limit, truncation="right") is None  # nothing to learn left
    assert encode(example, char_tok, max_length=limit, truncation="drop") is None
    with pytest.raises(DataError, match=r"f.jsonl:9: \d+ tokens, more than max_length=11"):
        encode(example, char_tok, max_length=limit, truncation="error")
    assert encode(example, char_tok, max_length=len(full), truncation="error") == full
    with pytest.raises(ConfigError, match="train_on"):
        encode(example, char_tok, train_on="answers")


def test_encode_all_of_no_examples_is_empty(char_tok):
    encoded, stats = encode_all([], char_tok)  # a tokenizer refuses an empty batch (IndexError)
    assert encoded == [] and stats.count == 0 and stats.total_tokens == 0


def test_encode_all_matches_encode_and_counts(char_tok):
    examples = [Example.from_pair("q" * n, "a" * n, source=f"s:{n}") for n in range(1, 35)]
    encoded, stats = encode_all(examples, char_tok, max_length=30)
    assert encoded == [e for e in (encode(x, char_tok, max_length=30) for x in examples) if e is not None]
    sizes = [(len(encode_prompt(x.prompt, char_tok)), len(x.answer) + 1) for x in examples]  # +1: "</s>"
    assert stats.dropped == sum(1 for _, a in sizes if a >= 30) > 0  # "left" keeps >= 1 prompt token
    assert stats.truncated == sum(1 for p, a in sizes if p + a > 30 and a < 30) > 0
    assert stats.count == len(encoded) == len(examples) - stats.dropped
    assert stats.loss_tokens == sum(a for _, a in sizes if a < 30)
    assert stats.total_tokens == sum(map(len, encoded)) and stats.max_length == 30


# ---------------------------------------------------------------- encoding (the real SmolLM2 tokenizer)


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2-135M-Instruct's tokenizer (ChatML; a default system prompt when none is given)."""
    from transformers import AutoTokenizer

    import peftkit
    from peftkit.base import default_cache_dir

    model_dir = default_cache_dir() / "models" / "smollm2-135m"
    if not (model_dir / "tokenizer.json").is_file():
        peftkit.load_base("smollm2-135m")  # converts the built-in GGUF into the cache, once
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.integration
def test_smollm2_single_turn_labels_and_prompt_invariant(smol_tok):
    example = Example.from_pair("What is the capital of France?", "Paris.")
    encoded = encode(example, smol_tok)
    prompt = encode_prompt(example.prompt, smol_tok)
    answer = smol_tok("Paris.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert list(encoded.input_ids) == prompt + answer
    assert label_runs(encoded, smol_tok) == ["Paris.<|im_end|>"]
    assert encoded.labels[len(prompt) - 1] == IGNORE_INDEX and smol_tok.decode(prompt).endswith("assistant\n")
    assert "You are a helpful AI assistant" in smol_tok.decode(prompt)  # the template's default
    own = encode(Example.from_pair("Hi", "Yo", system="Be terse."), smol_tok)
    assert "helpful AI" not in smol_tok.decode(own.input_ids) and "Be terse." in smol_tok.decode(
        own.input_ids
    )


@pytest.mark.integration
def test_smollm2_multi_turn(smol_tok):
    assert label_runs(encode(TWO_TURNS, smol_tok), smol_tok) == ["Hello!<|im_end|>", "4<|im_end|>"]
    assert label_runs(encode(TWO_TURNS, smol_tok, train_on="last"), smol_tok) == ["4<|im_end|>"]
    prompt = encode_prompt(TWO_TURNS.prompt, smol_tok)
    assert list(encode(TWO_TURNS, smol_tok).input_ids[: len(prompt)]) == prompt


@pytest.mark.integration
@pytest.mark.parametrize(
    "answer", ["\n\n  indented", " leading space", "Ünïcode → ok", "ends with newline\n"]
)
def test_smollm2_prompt_invariant_with_awkward_text(smol_tok, answer):
    example = Example(
        (
            Message("user", "Tell me  "),
            Message("assistant", "x"),
            Message("user", "More\n"),
            Message("assistant", answer),
        )
    )
    encoded = encode(example, smol_tok)
    prompt = encode_prompt(example.prompt, smol_tok)
    assert list(encoded.input_ids[: len(prompt)]) == prompt
    assert label_runs(encoded, smol_tok) == ["x<|im_end|>", answer + "<|im_end|>"]


@pytest.mark.integration
def test_smollm2_whole_render_tokenization_would_break_the_invariant(smol_tok):
    """Why the answer is tokenized on its own: BPE merges across the prompt/answer boundary."""
    example = Example.from_pair("Q", "\n\nA")
    whole = smol_tok(
        smol_tok.apply_chat_template(example.to_dict()["messages"], tokenize=False), add_special_tokens=False
    )
    prompt = encode_prompt(example.prompt, smol_tok)
    assert whole["input_ids"][: len(prompt)] != prompt
    assert list(encode(example, smol_tok).input_ids[: len(prompt)]) == prompt


@pytest.mark.integration
def test_smollm2_left_truncation_and_offsetless_masks(smol_tok):
    from peftkit.data.encode import _in_spans_slow, _render_example

    full = encode(TWO_TURNS, smol_tok)
    cut = encode(TWO_TURNS, smol_tok, max_length=len(full) - 20)
    assert cut.input_ids == full.input_ids[20:] and label_runs(cut, smol_tok)[-1] == "4<|im_end|>"
    rendered = _render_example(TWO_TURNS, smol_tok)
    n = len(encode_prompt(TWO_TURNS.prompt, smol_tok))
    mask = _in_spans_slow(rendered.prompt, rendered.spans, n, smol_tok)  # for tokenizers without offsets
    assert mask == [label != IGNORE_INDEX for label in full.labels[:n]]


# ---------------------------------------------------------------- batching


def test_batches_cover_every_index_once_and_keep_the_last_partial_batch():
    rng = np.random.default_rng(0)
    for n, batch_size in ((0, 4), (1, 4), (7, 3), (64, 8), (1000, 32), (1000, 1)):
        lengths = rng.integers(1, 100, n).tolist()
        for shuffle in (True, False):
            batches = length_grouped_batches(lengths, batch_size, seed=1, shuffle=shuffle, group_size=4)
            assert sorted(i for b in batches for i in b) == list(range(n))
            assert sorted(len(b) for b in batches)[1:] == [batch_size] * (len(batches) - 1)


def test_batches_are_a_function_of_seed_and_epoch_only():
    lengths = np.random.default_rng(0).integers(1, 300, 500).tolist()
    first = length_grouped_batches(lengths, 8, seed=5, epoch=2)
    np.random.seed(123)
    torch.manual_seed(123)
    assert length_grouped_batches(lengths, 8, seed=5, epoch=2) == first  # e.g. on resume
    assert length_grouped_batches(lengths, 8, seed=5, epoch=3) != first
    assert length_grouped_batches(lengths, 8, seed=6, epoch=2) != first
    ordered = length_grouped_batches(lengths, 8, seed=0, shuffle=False)
    assert [lengths[i] for b in ordered for i in b] == sorted(lengths, reverse=True)


def test_length_grouping_wastes_little_padding():
    lengths = np.random.default_rng(0).integers(8, 512, 4000).tolist()
    grouped = length_grouped_batches(lengths, 16, seed=0)
    order = np.random.default_rng(1).permutation(len(lengths)).tolist()
    random_batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    assert padding_waste(lengths, grouped) < 0.02 < 0.3 < padding_waste(lengths, random_batches)
    assert padding_waste([3, 3], [[0, 1]]) == 0.0 and padding_waste([1, 3], [[0, 1]]) == pytest.approx(1 / 3)


def test_collate_pads_right_and_masks_padding():
    batch = [Encoded((5, 6, 7), (IGNORE_INDEX, 6, 7), "a"), Encoded((8,), (8,), "b")]
    out = collate(batch, pad_id=0, pad_to_multiple_of=4)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        k: ((2, 4), torch.long) for k in ("input_ids", "attention_mask", "labels")
    }
    assert out["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX], [8] + [IGNORE_INDEX] * 3]
    assert collate(batch, pad_id=0)["input_ids"].shape == (2, 3)


def test_collated_batch_loss_equals_token_weighted_per_example_losses():
    model = tiny_llama()
    rng = np.random.default_rng(0)
    batch = []
    for n in (5, 12, 9):
        ids = tuple(rng.integers(1, 64, n).tolist())
        batch.append(Encoded(ids, (IGNORE_INDEX,) * (n // 2) + ids[n // 2 :], "x"))
    with torch.no_grad():
        total = model(**collate(batch, pad_id=0)).loss
        parts = [
            (model(**collate([e], pad_id=0)).loss, sum(label != IGNORE_INDEX for label in e.labels[1:]))
            for e in batch
        ]
    expected = sum(loss * count for loss, count in parts) / sum(count for _, count in parts)
    torch.testing.assert_close(total, expected)


STRICT_TEMPLATE = (  # as Gemma's and Mistral's do: no system turn, user and assistant alternate
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def test_a_chat_template_that_refuses_a_conversation_is_a_data_error(tmp_path, capsys):
    from peftkit.cli import main

    tok = char_tokenizer()
    tok.chat_template = STRICT_TEMPLATE
    example = Example.from_pair("hi", "HI", system="be brief")
    with pytest.raises(
        DataError, match=r"cannot render a conversation with turns \(system, user.*System role not supported"
    ):
        encode_all([example], tok)
    assert encode_all([Example.from_pair("hi", "HI")], tok)[1].count == 1  # without the system turn it works
    # The same through a command: one error line, not a jinja traceback.
    model_dir = tmp_path / "strict"
    tiny_llama().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    argv = ["generate", "--prompt", "hello", "--base", str(model_dir), "--system", "be brief"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.splitlines()[-1].startswith("error: the tokenizer's chat template cannot render")
        and "Traceback" not in err
    )
