"""The serving engine on tiny models: greedy decoding gives exactly the tokens of offline generation
for every request, with many adapters (LoRA, rsLoRA, DoRA, IA³) interleaved in the same steps,
through chunked prefill and slot eviction; a bad adapter fails only its own requests; sampling
follows its parameters; the threaded front loads, unloads and stops cleanly."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest import VOCAB, tiny_llama

from peftkit import (
    AdaptedModel,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    RequestError,
)
from peftkit.serve.engine import Engine
from peftkit.serve.scheduler import EngineConfig, EngineCore
from peftkit.serve.types import (
    AdapterBusyError,
    AdapterLoadError,
    AdapterNotLoadedError,
    QueueFullError,
    SamplingParams,
)

CONFIGS = {
    "lora": LoraConfig(r=4, init_lora_weights=False),
    "rslora": LoraConfig(r=2, use_rslora=True, init_lora_weights=False, target_modules="all-linear"),
    "dora": LoraConfig(r=4, use_dora=True, init_lora_weights=False, target_modules=["q_proj", "down_proj"]),
    "ia3": IA3Config(init_ia3_weights=False),
}


def base():
    torch.manual_seed(0)
    return tiny_llama()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    """Saved adapters, strong enough that each changes the tokens it generates."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(10 + i)
        am = AdaptedModel.attach(base(), config)
        with torch.no_grad():
            for key, p in am.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p)) if "ia3" in key else p.mul_(3.0)
        out[name] = str(am.save_adapter(root / name))
    return out


def offline(prompt: list[int], adapter: str | None, n: int) -> list[int]:
    """What `generate` gives for one request alone (HF's loop over peftkit's adapted model)."""
    model = base()
    am = AdaptedModel.from_pretrained(model, adapter) if adapter else model
    out = am.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


def core(adapters: dict[str, str], **config) -> EngineCore:
    engine = EngineCore(base(), None, adapters.get, EngineConfig(**({"max_len": 64} | config)))
    engine.eos_ids = set()  # a random model's end-of-sequence token would end requests at random
    return engine


