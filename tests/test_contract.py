"""The contract every registered method must meet, on every tiny model kind it applies to.

The matrix is (method, variant) from `peftkit.METHODS` x model kind. Tests read each method's
capabilities (`supports_merge`, `supports_mixed_batch`, `wraps_layers`) instead of naming methods, so a
method joining the registry is tested here without edits. A layer method runs on each kind with the
kind's targets that it can wrap; a whole-model method (soft prompts, prefixes) runs on the kinds it
accepts. A few LoRA-only formulas close the file.
"""

from __future__ import annotations

import copy
from dataclasses import fields

import pytest
import torch
from conftest import model_input, output, tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama
from torch import nn

from peftkit import METHODS, AdaptedModel, AdapterStateError, LoraConfig, PeftkitError
from peftkit.methods import LoraLayer

# model kind -> (factory, target_modules). "llama_emb" covers embeddings next to linear layers.
KINDS = {
    "llama": (tiny_llama, "all-linear"),
    "llama_emb": (tiny_llama, ["embed_tokens", "q_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "bert": (tiny_bert, "all-linear"),
    "cnn": (tiny_cnn, ["conv1", "conv2", "seq", "fc1"]),
}


def kind_targets(method: str, kind: str) -> list[str] | str | None:
    """`kind`'s targets that `method` can wrap: the spec itself ("all-linear" stays as it is), the
    matched module names it can wrap, or None when it can wrap none of them. Whole-model methods
    take no targets ([]) on the kinds they accept, each model class once."""
    spec, (factory, targets) = METHODS[method], KINDS[kind]
    if not spec.wraps_layers:
        first_of_class = next(k for k, (f, _) in KINDS.items() if f is factory) == kind
        return [] if first_of_class and _accepts(method, kind) else None
    modules = dict(factory().named_modules())
    if targets == "all-linear":
        return targets if any(spec.kind_of(m) for m in modules.values()) else None
    names = [n for n in modules if any(n == t or n.endswith("." + t) for t in targets)]
    names = [n for n in names if spec.kind_of(modules[n]) is not None]
    return sorted({t for t in targets for n in names if n == t or n.endswith("." + t)}) or None


def _accepts(method: str, kind: str) -> bool:
    """Whether a whole-model method attaches to this kind of model (decoders only, say)."""
    try:
        AdaptedModel.attach(KINDS[kind][0](), METHODS[method].config_cls())
    except PeftkitError:
        return False
    return True


CASES = [
    pytest.param(method, variant, kind, id=f"{method}-{variant}-{kind}")
    for method, spec in METHODS.items()
    for variant in spec.variants
    for kind in KINDS
    if kind_targets(method, kind) is not None
]
LLAMA_CASES = [c for c in CASES if c.values[2] == "llama"]
# Capabilities choose the cases (never a skip at run time): what a method cannot do is not run, and
# test_merge_is_exact_idempotent_and_reversible checks that merging such a method is refused.
MERGE_CASES = [c for c in CASES if METHODS[c.values[0]].supports_merge]
MIXED_CASES = [c for c in CASES if METHODS[c.values[0]].supports_mixed_batch]


def make_config(method: str, variant: str, kind: str, *, random: bool = True, r: int | None = None):
    """The variant's config on `kind`'s targets; `random` turns off every zero-init switch."""
    spec = METHODS[method]
    names = {f.name for f in fields(spec.config_cls)}
    kwargs = dict(spec.variants[variant])
    targets = kind_targets(method, kind)
    if spec.wraps_layers:
        kwargs["target_modules"] = targets
        if "feedforward_modules" in names:  # e.g. IA³: the last target scales its input, the rest outputs
            kwargs["feedforward_modules"] = [] if isinstance(targets, str) else targets[-1:]
    if random:  # init_lora_weights, init_ia3_weights, init_weights, ...
        kwargs |= {n: False for n in names if n.startswith("init_") and n.endswith("weights")}
    if r is not None and "r" in names:
        kwargs["r"] = r
    return spec.config_cls(**kwargs)


def adapter_params(am: AdaptedModel, name: str) -> list[nn.Parameter]:
    """Adapter `name`'s trainable tensors: its file tensors that are parameters, and the parameters of
    a whole-model adapter (prefix tuning with a projection saves computed prefixes, trains an MLP)."""
    params = {id(p): p for p in am.adapter_state_dict(name).values() if isinstance(p, nn.Parameter)}
    if name in am.model_adapters:
        params |= {id(p): p for p in am.model_adapters[name].parameters()}
    return list(params.values())


def same_config(loaded, original) -> bool:
    """A loaded adapter's config equals the original, up to what saving resolves: module lists
    written as the matched names (target_modules, IA³'s feedforward_modules), and fields the
    original left to be filled in from the model (None)."""
    a, b = loaded.to_dict(), original.to_dict()
    resolved = {"target_modules", "feedforward_modules"}
    return all(a[k] == v for k, v in b.items() if k not in resolved and v is not None)


def perturb(am: AdaptedModel, name: str, seed: int) -> None:
    """Move every tensor of adapter `name` off its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_params(am, name):
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each base tensor object with a copy of its value (the objects survive wrapping)."""
    return {n: (t, t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}


def assert_weights_restored(snap: dict, am: AdaptedModel) -> None:
    for name, (live, value) in snap.items():
        assert torch.equal(live, value), f"{name} differs from its original value"
    plain = dict(am.base_tensors())
    assert plain.keys() == snap.keys()
    for name, (_, value) in snap.items():
        assert torch.equal(plain[name], value), name


def train_without_dropout(model: nn.Module) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def run_alone(am: AdaptedModel, x: torch.Tensor, name: str | None) -> torch.Tensor:
    """The reference for one mixed-batch row: that adapter alone (None: adapters disabled)."""
    if name is None:
        with am.disable_adapters():
            return output(am, x)
    am.set_adapter(name)
    return output(am, x)


def inputs(kind: str, batch: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = model_input(kind, batch=batch, seed=seed)
    return x.to(dtype) if x.is_floating_point() else x


def three_adapters(
    method: str, variant: str, kind: str, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, AdaptedModel]:
    """Adapters a, b (this variant, ranks 2 and 4) and c (the method's next variant, rank 3), all
    perturbed; variants cycle, so each is mixed with another (DoRA with LoRA and rsLoRA)."""
    base = KINDS[kind][0]().to(dtype)
    plain = copy.deepcopy(base)
    variants = list(METHODS[method].variants)
    other = variants[(variants.index(variant) + 1) % len(variants)]
    am = AdaptedModel.attach(base, make_config(method, variant, kind, r=2), "a")
    am.add_adapter("b", make_config(method, variant, kind, r=4))
    am.add_adapter("c", make_config(method, other, kind, r=3))
    for seed, name in enumerate("abc"):
        perturb(am, name, seed)
    return plain, am


def is_peftkit(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peftkit")


# -- the matrix ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,variant,kind", CASES)
def test_zero_init_and_disabled_equal_base(method: str, variant: str, kind: str) -> None:
    model, x = KINDS[kind][0](), model_input(kind)
    base = output(model, x)
    am = AdaptedModel.attach(model, make_config(method, variant, kind, random=False), "zero")
    if METHODS[method].starts_unchanged:  # soft prompts and prefixes cannot (see MethodSpec)
        torch.testing.assert_close(output(am, x), base)
    am.add_adapter("rand", make_config(method, variant, kind))
    am.set_adapter("rand")
    assert not torch.allclose(output(am, x), base, atol=1e-4), "a random adapter must change the output"
    with am.disable_adapters():
        assert torch.equal(output(am, x), base)
    assert not torch.allclose(output(am, x), base, atol=1e-4), "disable_adapters() must end with its block"


@pytest.mark.parametrize("method,variant,kind", CASES)
def test_merge_is_exact_idempotent_and_reversible(method: str, variant: str, kind: str) -> None:
    model, x = KINDS[kind][0](), model_input(kind)
    snap = snapshot(model)
    am = AdaptedModel.attach(model, make_config(method, variant, kind), "a")
    perturb(am, "a", 0)
    if not METHODS[method].supports_merge:
        with pytest.raises(AdapterStateError):
            am.merge()
        return
    unmerged = output(am, x)
    am.merge()
    assert am.merged_adapters == ["a"]
    assert any(not torch.equal(live, value) for live, value in snap.values()), "merge changed no weight"
    torch.testing.assert_close(output(am, x), unmerged, atol=1e-5, rtol=1e-4)
    once = {n: live.detach().clone() for n, (live, _) in snap.items()}
    am.merge()
    am.merge(["a"])
    assert all(torch.equal(snap[n][0], w) for n, w in once.items()), "merging again changed the weights"
    assert dict(am.base_tensors()).keys() == snap.keys()
    am.unmerge()
    assert am.merged_adapters == []
    assert_weights_restored(snap, am)
    assert torch.equal(output(am, x), unmerged)


@pytest.mark.parametrize("method,variant,kind", [c for c in MERGE_CASES if c in LLAMA_CASES])
def test_two_active_adapters_merged_equal_unmerged(method: str, variant: str, kind: str) -> None:
    _, am = three_adapters(method, variant, kind)
    x = model_input(kind)
    am.set_adapter(["a", "b"])
    unmerged = output(am, x)
    am.merge()
    assert am.merged_adapters == ["a", "b"]
    torch.testing.assert_close(output(am, x), unmerged, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,variant,kind", CASES)
def test_only_adapter_parameters_train(method: str, variant: str, kind: str) -> None:
    model, x = KINDS[kind][0](), model_input(kind)
    base_ids = {id(p) for p in model.parameters()}
    am = AdaptedModel.attach(model, make_config(method, variant, kind), "a")
    adapter = {id(p) for p in adapter_params(am, "a")}
    assert adapter and not adapter & base_ids
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert {id(p) for n, p in am.named_parameters() if n in trainable} == adapter
    train_without_dropout(am)
    output(am, x).float().square().mean().backward()
    with_grad = {n for n, p in am.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(p.grad.abs().sum() > 0 for n, p in am.named_parameters() if n in trainable)
    assert sum(p.numel() for p in adapter_params(am, "a")) == am.trainable_parameters()[0]


@pytest.mark.parametrize("method,variant,kind", CASES)
def test_save_then_load_into_a_fresh_copy(method: str, variant: str, kind: str, tmp_path) -> None:
    model, x = KINDS[kind][0](), model_input(kind)
    fresh = copy.deepcopy(model)
    am = AdaptedModel.attach(model, make_config(method, variant, kind), "a")
    perturb(am, "a", 0)
    expected = output(am, x)
    am.save_adapter(tmp_path / "a")
    loaded = AdaptedModel(fresh)
    assert loaded.load_adapter(tmp_path / "a", "a") == "a"
    assert loaded.active_adapters == ["a"]
    assert same_config(loaded.adapter_config("a"), am.adapter_config("a"))
    assert not any(p.requires_grad for p in loaded.parameters())
    saved, got = am.adapter_state_dict("a"), loaded.adapter_state_dict("a")
    assert saved.keys() == got.keys()
    assert all(torch.equal(saved[k], got[k]) for k in saved)
    torch.testing.assert_close(output(loaded, x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method,variant,kind", MIXED_CASES)
def test_mixed_batch_rows_equal_single_adapter_runs(method: str, variant: str, kind: str) -> None:
    plain, am = three_adapters(method, variant, kind)
    names = ["a", None, "b", "c", "a", "__base__", "base"]  # None, HF PEFT's "__base__", our "base"
    x = model_input(kind, batch=len(names), seed=1)
    base = output(plain, x)
    mixed = output(am, x, adapter_names=names)
    for i, name in enumerate(names):
        name = None if name in ("__base__", "base") else name
        ref = base[i] if name is None else run_alone(am, x[i : i + 1], name)[0]
        torch.testing.assert_close(mixed[i], ref, atol=1e-5, rtol=1e-4)
    alone = [run_alone(am, x[:1], n)[0] for n in ("a", "b", "c")]
    assert not any(torch.allclose(alone[i], alone[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    # Without autograd the stacked factors are cached and the update is added in place.
    with torch.inference_mode():
        first, second = output(am, x, adapter_names=names), output(am, x, adapter_names=names)
    torch.testing.assert_close(first, mixed, atol=1e-5, rtol=1e-4)
    assert torch.equal(first, second)


@pytest.mark.parametrize("method,variant,kind", MIXED_CASES)
def test_mixed_batch_of_one_adapter_equals_set_adapter(method: str, variant: str, kind: str) -> None:
    plain, am = three_adapters(method, variant, kind)
    x = model_input(kind, batch=3, seed=5)
    for name in ("a", "b"):
        assert torch.equal(output(am, x, adapter_names=[name] * 3), run_alone(am, x, name))
    assert torch.equal(output(am, x, adapter_names=[None] * 3), output(plain, x))


@pytest.mark.parametrize("method,variant,kind", MIXED_CASES)
def test_mixed_batch_cache_follows_weight_updates(method: str, variant: str, kind: str) -> None:
    _, am = three_adapters(method, variant, kind)
    names = ["a", "b", None]
    x = model_input(kind, batch=len(names), seed=4)
    with torch.inference_mode():
        before = output(am, x, adapter_names=names)
    perturb(am, "b", seed=9)  # an in-place update, as an optimizer step makes
    with torch.inference_mode():
        after = output(am, x, adapter_names=names)
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1], atol=1e-4)
    torch.testing.assert_close(after[1], run_alone(am, x[1:2], "b")[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,variant,kind", MIXED_CASES)
def test_mixed_batch_gradients_are_the_sum_of_single_runs(method: str, variant: str, kind: str) -> None:
    # float64: in float32 the rounding differences of the batched products grow to ~1e-3 through
    # the backward pass of a randomly initialised model, which would hide nothing but flake.
    _, am = three_adapters(method, variant, kind, torch.float64)
    train_without_dropout(am)
    names = ["b", "a", None, "c", "b"]
    x = inputs(kind, len(names), seed=2, dtype=torch.float64)
    weights = torch.randn(output(am, x, adapter_names=names).shape, dtype=torch.float64)  # mixes all outputs
    (output(am, x, adapter_names=names) * weights).sum().backward()
    mixed = {n: p.grad.clone() for n, p in am.named_parameters() if p.grad is not None}
    am.zero_grad(set_to_none=True)
    for name in ("a", "b", "c"):
        rows = [i for i, n in enumerate(names) if n == name]
        (run_alone(am, x[rows], name) * weights[rows]).sum().backward()  # grads accumulate
    single = {n: p.grad for n, p in am.named_parameters() if p.grad is not None}
    assert mixed.keys() == single.keys()
    assert {id(p) for n, p in am.named_parameters() if n in mixed} == {
        id(p) for n in "abc" for p in adapter_params(am, n)
    }
    for n in mixed:
        torch.testing.assert_close(mixed[n], single[n], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("method,variant,kind", [c for c in MIXED_CASES if c in LLAMA_CASES])
def test_mixed_batch_generate_equals_single_adapter_generation(method: str, variant: str, kind: str) -> None:
    _, am = three_adapters(method, variant, kind)
    names = ["c", None, "a", "b"]
    x = model_input(kind, batch=len(names), seq=5, seed=3)
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    mixed = am.generate(x, adapter_names=names, **kwargs)
    assert mixed.shape == (len(names), 9)
    rows = []
    for i, name in enumerate(names):
        if name is None:
            with am.disable_adapters():
                rows.append(am.generate(x[i : i + 1], **kwargs)[0])
        else:
            am.set_adapter(name)
            rows.append(am.generate(x[i : i + 1], **kwargs)[0])
        assert torch.equal(mixed[i], rows[-1]), f"row {i} ({name})"
    assert len({tuple(r[5:].tolist()) for r in rows}) > 1, "adapters too weak to change the greedy tokens"


@pytest.mark.parametrize("method,variant,kind", CASES)
def test_delete_and_unload_give_back_the_plain_model(method: str, variant: str, kind: str) -> None:
    model, x = KINDS[kind][0](), model_input(kind)
    modules = dict(model.named_modules())
    base = output(model, x)
    am = AdaptedModel.attach(model, make_config(method, variant, kind), "a")
    am.add_adapter("b", make_config(method, variant, kind))
    with pytest.warns(UserWarning, match="adapter 'b' is active now"):
        am.delete_adapter("a")  # the active one: "b" takes over, and a warning says so
    assert am.adapters == ["b"]
    assert am.active_adapters == ["b"]
    if METHODS[method].wraps_layers:
        assert any(is_peftkit(m) for m in am.model.modules()), "b's layers must stay wrapped"
    am.delete_adapter("b")
    assert dict(am.model.named_modules()) == modules  # the very same module objects
    assert torch.equal(output(am, x), base)
    am.add_adapter("c", make_config(method, variant, kind))
    assert am.unload() is model
    assert dict(model.named_modules()) == modules
    assert torch.equal(output(model, x), base)


@pytest.mark.parametrize("method,variant,kind", MERGE_CASES)
def test_merge_and_unload_returns_a_plain_merged_model(method: str, variant: str, kind: str) -> None:
    model, x = KINDS[kind][0](), model_input(kind)
    keys = set(model.state_dict())
    am = AdaptedModel.attach(model, make_config(method, variant, kind), "a")
    perturb(am, "a", 0)
    expected = output(am, x)
    base_fingerprint = am.base_fingerprint()
    plain = am.merge_and_unload()
    assert plain is model
    assert not any(is_peftkit(m) for m in plain.modules())
    assert set(plain.state_dict()) == keys
    torch.testing.assert_close(output(plain, x), expected, atol=1e-5, rtol=1e-4)
    # The merged model is a different base: an adapter trained on it must not claim the old one.
    assert AdaptedModel(plain).base_fingerprint() != base_fingerprint


# -- LoRA formulas ---------------------------------------------------------------------------------------
def test_two_active_lora_adapters_add_up() -> None:
    model, x = tiny_llama(), model_input("llama")
    am = AdaptedModel.attach(model, LoraConfig(r=2, init_lora_weights=False), "a")
    am.add_adapter("b", LoraConfig(r=4, lora_alpha=16, init_lora_weights=False))
    layer = am.model.model.layers[0].self_attn.q_proj
    h = torch.randn(3, 5, 16)
    with am.disable_adapters():
        y0 = layer(h)
    ys = {}
    for names in (["a"], ["b"], ["a", "b"]):
        am.set_adapter(names)
        ys["+".join(names)] = layer(h)
    torch.testing.assert_close(ys["a+b"], y0 + (ys["a"] - y0) + (ys["b"] - y0))
    both = output(am, x)
    am.merge(["a", "b"])
    torch.testing.assert_close(output(am, x), both, atol=1e-5, rtol=1e-4)


def test_mixed_batch_with_adapters_on_different_layers() -> None:
    model, x = tiny_llama(), model_input("llama", batch=4)
    am = AdaptedModel.attach(model, LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "q")
    am.add_adapter("mlp", LoraConfig(r=3, target_modules=["up_proj", "down_proj"], init_lora_weights=False))
    names = ["mlp", "q", None, "q"]
    mixed = output(am, x, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], run_alone(am, x[i : i + 1], name)[0], atol=1e-5, rtol=1e-4)


def test_mixed_batch_dropout_applies_to_its_adapter_rows_only() -> None:
    model, x = tiny_llama(), model_input("llama", batch=4)
    base = output(model, x)
    am = AdaptedModel.attach(model, LoraConfig(lora_dropout=0.9, init_lora_weights=False), "drop")
    am.add_adapter("plain", LoraConfig(r=4, init_lora_weights=False))
    names = ["drop", None, "plain", "drop"]
    am.eval()  # explicitly: see test_attaching_keeps_the_models_eval_mode
    evaluated = output(am, x, adapter_names=names)
    train_without_dropout(am)  # the base model's dropout off; LoRA's own dropout stays
    trained = output(am, x, adapter_names=names)
    torch.testing.assert_close(trained[1], base[1])
    torch.testing.assert_close(trained[2], evaluated[2])
    assert not torch.allclose(trained[0], evaluated[0], atol=1e-4), "lora_dropout must act in train mode"
    am.eval()
    torch.testing.assert_close(evaluated[0], run_alone(am, x[:1], "drop")[0], atol=1e-5, rtol=1e-4)


def test_attaching_keeps_the_models_eval_mode() -> None:
    model, x = tiny_llama(), model_input("llama")
    am = AdaptedModel.attach(model, LoraConfig(lora_dropout=0.5, init_lora_weights=False))
    assert torch.equal(output(am, x), output(am, x))
    assert not any(m.training for m in am.model.modules())


@pytest.mark.parametrize("use_dora", [False, True])
def test_trainable_parameter_count_follows_the_rank(use_dora: bool) -> None:
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    am = AdaptedModel.attach(model, LoraConfig(r=4, use_dora=use_dora))
    q = am.model.model.layers[0].self_attn.q_proj  # Linear(16 -> 16)
    assert sum(p.numel() for p in q.adapter_tensors("default").values()) == 4 * (16 + 16) + 16 * use_dora
    linears = [m.base_layer for m in am.model.modules() if isinstance(m, LoraLayer)]
    assert len(linears) == 2 * 7  # every projection of both layers, not lm_head
    expected = sum(4 * (m.in_features + m.out_features) + m.out_features * use_dora for m in linears)
    assert am.trainable_parameters() == (expected, total + expected)


# -- AdaptedModel is an nn.Module ---------------------------------------------------------------------
def test_dtype_conversion_reaches_base_and_adapters() -> None:
    model, x = tiny_llama(), model_input("llama")
    am = AdaptedModel.attach(model, LoraConfig(init_lora_weights=False))
    expected = output(am, x)
    assert am.to(torch.float64) is am
    assert all(p.dtype == torch.float64 for p in am.parameters())
    torch.testing.assert_close(output(am, x).float(), expected, atol=1e-5, rtol=1e-4)
