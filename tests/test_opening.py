"""`peftkit.tools.opening.open_model`, the one way every command opens a base with its adapters: files
read once, adapters that cannot share a model refused or set aside, and a registered version loaded
onto another base audited, by whichever command opened it (combine here; merge and eval elsewhere)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_registry_cli import adapter_for, other_base, registry_env  # noqa: F401 (a fixture)

from peftkit import AdaptedModel, LoraConfig
from peftkit.base import load_base
from peftkit.cli import main
from peftkit.errors import TargetError
from peftkit.tools.opening import open_model, read_adapters


def lora_for(model_dir, out, seed):
    model, _ = load_base(str(model_dir), dtype=torch.float32, tokenizer="optional")
    torch.manual_seed(seed)
    config = LoraConfig(r=2, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
    return AdaptedModel.attach(model, config).save_adapter(out)


def test_the_files_are_read_once_and_the_model_matches_a_plain_load(tiny_model_dir, tmp_path) -> None:
    directory = lora_for(tiny_model_dir, tmp_path / "copy", seed=1)
    sources = read_adapters([("a", directory)])
    shutil.rmtree(directory)  # from here on only what was read exists
    opened = open_model(str(tiny_model_dir), sources, dtype="float32")
    assert opened.model.adapters == ["a"] and opened.waiting == [] and opened.sources == sources
    again = AdaptedModel.from_pretrained(
        load_base(str(tiny_model_dir), dtype=torch.float32)[0], lora_for(tiny_model_dir, tmp_path / "b", 1)
    )
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(opened.model(input_ids=ids).logits, again(input_ids=ids).logits)
    bare = open_model(str(tiny_model_dir), dtype="float32")
    assert not isinstance(bare.model, AdaptedModel) and bare.tokenizer is not None


def test_adapters_that_cannot_share_a_model_are_refused_or_set_aside(tiny_model_dir, tmp_path) -> None:
    lora = lora_for(tiny_model_dir, tmp_path / "lora", seed=2)
    ia3 = adapter_for(tiny_model_dir, tmp_path / "ia3", seed=3)  # IA3 on k_proj and v_proj too
    asked = [("lora", lora), ("ia3", ia3), ("lora2", lora)]
    with pytest.raises(TargetError, match="'ia3' cannot be active together with 'lora'"):
        open_model(str(tiny_model_dir), asked, dtype="float32")
    opened = open_model(str(tiny_model_dir), asked, dtype="float32", together="passes")
    assert opened.model.adapters == ["lora", "lora2"]  # the one after the one set aside still joins
    assert [s.name for s in opened.waiting] == ["ia3"]


def test_a_registered_version_on_another_base_is_audited_by_combine(
    tiny_model_dir,
    tmp_path,
    registry_env,  # noqa: F811
    capsys,
) -> None:
    other_base(tiny_model_dir, tmp_path / "other")
    assert main(["registry", "register", "bot", str(lora_for(tiny_model_dir, tmp_path / "a", seed=4))]) == 0
    combine = ["combine", str(tmp_path / "out"), "--adapters", "bot@1", str(tmp_path / "a"), "--base"]
    assert main([*combine, str(tmp_path / "other")]) == 2  # another base: refused
    assert "fingerprint" in capsys.readouterr().err
    assert main([*combine, str(tmp_path / "other"), "--no-check-base", "--how", "cat"]) == 0
    capsys.readouterr()
    assert main(["registry", "history", "bot", "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["action"] for e in entries] == ["register", "override"]  # the directory is not audited
    assert entries[-1]["details"]["base_fingerprint"] != entries[-1]["details"]["recorded"]


def test_the_architecture_docs_example_opens_a_model(tiny_model_dir, tmp_path) -> None:
    """docs/architecture.md's open_model example runs (on the tiny model and an adapter of its own)."""
    import re
    import textwrap
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs/architecture.md").read_text()
    block = textwrap.dedent(re.search(r"```python\n(.*?)^\s*```", text, re.S | re.M).group(1))
    adapter = lora_for(tiny_model_dir, tmp_path / "dates", seed=5)
    code = block.replace('"smollm2-135m"', repr(str(tiny_model_dir))).replace(
        '"out/demo/adapter-best"', repr(str(adapter))
    )
    assert code != block and str(adapter) in code
    namespace: dict = {}
    exec(compile(code, "docs/architecture.md", "exec"), namespace)
    assert namespace["model"].adapters == ["dates"] and namespace["tokenizer"] is not None