def requests(
    count: int, names: list[str | None], seed: int = 0
) -> list[tuple[list[int], str | None, SamplingParams]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt = torch.randint(
            1, VOCAB, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g
        ).tolist()
        tokens = int(torch.randint(1, 12, (1,), generator=g))
        out.append((prompt, names[i % len(names)], SamplingParams(max_tokens=tokens, temperature=0)))
    return out


def test_greedy_tokens_equal_offline_generation_with_many_adapters_interleaved(adapters) -> None:
    """40 requests over the base and four adapters of three methods, 4 rows, 2 adapter slots (so
    adapters are evicted and reloaded), 5-token prefill chunks beside the decode tokens."""
    engine = core(adapters, max_batch=4, chunk=5, adapter_slots=2, max_rank=4)
    reqs = requests(40, [None, *CONFIGS])
    results = engine.run(reqs)
    for (prompt, adapter, params), outputs in zip(reqs, results, strict=True):
        assert [o.token_id for o in outputs] == offline(
            prompt, adapter and adapters[adapter], params.max_tokens
        )
        assert [o.finish_reason for o in outputs] == [None] * (params.max_tokens - 1) + ["length"]
    assert engine.steps < sum(len(p) + s.max_tokens for p, _, s in reqs)  # batched, not one by one
    assert engine.free_rows == [0, 1, 2, 3] and engine.idle  # every row given back


def test_the_adapters_change_the_tokens(adapters) -> None:
    """So the test above could fail: each adapter's tokens differ from the base model's somewhere."""
    reqs = requests(10, [None])
    for name in CONFIGS:
        assert any(
            offline(p, adapters[name], s.max_tokens) != offline(p, None, s.max_tokens) for p, _, s in reqs
        ), name


def test_a_bad_adapter_fails_only_its_requests(adapters, tmp_path) -> None:
    """50 requests naming a missing or broken adapter, between good ones: each fails with
    AdapterLoadError naming the adapter; every other request gets its offline tokens."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    bad = {**adapters, "missing": str(tmp_path / "nowhere"), "broken": str(broken)}
    engine = core(bad, max_batch=4, chunk=8, adapter_slots=2, max_rank=4)
    reqs = requests(75, ["lora", "missing", "broken", None, "ia3"], seed=1)
    reqs = [r for i, r in enumerate(reqs) if i % 5 in (1, 2)][:50] + [
        r for i, r in enumerate(reqs) if i % 5 not in (1, 2)
    ]
    results = engine.run(reqs)
    for (prompt, adapter, params), outputs in zip(reqs, results, strict=True):
        if adapter in ("missing", "broken"):
            assert (
                len(outputs) == 1 and isinstance(outputs[0], AdapterLoadError) and adapter in str(outputs[0])
            )
        else:
            assert [o.token_id for o in outputs] == offline(
                prompt, adapter and bad[adapter], params.max_tokens
            )


def test_what_the_engine_cannot_serve_is_refused_clearly(adapters, tmp_path) -> None:
    am = AdaptedModel.attach(base(), BottleneckConfig(bottleneck_size=4))
    bottleneck_dir = str(am.save_adapter(tmp_path / "bottleneck"))
    other = tiny_llama()  # another random base: another fingerprint
    other_dir = str(AdaptedModel.attach(other, LoraConfig(r=2)).save_adapter(tmp_path / "other"))
    engine = core({**adapters, "bottleneck": bottleneck_dir, "other": other_dir}, max_rank=2)
    results = engine.run([([1, 2], "bottleneck", SamplingParams()), ([1, 2], "other", SamplingParams()),
                          ([1, 2], "lora", SamplingParams())])  # fmt: skip
    messages = [str(r[0]) for r in results]
    assert "bottleneck" in messages[0].lower() and "does not serve" in messages[0]
    assert "fingerprint" in messages[1]
    assert "rank 4 is over the server's max_rank 2" in messages[2]
    with pytest.raises(RequestError, match="at most 63"):
        engine.add_request([1] * 64, None, SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], None, SamplingParams())
    small = core(adapters, max_queue=2)
    small.add_request([1], None, SamplingParams())
    small.add_request([1], None, SamplingParams())
    with pytest.raises(QueueFullError):
        small.add_request([1], None, SamplingParams())


def test_sampling_follows_seed_top_p_and_logprobs(adapters) -> None:
    engine = core(adapters)
    prompt = [5, 6, 7]
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=42)
    first, second, other = engine.run([(prompt, "lora", seeded), (prompt, "lora", seeded),
                                       (prompt, "lora", SamplingParams(max_tokens=8, temperature=1.0, seed=7))])  # fmt: skip
    assert [o.token_id for o in first] == [o.token_id for o in second] != [o.token_id for o in other]
    narrow = engine.run(
        [(prompt, None, SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-6, seed=s)) for s in range(3)]
    )
    greedy = offline(prompt, None, 6)
    assert all([o.token_id for o in out] == greedy for out in narrow)  # top_p ~0 keeps only the top token
    (scored,) = engine.run([(prompt, None, SamplingParams(max_tokens=1, temperature=0, logprobs=3))])
    with torch.no_grad():
        expected = torch.log_softmax(base()(torch.tensor([prompt])).logits[0, -1].float(), -1)
    out = scored[0]
    assert out.logprob == pytest.approx(float(expected.max()), abs=1e-4)
    assert list(out.top_logprobs) == expected.topk(3).indices.tolist()


async def _eventually(condition) -> bool:
    """Whether `condition` holds within 900 s (a hang guard): the engine's thread publishes what
    adapters() and stats() read between its steps, maybe just after an awaited command settled."""
    for _ in range(90000):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


def test_the_threaded_engine_serves_loads_unloads_and_stops(adapters) -> None:
    engine = Engine.start(
        base(), None, adapters.get, EngineConfig(max_len=64, max_batch=4, adapter_slots=2, max_rank=4)
    )
    engine.core.eos_ids = set()
    reqs = requests(12, [None, *CONFIGS], seed=2)

    async def one(prompt, adapter, params):
        return [o.token_id async for o in engine.generate(prompt, adapter, params)]

    async def main():
        results = await asyncio.gather(*(one(*r) for r in reqs))
        for (prompt, adapter, params), tokens in zip(reqs, results, strict=True):
            assert tokens == offline(prompt, adapter and adapters[adapter], params.max_tokens)
        keys = lambda: [a["key"] for a in engine.adapters()]  # noqa: E731
        await engine.load("lora")
        assert await _eventually(lambda: "lora" in keys())
        await engine.unload("lora")
        assert await _eventually(lambda: "lora" not in keys())
        with pytest.raises(AdapterLoadError, match="nowhere"):
            await engine.load("nowhere")
        stream = engine.generate([1, 2, 3], "dora", SamplingParams(max_tokens=50, temperature=0))
        await stream.__anext__()  # one token in, then the client goes away
        await stream.aclose()
        assert await _eventually(lambda: engine.stats()["running"] == 0)  # the abort freed its row

    asyncio.run(main())
    engine.stop(deadline=900)
    assert not engine.thread.is_alive()


@pytest.mark.parametrize(
    "config",
    [
        PromptTuningConfig(num_virtual_tokens=3),
        PrefixTuningConfig(num_virtual_tokens=4),
        PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8),
    ],
    ids=["prompt", "prefix", "prefix-projected"],
)
def test_prompt_and_prefix_tuned_adapters_are_served_as_prefixes(adapters, tmp_path, config) -> None:
    """A whole-model adapter is a key/value prefix computed once at load and put in front of each of
    its sequences: greedy tokens equal offline generation, beside layer adapters and the base."""
    torch.manual_seed(3)
    am = AdaptedModel.attach(base(), config)
    with torch.no_grad():
        for p in am.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    served = {**adapters, "whole": str(am.save_adapter(tmp_path / "whole"))}
    engine = core(served, max_batch=3, chunk=4, adapter_slots=2, max_rank=4)
    reqs = requests(12, ["whole", None, "lora", "whole"], seed=5)
    for (prompt, adapter, params), outputs in zip(reqs, engine.run(reqs), strict=True):
        assert [o.token_id for o in outputs] == offline(
            prompt, adapter and served[adapter], params.max_tokens
        )
    assert any(
        offline(p, served["whole"], s.max_tokens) != offline(p, None, s.max_tokens) for p, _, s in reqs
    )
    (too_long,) = engine.run([([1] * 62, "whole", SamplingParams())])
    assert isinstance(too_long[0], RequestError) and "puts" in str(too_long[0])


def test_memory_budgets_size_the_kv_cache_and_the_adapter_slots(adapters) -> None:
    model = base()
    per_token = 2 * 2 * 1 * 8 * 4  # keys and values x 2 layers x 1 KV head x head_dim 8 x fp32
    sized = EngineConfig(max_len=64, kv_cache_mb=1, adapter_cache_mb=1, max_rank=4).sized(model)
    assert sized.max_batch == 2**20 // (per_token * 64)
    engine = core(adapters, kv_cache_mb=1, adapter_cache_mb=1, max_rank=4)
    assert (
        engine.served.cache.k.numel() * 4 * 2 <= 2**20 < (engine.served.cache.k.numel() + 64 * 2 * 8) * 4 * 2
    )
    assert engine.adapters.slots.capacity == sized.adapter_slots > 16  # a tiny model's slots are small
    with pytest.raises(RequestError, match="kv_cache_mb 1 MB is less than one sequence of max_len needs"):
        EngineConfig(max_len=10**6, kv_cache_mb=1).sized(model)
    with pytest.raises(RequestError, match="max_batch must be a whole number of at least 1"):
        EngineConfig(max_batch=0)


def tiny_qwen2():
    """A tiny Qwen2: a Llama-family decoder whose q/k/v projections have biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def test_adapters_that_would_change_the_shared_base_are_refused_and_change_nothing(tmp_path) -> None:
    """On a base with biases (Qwen2), an adapter that trains them, or whole modules, would write into
    the model every request shares: refused, and the base's answers stay exactly the same."""
    model = tiny_qwen2()
    biased = AdaptedModel.attach(tiny_qwen2(), LoraConfig(r=2, bias="all", init_lora_weights=False))
    with torch.no_grad():
        for name, p in biased.named_parameters():
            if name.endswith("bias"):
                p.add_(1.0)  # what loading it would copy into the served model's biases
    head = AdaptedModel.attach(tiny_qwen2(), LoraConfig(r=2, modules_to_save=["lm_head"]))
    dirs = {
        "biased": str(biased.save_adapter(tmp_path / "biased")),
        "head": str(head.save_adapter(tmp_path / "head")),
    }
    engine = EngineCore(model, None, dirs.get, EngineConfig(max_len=64))
    engine.eos_ids = set()
    prompt, greedy = [3, 4, 5], SamplingParams(max_tokens=6, temperature=0)
    (before,) = engine.run([(prompt, None, greedy)])
    refused = engine.run([(prompt, "biased", SamplingParams()), (prompt, "head", SamplingParams())])
    assert all(isinstance(r[0], AdapterLoadError) and "bias / modules_to_save" in str(r[0]) for r in refused)
    (after,) = engine.run([(prompt, None, greedy)])
    reference = tiny_qwen2().generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                      pad_token_id=0, eos_token_id=None)[0, 3:].tolist()  # fmt: skip
    assert [o.token_id for o in after] == [o.token_id for o in before] == reference


