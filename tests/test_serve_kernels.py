"""The engine's fast paths give the numbers of the plain ones: weights prepacked for oneDNN (bf16,
bit-identical to F.linear), the compiled per-token adapter kernel and its dense fallback (exact
greedy tokens either way), adapters loaded straight from their files (the same slot tensors as
attaching them), and Qwen3's per-head norms."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, tiny_llama
from torch.nn import functional as F

from peftkit import AdaptedModel, LoraConfig, RequestError
from peftkit.core.checks import check_adapter_file
from peftkit.serve import slots
from peftkit.serve.scheduler import EngineConfig, EngineCore
from peftkit.serve.step import StepBuffers
from peftkit.serve.types import AdapterLoadError, SamplingParams


def greedy_offline(model_fn, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    model = model_fn()
    am = AdaptedModel.from_pretrained(model, adapter) if adapter else model
    out = am.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


def strong_lora(model_fn, config: LoraConfig, path, seed: int) -> str:
    torch.manual_seed(seed)
    am = AdaptedModel.attach(model_fn(), config)
    with torch.no_grad():
        for p in am.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    return str(am.save_adapter(path))


def llama():
    torch.manual_seed(0)
    return tiny_llama()


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(2)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)  # fmt: skip
    return Qwen3ForCausalLM(config).eval()


def serve_and_compare(model_fn, dirs: dict[str, str], count: int = 24) -> EngineCore:
    """Greedy requests over the base and every adapter in `dirs`, interleaved in the same steps:
    each equal to offline generation."""
    engine = EngineCore(
        model_fn(), None, dirs.get, EngineConfig(max_len=64, max_batch=6, chunk=7, max_rank=4)
    )
    engine.eos_ids = set()
    g = torch.Generator().manual_seed(5)
    names = [None, *dirs]
    reqs = []
    for i in range(count):
        prompt = torch.randint(
            1, VOCAB, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g
        ).tolist()
        reqs.append((prompt, names[i % len(names)], SamplingParams(max_tokens=8, temperature=0)))
    for (prompt, name, params), outputs in zip(reqs, engine.run(reqs), strict=True):
        assert [o.token_id for o in outputs] == greedy_offline(
            model_fn, prompt, dirs.get(name), params.max_tokens
        )
    return engine


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {
        f"l{i}": strong_lora(
            llama,
            LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
            root / f"l{i}",
            seed=20 + i,
        )  # fmt: skip
        for i in range(4)
    }


@pytest.mark.parametrize("kernel", ["compiled", "dense"])
def test_mixed_decode_steps_are_exact_with_either_adapter_kernel(loras, kernel, monkeypatch) -> None:
    """Decode tokens of different adapters in one step go through the compiled per-token kernel,
    or, where torch cannot compile, the dense product over the slot range: exact either way."""
    gathered, calls = slots.GatheredKernel(), []
    if kernel == "dense":  # (the four adapters' slots are a narrow range: dense even with a compiler)
        gathered.failed = "no compiler (this test)"
    else:  # every mixed step through the kernel, however narrow its slot range
        monkeypatch.setattr(slots, "DENSE_WIDTH", 0)
    monkeypatch.setattr(slots, "GATHERED", lambda *args: calls.append(1) or gathered(*args))
    serve_and_compare(llama, loras)
    assert bool(calls) == (kernel == "compiled")  # the kernel was asked for, or the range was narrow
    assert (gathered.fn is not None) == (kernel == "compiled")  # it compiled on this machine, and ran


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prepacked_products_are_bit_identical_to_f_linear(dtype) -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 40, dtype=dtype)
    product = slots.packed_product(weight)
    for rows in (1, 7, 16, 300):
        x = torch.randn(rows, 40, dtype=dtype)
        assert torch.equal(product(x), F.linear(x, weight))
    strided = torch.randn(5, 80, dtype=dtype)[:, ::2]
    assert torch.equal(product(strided), F.linear(strided, weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            rank_pattern={"down_proj": 2},
            alpha_pattern={"q_proj": 3},
            init_lora_weights=False,
        ),  # fmt: skip
        LoraConfig(r=3, use_rslora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ],
    ids=["lora-patterns", "rslora"],
)
def test_adapters_loaded_from_their_files_match_attaching_them(config, dtype, tmp_path) -> None:
    """The server reads LoRA and rsLoRA slot tensors straight from the file: bit for bit what
    attaching the adapter and reading its layers gives, per-layer ranks and alphas included."""
    path = strong_lora(llama, config, tmp_path / "a", seed=3)
    engine = EngineCore(llama().to(dtype), None, {"a": path}.get, EngineConfig(max_len=32, max_rank=4))
    cache = engine.adapters
    cache.request("a")  # makes the staging model, as any load does
    while cache.busy:
        cache.place(lambda key, error: None)
    fast = cache._from_file("a", check_adapter_file(cache.staging, path))
    slow = cache._through_model("a", path)
    assert fast is not None and fast.keys() == slow.keys() and len(fast) > 0
    for name in slow:
        assert fast[name].keys() == slow[name].keys() == {"A", "Bt"}
        for role in slow[name]:
            assert fast[name][role].dtype == dtype
            assert torch.equal(fast[name][role], slow[name][role]), (name, role)


def test_dora_loads_through_the_model(tmp_path) -> None:
    """DoRA's factor needs the base weight through its layer: the file path declines it."""
    path = strong_lora(llama, LoraConfig(r=2, use_dora=True, init_lora_weights=False), tmp_path / "d", seed=4)
    engine = EngineCore(llama(), None, {"d": path}.get, EngineConfig(max_len=32, max_rank=4))
    cache = engine.adapters
    cache.request("d")
    while cache.busy:
        cache.place(lambda key, error: None)
    assert cache._from_file("d", check_adapter_file(cache.staging, path)) is None
    assert "out_scale" in next(iter(cache._through_model("d", path).values()))


