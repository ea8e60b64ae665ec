"""No dead-end advice (issue 18, item 12): every command-line option that a message of peftkit's suggests
exists on each command that can show that message, as the real parser (`build_parser()`) accepts it
(either spelling: `--max_steps` is `--max-steps`).

`flag_audit` reads the messages from the source and finds, through a call graph, which commands can
show each. That over-approximates (a path may exist that no input takes), so `SEEN_ONLY_BY` narrows
some messages to the commands that really show them, each with the reason. A
new message that suggests an option some command lacks fails here until the option exists there, the
message changes, or an entry here says why that command never shows it.
"""

from __future__ import annotations

import ast

from flag_audit import accepts, commands, shown, suggestions, texts

# Other programs' options, in messages that quote their command lines.
FOREIGN = {"--no-deps", "--force-reinstall", "--nproc_per_node", "--shutdown_timeout"}  # pip, torchrun

LOADS_ITS_OWN = "it loads only adapters it trained itself, on that very base, so the fingerprints agree"
SEEN_ONLY_BY: dict[tuple[str, str], tuple[set[str], str]] = {
    ("peftkit.core.checks", "--no-check-base"): (
        {"eval", "generate", "chat", "merge", "combine"},
        f"serve checks the base itself (serve/adapters.py check_served_base); the registry gate says what "
        f"to do in its own words (registry/gate.py); compare, tune, demo and tour: {LOADS_ITS_OWN}",
    ),
    ("peftkit.base.precision", "--dtype"): (
        {"eval", "generate", "chat", "merge", "serve"},
        "warn_slow speaks only of a half dtype asked for explicitly: info, combine, demo, tour and the "
        "registry load with `auto`, which never warns; train (resolve_precision), compare and tune "
        "(load_base's dtype_advice) name their own key instead",
    ),
    **{
        (module, flag): (
            {"train", "compare", "tune"},
            "demo runs train's code, but into a directory that is new, empty or its own earlier demo (which "
            "it replaces: overwrite=True), never resuming; an interrupted demo says the demo's own way on "
            "(train(rerun=...))",
        )
        for module, flag in [
            ("peftkit.train.checkpoint", "--allow-changed-inputs"),
            ("peftkit.train.checkpoint", "--overwrite"),
            ("peftkit.train.resume", "--allow-changed-inputs"),
            ("peftkit.train.resume", "--overwrite"),
            ("peftkit.train.resume", "--resume"),
            ("peftkit.train.run_dir", "--overwrite"),
            ("peftkit.train.run_dir", "--resume"),
        ]
    },
    ("peftkit.base.save", "--overwrite"): (
        {"merge", "train", "compare", "tune"},
        "tour checks merged-A with overwrite=True (it replaces its own); demo trains an adapter, and only a "
        "full fine-tuning run saves a model directory",
    ),
}
# Dead ends known and left to the code's owners (issue 18): (module, option, command).
ELSEWHERE = {}


def dead_ends() -> set[tuple[str, str, str]]:
    found = set()
    for name, start in commands().items():
        for (module, _), owner, flag in shown(start):
            readers = {owner} if owner else {name} & SEEN_ONLY_BY.get((module, flag), ({name}, ""))[0]
            found |= {(module, flag, r) for r in readers if flag not in FOREIGN and not accepts(r, flag)}
    return found


def test_every_suggested_option_exists_on_the_commands_that_show_it() -> None:
    assert dead_ends() == set()


def test_either_spelling_counts_and_a_missing_option_or_an_abbreviation_does_not() -> None:
    assert accepts("eval", "--max_new_tokens") and accepts("eval", "--max-new-tokens")
    assert accepts("train", "--max_steps") and accepts("registry show", "--json")
    assert not accepts("serve", "--no-check-base") and not accepts("eval", "--max")


def test_the_scan_reads_fstrings_option_calls_and_other_commands_lines() -> None:
    commands()  # the CLI's command names, which `suggestions` reads (whatever ran before in this worker)
    source = (
        'x = f"pass --a-b {v}; `peftkit eval --json {w}`"\ny = option("check_base", False)\nz = ["--resume"]'
    )
    found = [s for t in texts(ast.parse(source)) for s in suggestions(t)]
    assert found == [(None, "--a-b"), ("eval", "--json"), (None, "--no-check-base")]