def test_unloading_a_busy_prefix_adapter_is_refused_and_keeps_it_working(adapters, tmp_path) -> None:
    torch.manual_seed(4)
    am = AdaptedModel.attach(base(), PrefixTuningConfig(num_virtual_tokens=3))
    served = {**adapters, "prefix": str(am.save_adapter(tmp_path / "prefix"))}
    engine = core(served, max_batch=2)
    outputs = engine.add_request([7, 8, 9], "prefix", SamplingParams(max_tokens=5, temperature=0))
    engine.step()  # loading
    while not engine.running:
        engine.step()
    with pytest.raises(AdapterBusyError):
        engine.adapters.unload("prefix")
    while not engine.idle:
        engine.step()
    assert [o.token_id for o in outputs] == offline([7, 8, 9], served["prefix"], 5)  # the prefix stayed
    engine.adapters.unload("prefix")
    assert engine.adapters.prefix("prefix") is None and engine.adapters.slot("prefix") is None
    with pytest.raises(AdapterNotLoadedError):
        engine.adapters.unload("prefix")


def test_an_adapter_evicted_while_its_requests_wait_is_loaded_again(adapters) -> None:
    """One row and one slot: the second adapter's load evicts the first while its next request still
    waits for the row; that request reloads it and gets its offline tokens."""
    engine = core(adapters, max_batch=1, adapter_slots=1, max_rank=4)
    reqs = [([1, 2, 3], "lora", SamplingParams(max_tokens=3, temperature=0)),
            ([4, 5], "ia3", SamplingParams(max_tokens=3, temperature=0)),
            ([6, 7, 8], "lora", SamplingParams(max_tokens=3, temperature=0))]  # fmt: skip
    loads: list[str] = []
    engine.listeners.append(
        lambda name, data: loads.append(data["adapter"]) if name == "adapter_load" else None
    )
    results = [engine.add_request(*reqs[0])]
    while not engine.running:  # the first "lora" request holds the row and pins the slot
        engine.step()
    results += [engine.add_request(*r) for r in reqs[1:]]
    # "ia3" is loaded before the first request ends, so the step that frees the slot gives it to
    # "ia3" while the second "lora" request waits for the row (a load still in flight then would
    # let that request take the row on the resident "lora" first).
    engine.adapters.loads["ia3"].result()
    while engine.busy:
        engine.step()
        if not engine.running and engine.adapters.busy:
            time.sleep(0.001)
    for (prompt, adapter, params), outputs in zip(reqs, results, strict=True):
        assert [o.token_id for o in outputs] == offline(prompt, adapters[adapter], params.max_tokens)
    assert loads == ["lora", "ia3", "lora"]
