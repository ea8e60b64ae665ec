"""NF4 base layers: bytes and values identical to bitsandbytes 0.50 (the oracle), on both backends;
state dicts interchangeable with bitsandbytes' Linear4bit; gradients through the frozen layer."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import char_tokenizer, model_input, output, tiny_gpt2, tiny_llama
from torch import nn

from peftkit.base import nf4
from peftkit.base.facts import base_facts
from peftkit.base.nf4 import NF4Linear, dequantize_nf4, quantize_model, quantize_nf4
from peftkit.errors import BaseModelError

bnb = nf4._bnb()
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")
BACKENDS = ["torch", pytest.param("bnb", marks=needs_bnb)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Rows aligned to blocks; rows straddling blocks (80 = 64 + 16); odd sizes; > 256 blocks (two nested
# blocks); a single value.
SHAPES = [(32, 64), (3, 80), (5, 7), (33, 65), (300, 128), (1, 1)]


def _weight(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _flat_reference(q: nf4.NF4Weight) -> torch.Tensor:
    """Dequantization written out the slow, obvious way: flat blocks over the row-major weight."""
    codes = q.data.view(-1)
    levels = torch.stack([codes >> 4, codes & 15], 1).view(-1)[: q.shape.numel()].long()
    absmax = q.absmax
    if q.double_quantized:
        absmax = (
            nf4.dynamic_code()[q.absmax.long()] * q.nested_absmax.repeat_interleave(256)[: q.absmax.numel()]
        )
        absmax = absmax + q.offset
    scale = absmax.repeat_interleave(q.blocksize)[: q.shape.numel()]
    return (nf4.nf4_code()[levels] * scale).view(q.shape)


# -- format parity with bitsandbytes ------------------------------------------------------------------
@needs_bnb
def test_level_tables_are_bitsandbytes_own() -> None:
    assert torch.equal(nf4.nf4_code(), bnb.functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_code(), bnb.functional.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "bnb"])
def test_bytes_equal_bitsandbytes_quantize_4bit(backend: str, dtype: torch.dtype) -> None:
    for shape in SHAPES:
        w = _weight(shape, dtype)
        q = quantize_nf4(w, backend=backend)
        data, state = bnb.functional.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        assert torch.equal(q.data, data) and q.data.shape == (-(-w.numel() // 2), 1), shape
        assert torch.equal(q.absmax, state.absmax) and q.absmax.dtype == torch.uint8, shape
        assert torch.equal(q.nested_absmax, state.state2.absmax), shape
        assert torch.equal(q.offset, state.offset), shape


@needs_bnb
def test_bytes_equal_without_double_quantization() -> None:
    w = _weight((40, 128), torch.bfloat16)
    data, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    for backend in ("torch", "bnb"):
        q = quantize_nf4(w, compress_statistics=False, backend=backend)
        assert torch.equal(q.data, data) and torch.equal(q.absmax, state.absmax) and q.nested_absmax is None
        assert torch.equal(dequantize_nf4(q, backend="torch"), bnb.functional.dequantize_4bit(data, state))


@needs_bnb
def test_partial_last_block_rounds_like_bitsandbytes() -> None:
    """bitsandbytes scales full blocks by a reciprocal but divides the last, partial one; values
    where the two round to different sides of an NF4 boundary must still match its bytes."""
    absmax, bounds = torch.tensor(3.0), nf4._nf4_bounds(torch.device("cpu"))
    up = down = bounds * absmax  # (15,) values that land on the boundaries
    near = [up]
    for _ in range(4):  # and four ulps either side
        up, down = torch.nextafter(up, torch.tensor(9.0)), torch.nextafter(down, torch.tensor(-9.0))
        near += [up, down]
    near = torch.cat(near)  # (135,)
    split = near[torch.bucketize(near / absmax, bounds) != torch.bucketize(near * (1.0 / absmax), bounds)]
    assert 0 < split.numel() < 63  # all in one partial block with 3.0
    w = torch.cat([_weight((64,)), absmax.unsqueeze(0), split])  # full block, then the partial one
    data, _ = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    for backend in ("torch", "bnb"):
        assert torch.equal(quantize_nf4(w, backend=backend).data, data)


@needs_bnb
def test_nested_8bit_quantizer_equals_bitsandbytes_at_rounding_edges() -> None:
    """The CPU 8-bit quantizer rounds to a 65536-point grid; values one ulp either side of every grid
    edge and every level midpoint must land where bitsandbytes puts them."""
    k = torch.arange(65536, dtype=torch.float64)
    code = nf4.dynamic_code().double()
    edges = torch.cat([(k + 0.5) / 65535.0 * 2 - 1, (code[:-1] + code[1:]) / 2]).float()
    up, down = torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))
    x = torch.cat([edges, up, down]).clamp(-1, 1)
    x = x[: x.numel() // 255 * 255].view(-1, 255)
    x = torch.cat([x, torch.ones(x.shape[0], 1)], 1).view(-1) * 0.37  # (blocks * 256,)
    x = torch.cat([x, torch.zeros(256), torch.randn(100)])  # an all-zero block, a partial tail
    ours, absmax = nf4._quantize_8bit_torch(x)
    theirs, state = bnb.functional.quantize_blockwise(x, blocksize=256)
    assert torch.equal(ours, theirs) and torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_equals_flat_reference(backend: str, out_dtype: torch.dtype) -> None:
    for shape in SHAPES:
        q = quantize_nf4(_weight(shape, torch.bfloat16), backend="torch")
        got = dequantize_nf4(q, out_dtype, backend=backend)
        assert got.dtype == out_dtype and got.shape == shape
        assert torch.equal(got, _flat_reference(q).to(out_dtype)), shape


@needs_bnb
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_equals_bitsandbytes_dequantize_4bit(out_dtype: torch.dtype) -> None:
    for shape in [(32, 64), (300, 128), (5, 7), (7, 100)]:  # shapes bitsandbytes' CPU kernel gets right
        w = _weight(shape, out_dtype)
        data, state = bnb.functional.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        q = quantize_nf4(w)
        for backend in ("torch", "bnb"):
            assert torch.equal(
                dequantize_nf4(q, backend=backend), bnb.functional.dequantize_4bit(data, state)
            )


@needs_bnb
def test_rows_that_straddle_blocks_dequantize_right_whatever_bitsandbytes_kernel_runs() -> None:
    """Why the bnb backend dequantizes such shapes in PyTorch: bitsandbytes 0.50.2's AVX-512 CPU
    kernel indexes absmax per row, so with 80 values a row (blocks straddle rows) it scales most
    values by the wrong block; its kernel for other CPUs reads them right. Ours is right on both (if
    the AVX-512 branch starts failing, bitsandbytes fixed it)."""
    w = _weight((64, 80))
    data, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    theirs = bnb.functional.dequantize_4bit(data, state)
    ours = dequantize_nf4(quantize_nf4(w, compress_statistics=False), torch.float32, backend="bnb")
    assert (ours - w).norm() / w.norm() < 0.12  # 4 bits' error (about 0.09), every block its own scale
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert not torch.equal(theirs, ours)
        assert (ours - w).norm() < 0.6 * (theirs - w).norm()
    else:
        assert torch.equal(theirs, ours)


def test_quantization_error_is_that_of_4_bits() -> None:
    w = _weight((128, 256))
    err = (dequantize_nf4(quantize_nf4(w), torch.float32) - w).norm() / w.norm()
    assert 0.02 < err < 0.12  # NF4 on Gaussian weights: ~0.09


def test_unknown_backend_and_module_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'auto', 'bnb', 'torch'"):
        quantize_nf4(_weight((4, 64)), backend="cuda")  # type: ignore[arg-type]
    monkeypatch.setattr(nf4, "BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        quantize_nf4(_weight((4, 64)))
    monkeypatch.setattr(nf4, "BACKEND", "torch")
    assert nf4._resolve_backend(None, torch.device("cpu")) == "torch"


def test_bitsandbytes_import_is_quick_and_quiet() -> None:
    """In a fresh process: no warning, no inductor import (the slow part), torch.compile restored, and
    `kernels` (the hub fetch) left as it was: transformers from 5.x imports it itself when installed."""
    code = (
        "import sys, torch; compile_fn = torch.compile\n"
        "from peftkit.base.nf4 import _bnb\n"
        "kernels = sys.modules.get('kernels')\n"
        "assert _bnb() is not None, 'bitsandbytes did not import'\n"
        "assert torch.compile is compile_fn and sys.modules.get('kernels') is kernels\n"
        "print('torch._inductor.compile_fx' in sys.modules)\n"
    )
    if bnb is None:
        pytest.skip("bitsandbytes is not installed")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False" and done.stderr == ""


# -- the layer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_input_grad_match_dense_linear(backend: str, compute_dtype: torch.dtype) -> None:
    linear = nn.Linear(128, 48).to(compute_dtype)
    layer = NF4Linear.from_linear(linear, backend=backend)
    assert layer.compute_dtype == compute_dtype and (layer.in_features, layer.out_features) == (128, 48)
    assert not any(p.requires_grad for p in layer.parameters())
    weight = layer.dequantized_weight()  # (48, 128)
    assert weight.shape == (48, 128) and weight.dtype == compute_dtype
    x = torch.randn(2, 5, 128, dtype=compute_dtype, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    y, ref = layer(x), F.linear(ref_x, weight, layer.bias)
    assert torch.equal(y, ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, ref_x.grad)


def test_backward_keeps_nothing_weight_sized() -> None:
    layer = NF4Linear.from_linear(nn.Linear(256, 128, bias=False), compute_dtype=torch.float32)
    saved: list[torch.Tensor] = []
    x = torch.randn(3, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert all(t.numel() < 128 * 256 // 4 for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(3, 128) @ layer.dequantized_weight())


def test_unfrozen_bias_gets_its_gradient_and_fp32_input_comes_back_fp32() -> None:
    layer = NF4Linear.from_linear(nn.Linear(64, 8), compute_dtype=torch.bfloat16)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((8,), 12.0, dtype=torch.bfloat16))


@needs_bnb
def test_eval_no_grad_forward_then_training_keeps_the_input_gradient() -> None:
    """The trap: bitsandbytes 0.50's Linear4bit, after one eval-mode forward under no_grad on an
    AVX-512-BF16 CPU, repacks its weight in place for an inference kernel that has no autograd; in
    train mode its gradient to the input is then silently None (torch only warns; with a bias it
    raises instead). NF4Linear has no such state: the gradient after the same sequence is exact."""
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 64)
    layer = NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert torch.equal(xg.grad, torch.ones(4, 32) @ layer.dequantized_weight())

    theirs = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu").requires_grad_(False)
    theirs.eval()
    with torch.no_grad():
        theirs(x)
    theirs.train()
    xb = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "autograd kernel was not registered"
        theirs(xb).sum().backward()
    if bnb.functional.has_avx512bf16():
        assert xb.grad is None  # reproduces with 0.50.2: the base layer's gradient is gone
    else:
        assert torch.allclose(xb.grad, xg.grad, atol=1e-5)  # no repacking on this CPU


def test_to_dtype_keeps_fp32_statistics() -> None:
    layer = NF4Linear.from_linear(nn.Linear(64, 300), compute_dtype=torch.float32)
    before = layer.dequantized_weight()
    layer.to(torch.bfloat16)
    assert layer.weight_nested_absmax.dtype == torch.float32 and layer.weight_offset.dtype == torch.float32
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantized_weight(), before)


def test_to_linear_gives_the_same_outputs() -> None:
    layer = NF4Linear.from_linear(nn.Linear(64, 16), compute_dtype=torch.float32)
    plain = layer.to_linear()
    x = torch.randn(5, 64)
    assert type(plain) is nn.Linear and not plain.weight.requires_grad
    assert torch.equal(plain(x), layer(x))


# -- state dicts --------------------------------------------------------------------------------------
def _bnb_linear(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, quant_type="nf4"
    )
    layer.to(linear.weight.dtype).load_state_dict(linear.state_dict())  # quantized from this dtype
    return layer.to("cpu").requires_grad_(False)  # quantizes


@needs_bnb
def test_state_dict_equals_bitsandbytes_key_for_key() -> None:
    linear = nn.Linear(128, 48).to(torch.bfloat16)
    theirs = _bnb_linear(linear).state_dict()
    ours = NF4Linear.from_linear(linear).state_dict()
    assert list(ours) == list(theirs) == [
        "weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
    ]  # fmt: skip
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@needs_bnb
@pytest.mark.parametrize("bias", [True, False])
def test_bitsandbytes_state_dict_loads_into_nf4linear(bias: bool) -> None:
    linear = nn.Linear(128, 64, bias=bias)
    theirs = _bnb_linear(linear)
    ours = NF4Linear(quantize_nf4(torch.zeros(64, 128)), torch.zeros(64) if bias else None, torch.float32)
    result = ours.load_state_dict(theirs.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    theirs.train()  # bitsandbytes' reference path (not the repacked eval kernel)
    x = torch.randn(3, 128)
    assert torch.equal(ours(x), theirs(x))


@needs_bnb
def test_nf4linear_state_dict_loads_into_bitsandbytes() -> None:
    linear = nn.Linear(128, 64)
    ours = NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    state = ours.state_dict()
    theirs = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k[len("weight.") :]: v for k, v in state.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=theirs)
    theirs.bias = nn.Parameter(state["bias"], requires_grad=False)
    theirs.train()
    x = torch.randn(3, 128)
    assert torch.equal(theirs(x), ours(x))


def test_state_dict_round_trip_through_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    source = NF4Linear.from_linear(nn.Linear(96, 40).to(torch.bfloat16), compute_dtype=torch.float32)
    save_file(source.state_dict(), tmp_path / "layer.safetensors")
    target = NF4Linear(quantize_nf4(torch.zeros(40, 96)), torch.zeros(40), torch.float32)
    target.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(target.dequantized_weight(), source.dequantized_weight())
    assert target.quant_dtype == torch.bfloat16 and target.compute_dtype == torch.float32


def test_load_refuses_other_shapes_and_reports_missing_keys() -> None:
    state = NF4Linear.from_linear(nn.Linear(64, 8)).state_dict()
    other = NF4Linear(quantize_nf4(torch.zeros(16, 64)), torch.zeros(16))
    with pytest.raises(RuntimeError, match=r"holds \(8, 64\), this layer is \(16, 64\)"):
        other.load_state_dict(state)
    del state["weight.absmax"]
    result = NF4Linear.from_linear(nn.Linear(64, 8)).load_state_dict(state, strict=False)
    assert result.missing_keys == ["weight.absmax"]


# -- whole models -------------------------------------------------------------------------------------
def _frozen_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def test_quantize_model_on_tiny_llama() -> None:
    model = tiny_llama()
    x = model_input("llama")
    before, bytes_before = output(model, x), _frozen_bytes(model.model.layers)
    assert quantize_model(model, compute_dtype=torch.float32) == 14  # 2 layers x (4 attention + 3 MLP)
    assert type(model.lm_head) is nn.Linear  # the output head stays full precision
    assert all(type(m) is not nn.Linear for m in model.model.layers.modules())
    after = output(model, x)
    assert (after - before).norm() / before.norm() < 0.1  # ~0.04; another random model: ~1.4
    assert _frozen_bytes(model.model.layers) < 0.25 * bytes_before  # ~0.15: codes, statistics, fp32 norms


def test_quantize_model_skips_by_exact_suffix() -> None:
    model = tiny_llama(tie=True)
    assert quantize_model(model, skip=("proj",)) == 14  # a fragment of a name matches nothing
    model = tiny_llama(tie=True)
    assert quantize_model(model, skip=("mlp.down_proj", "model.layers.0.self_attn.q_proj")) == 11
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.q_proj) is NF4Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie is intact


def test_load_base_nf4_keeps_the_checkpoint_fingerprint(tiny_model_dir, tmp_path) -> None:
    from peftkit.base import load_base

    plain, _ = load_base(str(tiny_model_dir), device="cpu", cache_dir=tmp_path)
    model, _ = load_base(str(tiny_model_dir), device="cpu", cache_dir=tmp_path / "other", quantize="nf4")
    assert base_facts(model).fingerprint == base_facts(plain).fingerprint
    assert base_facts(model).quantization == "nf4" and base_facts(plain).quantization is None
    assert type(model.model.layers[0].self_attn.q_proj) is NF4Linear and type(model.lm_head) is nn.Linear
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.float32  # the checkpoint's dtype
    with pytest.raises(BaseModelError, match=r"unknown quantize 'int4'; valid: None, 'nf4'"):
        load_base(str(tiny_model_dir), device="cpu", cache_dir=tmp_path, quantize="int4")


def test_load_base_nf4_refuses_a_model_without_linear_layers(tmp_path) -> None:
    from peftkit.base import load_base

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")  # GPT-2's layers are transformers' Conv1D
    char_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(BaseModelError, match="found no nn.Linear layers"):
        load_base(str(tmp_path / "gpt2"), device="cpu", cache_dir=tmp_path / "cache", quantize="nf4")