def test_qwen3_per_head_norms_are_served_exactly(tmp_path) -> None:
    dirs = {
        "q": strong_lora(
            qwen3,
            LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
            tmp_path / "q",
            seed=6,
        ),  # fmt: skip
    }
    serve_and_compare(qwen3, dirs, count=8)


def test_a_sliding_window_shorter_than_max_len_is_refused() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=16)  # fmt: skip
    with pytest.raises(RequestError, match="sliding window of 16 tokens.*max_len at most 16"):
        EngineCore(MistralForCausalLM(config).eval(), None, None, EngineConfig(max_len=64))
    EngineCore(MistralForCausalLM(config).eval(), None, None, EngineConfig(max_len=16))  # fits: served


def running(slot: int, row: int, cached: int = 3, prompt: int = 3) -> SimpleNamespace:
    """A sequence as a step reads it: `cached` tokens in row `row` of a `prompt`-token prompt."""
    return SimpleNamespace(prompt=list(range(1, prompt + 1)), output=[40 + row], row=row, slot=slot,
                           cached=cached, start=0)  # fmt: skip


def test_base_tokens_do_not_widen_a_mixed_steps_slot_range() -> None:
    """The base model's slot is the banks' last: a step mixing base and adapter tokens keeps the
    dense range to the adapters' slots (base tokens get no columns)."""
    buffers = StepBuffers(16, 8, 16, 32, torch.float32, "cpu")
    chunk = running(7, 7, cached=0, prompt=5)
    rt = buffers.fill([running(s, i) for i, s in enumerate([16, 2, 3, 16])], [(chunk, 5)]).slots
    assert (rt.lo, rt.hi, rt.uniform) == (2, 4, None)
    assert rt.onehot[:, :, 0].tolist() == [[0, 0], [1, 0], [0, 1], [0, 0]]
    only_base = buffers.fill([running(16, 0), running(16, 1)], [(chunk, 5)]).slots
    assert only_base.hi == only_base.lo  # no adapter among the decode tokens: nothing to add


def test_a_steps_inputs_are_written_into_its_buffers() -> None:
    """Decode tokens (rows 4 and 2: out of row order), then two prefill chunks, the second ending
    its prompt: every input in place, the masks as attention reads them."""
    buffers = StepBuffers(16, 8, 4, 32, torch.float32, "cpu")
    decode = [running(1, 4, cached=5), running(4, 2, cached=2)]
    first, second = running(0, 0, cached=0, prompt=6), running(0, 1, cached=2, prompt=4)
    step = buffers.fill(decode, [(first, 3), (second, 2)])
    assert step.ids.tolist() == [44, 42, 1, 2, 3, 3, 4]
    assert step.positions.tolist() == [5, 2, 0, 1, 2, 2, 3]
    assert step.rows.tolist() == [4, 2, 0, 0, 0, 1, 1]
    assert step.slots.slots.tolist() == [1, 4, 0, 0, 0, 0, 0]
    assert step.last.tolist() == [0, 1, 6] and step.finishing == [1] and step.chunk == 5
    dec = step.decode
    assert (dec.lo, dec.count, dec.span, dec.in_order, dec.within.tolist()) == (2, 3, 6, False, [2, 0])
    assert (dec.mask[:, 0, 0] == 0).tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1] * 6]
    assert [(c.row, c.start, c.length, c.offset) for c in step.prefill] == [(0, 0, 3, 2), (1, 2, 2, 5)]
    assert step.prefill[1].mask.tolist() == [[True, True, True, False], [True] * 4]
    assert (step.slots.first, step.slots.lo, step.slots.hi) == (1, 1, 2)  # slot 4 is the base's


def test_a_method_is_served_by_the_roles_it_declares() -> None:
    """Capability, not a method's name: roles the slot banks hold are served; others, or none
    declared, are refused in words a client can act on."""
    spec = SimpleNamespace(label="Scaled", slot_tensors=lambda layer, name: {}, slot_roles=None)
    with pytest.raises(AdapterLoadError, match="'k' is Scaled, which the server does not serve yet"):
        slots.check_servable("k", spec)
    slots.check_servable("k", replace_ns(spec, slot_roles=frozenset({"in_scale", "out_scale"})))
    with pytest.raises(AdapterLoadError, match=r"slot tensors \(C\) the server's engine does not hold"):
        slots.check_servable("k", replace_ns(spec, slot_roles=frozenset({"A", "C"})))
    assert set(slots.BANKS) == {"A", "Bt", "in_scale", "out_scale", "bias_scale"}


def replace_ns(ns: SimpleNamespace, **changes) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(ns), **changes})
