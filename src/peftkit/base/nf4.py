"""Frozen 4-bit NormalFloat (NF4) linear layers, byte-compatible with bitsandbytes 0.50 and transformers.

Layout (that of `bitsandbytes.nn.Params4bit`, so state dicts move freely between the two): the weight,
flattened row-major, is cut into blocks of 64 values; each value becomes the index of the nearest of
16 NF4 levels after division by its block's absmax, two indices to a byte (first value in the high
nibble), stored as uint8 of shape (ceil(numel / 2), 1). With double quantization the per-block
absmax values, minus their mean (the offset), are themselves quantized to 8 bits with bitsandbytes'
dynamic map in blocks of 256, keeping one fp32 absmax per 256-block.

Two backends compute identical bytes and values: plain PyTorch, and bitsandbytes (imported lazily,
used by "auto" when installed). The plain path reproduces bitsandbytes' CPU algorithms; on CUDA
bitsandbytes runs its own kernels, which this module has not been checked against.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Backend = Literal["auto", "bnb", "torch"]
BACKEND: Backend = "auto"
"""The default backend: "auto" (bitsandbytes when importable, else plain PyTorch), "bnb" or "torch"."""

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
COMPUTE_DTYPES = (torch.bfloat16, torch.float32)
_STATE_KEY = "quant_state.bitsandbytes__nf4"
_CPU = torch.device("cpu")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) (QLoRA, arXiv:2305.14314).
_NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip


# -- constants --------------------------------------------------------------------------------------
@cache
def nf4_code(device: torch.device = _CPU) -> Tensor:
    """The 16 NF4 levels, sorted, fp32 (bitsandbytes' `quant_map`)."""
    return torch.tensor(_NF4_LEVELS, dtype=torch.float32, device=device)  # (16,)


@cache
def dynamic_code(device: torch.device = _CPU) -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), sorted, fp32: for each
    exponent e in 0..6, 2**e evenly spaced magnitudes in (0.1, 1] * 10**(e-6), both signs, plus 0
    and 1. Built with the same fp32 steps as bitsandbytes so every level is bit-identical."""
    levels: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        levels += ((10 ** (e - 6)) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()
    levels += [0.0, 1.0]
    return torch.tensor(sorted(levels), dtype=torch.float32, device=device)  # (256,)


@cache
def _nf4_bounds(device: torch.device) -> Tensor:
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2  # (15,) decision boundaries, as bitsandbytes computes them


@cache
def _byte_pairs(device: torch.device) -> Tensor:
    # Every byte's two NF4 levels (high nibble first), so unpacking is one gather per byte.
    b = torch.arange(256, device=device)
    return torch.stack((nf4_code(device)[b >> 4], nf4_code(device)[b & 15]), dim=1)  # (256, 2)


@cache
def _dynamic_lut(device: torch.device) -> Tensor:
    # bitsandbytes' CPU 8-bit quantizer does not search the map: it rounds x in [-1, 1] to one of
    # 65536 grid points and reads that point's nearest level from this table (csrc/cpu_ops.cpp).
    code = dynamic_code(device)
    mids = 0.5 * (code[:-1] + code[1:])  # (255,)
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=device)) / 65535.0  # (65536,)
    return torch.searchsorted(mids, grid).to(torch.uint8)  # count of midpoints strictly below


# -- the quantized weight ---------------------------------------------------------------------------
@dataclass
class NF4Weight:
    """A weight in bitsandbytes' NF4 layout. `absmax` is uint8 (double-quantized, with
    `nested_absmax` and `offset`) or fp32 (not); `dtype` is the dtype it was quantized from."""

    data: Tensor  # (ceil(numel / 2), 1) uint8, two codes a byte, high nibble first
    absmax: Tensor  # (ceil(numel / blocksize),) uint8, or fp32 without double quantization
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = BLOCKSIZE
    nested_absmax: Tensor | None = None  # (ceil(blocks / 256),) fp32
    offset: Tensor | None = None  # () fp32, the mean subtracted before 8-bit quantization

    @property
    def double_quantized(self) -> bool:
        return self.nested_absmax is not None

    def nbytes(self) -> int:
        """Bytes held for this weight (codes and statistics)."""
        tensors = (self.data, self.absmax, self.nested_absmax, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _resolve_backend(backend: Backend | None, device: torch.device) -> Literal["bnb", "torch"]:
    choice = BACKEND if backend is None else backend
    if choice not in ("auto", "bnb", "torch"):
        raise ValueError(f"unknown NF4 backend {choice!r}; valid: 'auto', 'bnb', 'torch'")
    if choice == "torch" or (
        choice == "auto" and (device.type not in ("cpu", "cuda") or not _bnb_verified())
    ):
        return "torch"
    if _bnb() is None:
        raise ImportError("the 'bnb' NF4 backend needs bitsandbytes: pip install 'peftkit[nf4]'")
    return "bnb"


def quantize_nf4(
    weight: Tensor,
    blocksize: int = BLOCKSIZE,
    compress_statistics: bool = True,
    backend: Backend | None = None,
) -> NF4Weight:
    """Quantize a float tensor (fp32, bf16 or fp16) to NF4, exactly as
    `bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics, quant_type="nf4")`."""
    if weight.dtype not in _DTYPE_NAMES:
        raise ValueError(f"NF4 quantizes fp32, bf16 or fp16 tensors, not {weight.dtype}")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize {blocksize} is not one bitsandbytes supports (32, 64, ..., 4096)")
    weight = weight.detach().contiguous()
    if _resolve_backend(backend, weight.device) == "bnb":
        return _quantize_bnb(weight, blocksize, compress_statistics)
    data, absmax = _quantize_4bit_torch(weight, blocksize)
    if not compress_statistics:
        return NF4Weight(data, absmax, weight.shape, weight.dtype, blocksize)
    offset = absmax.mean()  # () the same torch reduction bitsandbytes uses, so the same float
    qabsmax, nested = _quantize_8bit_torch(absmax - offset)
    return NF4Weight(data, qabsmax, weight.shape, weight.dtype, blocksize, nested, offset)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, backend: Backend | None = None) -> Tensor:
    """The dense tensor (shape `q.shape`) in `dtype` (default: `q.dtype`); each value is
    level * block absmax in fp32, rounded once to `dtype`, as bitsandbytes computes it."""
    dtype = q.dtype if dtype is None else dtype
    device = q.data.device
    # bitsandbytes 0.50's AVX-512 CPU kernel reads the wrong absmax when a row's length is not a
    # multiple of the block size (blocks then straddle rows): it indexes scales per row. The plain
    # path gives the values its CUDA and reference kernels give, so such shapes take it.
    straddles = q.shape[-1] % q.blocksize != 0 if len(q.shape) else False
    if _resolve_backend(backend, device) == "bnb" and not (device.type == "cpu" and straddles):
        return _bnb().functional.dequantize_4bit(q.data, _to_quant_state(q, dtype))
    # int32 indices and in-place scaling: 5x faster than int64 gathers and fresh products.
    absmax = q.absmax
    if q.nested_absmax is not None:
        codes = dynamic_code(device).index_select(0, q.absmax.int())  # (blocks,)
        absmax = _scale_blocks(codes, q.nested_absmax, NESTED_BLOCKSIZE).add_(q.offset)  # fp32
    values = _byte_pairs(device).index_select(0, q.data.view(-1).int()).view(-1)  # (2 * bytes,) fp32
    return _scale_blocks(values, absmax, q.blocksize)[: q.shape.numel()].view(q.shape).to(dtype)


def _scale_blocks(values: Tensor, absmax: Tensor, blocksize: int) -> Tensor:
    """values[i] * absmax[i // blocksize] in fp32, in place on the fresh `values` (any length)."""
    n, pad = values.numel(), absmax.numel() * blocksize - values.numel()
    padded = F.pad(values, (0, pad)) if pad else values  # (blocks * blocksize,)
    return padded.view(-1, blocksize).mul_(absmax.view(-1, 1)).view(-1)[:n]


def _quantize_4bit_torch(weight: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """bitsandbytes' `quantize_4bit` default kernel (the one its CPU backend runs), step for step:
    the same fp32 operations in the same order give the same bits."""
    flat = weight.reshape(-1).float()  # (n,)
    n = flat.numel()
    rem = n % blocksize
    full = flat[: n - rem].view(-1, blocksize)  # (n // blocksize, blocksize)
    absmax = full.abs().max(dim=-1)[0]  # (n // blocksize,)
    scaled = torch.clamp(full * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).view(-1)
    if rem:  # the last, partial block divides where full blocks multiply by a reciprocal
        tail_max = flat[n - rem :].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[n - rem :] / tail_max, -1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))  # the unused low nibble holds level 7 (0.0)
    q = torch.bucketize(scaled, _nf4_bounds(weight.device), out_int32=True).to(torch.uint8)  # (n',)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax  # (ceil(n / 2), 1), (blocks,)


def _quantize_8bit_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    """bitsandbytes' CPU `quantize_blockwise` (blocks of 256, dynamic map): x * (1 / block absmax),
    rounded to a 65536-point grid on [-1, 1], mapped through the grid's nearest-level table."""
    n = x.numel()
    blocks = F.pad(x, (0, -n % NESTED_BLOCKSIZE)).view(-1, NESTED_BLOCKSIZE)  # (nb, 256)
    absmax = blocks.abs().max(dim=-1)[0]  # (nb,) fp32
    inv = torch.where(absmax == 0, 0.0, 1.0 / absmax)  # an all-zero block codes as 0, as in bnb
    normed = torch.clamp(blocks * inv.view(-1, 1), -1.0, 1.0)
    grid_index = ((normed + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)  # truncation, as the C cast
    codes = _dynamic_lut(x.device)[grid_index.view(-1)[:n]]
    return torch.where(absmax.repeat_interleave(NESTED_BLOCKSIZE)[:n] == 0, 0, codes), absmax


# -- the bitsandbytes backend -----------------------------------------------------------------------
@cache
def _bnb() -> ModuleType | None:
    """bitsandbytes, imported once, quickly and quietly; None when it is not installed or fails.

    Two things make a plain `import bitsandbytes` slow and noisy on a CPU machine. Its default
    backend wraps a few fallback kernels in `torch.compile` at import, which imports dynamo and
    inductor (and would compile them on first use); and on AVX-512-BF16 CPUs it tries to fetch a
    matmul kernel from the Hugging Face hub through the `kernels` package, logging a warning when
    that is absent (and, when present, going to the network). Neither kernel is used here: NF4
    quantization and dequantization run natively or in plain PyTorch. So for the import only,
    `torch.compile` is the identity (those fallbacks then run eagerly, same arithmetic), `kernels`
    is made unimportable, and the CPU backend's logger is raised to ERROR. Measured (torch already
    imported, 2 busy cores): 2.0 s and one warning before, 0.03 s and silent after; 0.9 s -> 0.03 s
    when transformers has already imported dynamo.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    compile_fn, kernels = torch.compile, sys.modules.get("kernels", ...)
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    torch.compile = lambda model=None, **_: model if model is not None else (lambda fn: fn)  # type: ignore[assignment]
    sys.modules["kernels"] = None  # type: ignore[assignment]  # makes `from kernels import ...` fail fast
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return None
    finally:
        torch.compile = compile_fn  # type: ignore[assignment]
        if kernels is ...:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels
        log.setLevel(level)
    return bitsandbytes


def _bnb_verified() -> bool:
    # "auto" takes bitsandbytes only from 0.50 on, the line these byte-parity claims were checked
    # against; older releases lack parts of the CPU backend. backend="bnb" takes any version.
    bnb = _bnb()
    major, minor = (int(p) for p in bnb.__version__.split(".")[:2]) if bnb is not None else (0, 0)
    return (major, minor) >= (0, 50)


def _quantize_bnb(weight: Tensor, blocksize: int, compress_statistics: bool) -> NF4Weight:
    functional = _bnb().functional
    data, state = functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=compress_statistics, quant_type="nf4"
    )
    if not state.nested:
        return NF4Weight(data, state.absmax, weight.shape, weight.dtype, blocksize)
    return NF4Weight(
        data, state.absmax, weight.shape, weight.dtype, blocksize, state.state2.absmax, state.offset
    )


def _to_quant_state(q: NF4Weight, dtype: torch.dtype) -> Any:
    """A `bitsandbytes.functional.QuantState` over `q`'s tensors (no copies), decoding to `dtype`."""
    functional = _bnb().functional
    device = q.data.device
    state2 = None
    if q.double_quantized:
        state2 = functional.QuantState(
            absmax=q.nested_absmax, code=dynamic_code(device), blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
        )
    return functional.QuantState(
        absmax=q.absmax,
        shape=q.shape,
        code=nf4_code(device),
        blocksize=q.blocksize,
        quant_type="nf4",
        dtype=dtype,
        offset=q.offset,
        state2=state2,
    )


# -- the state-dict format (QuantState.as_dict(packed=True)) -----------------------------------------
def nf4_state_items(q: NF4Weight) -> dict[str, Tensor]:
    """`q` as the entries bitsandbytes and transformers save after `<layer>.weight.` (same order)."""
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": _DTYPE_NAMES[q.dtype],
        "shape": list(q.shape),
    }
    items = {"absmax": q.absmax, "quant_map": nf4_code(q.data.device).clone()}  # not the cached table
    if q.double_quantized:
        assert q.offset is not None
        items["nested_absmax"] = q.nested_absmax
        items["nested_quant_map"] = dynamic_code(q.data.device).clone()
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=q.offset.item())
    items[_STATE_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return items


def nf4_from_state_items(data: Tensor, items: dict[str, Tensor]) -> NF4Weight:
    """The NF4Weight for a packed `data` tensor and its `weight.*` entries (keys without the prefix)."""
    if _STATE_KEY not in items:
        raise ValueError(f"no '{_STATE_KEY}' entry: not an NF4 weight in bitsandbytes' format")
    meta = json.loads(bytes(items[_STATE_KEY].cpu().tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4" or not torch.equal(items["quant_map"].cpu(), nf4_code()):
        raise ValueError(f"quant_type {meta.get('quant_type')!r} with its quant_map is not NF4")
    shape, dtype = torch.Size(meta["shape"]), getattr(torch, meta["dtype"])
    if data.dtype != torch.uint8 or data.numel() != (shape.numel() + 1) // 2:
        raise ValueError(f"packed weight {tuple(data.shape)} {data.dtype} does not hold {tuple(shape)}")
    if "nested_absmax" not in items:
        return NF4Weight(data.view(-1, 1), items["absmax"].float(), shape, dtype, int(meta["blocksize"]))
    if meta["nested_blocksize"] != NESTED_BLOCKSIZE or not torch.equal(
        items["nested_quant_map"].cpu(), dynamic_code()
    ):
        raise ValueError("nested statistics are not bitsandbytes' dynamic map in blocks of 256")
    offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=data.device)
    nested = items["nested_absmax"].float()
    return NF4Weight(data.view(-1, 1), items["absmax"], shape, dtype, int(meta["blocksize"]), nested, offset)


# -- the layer --------------------------------------------------------------------------------------
class _NF4LinearFn(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward: only the packed codes,
    which the layer holds anyway, are saved, never a dense copy of W. W gets no gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: NF4Linear, bias: Tensor | None) -> Tensor:
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, layer.dequantized_weight(), bias)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.layer.dequantized_weight()  # (..., out) @ (out, in) -> (..., in)
        if ctx.has_bias and ctx.needs_input_grad[2]:  # only when someone unfroze the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (out,)
        return grad_x, None, grad_bias


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (bitsandbytes' `Linear4bit` layout).

    Buffers: `weight` (packed codes, uint8 (ceil(out * in / 2), 1): not a dense weight, use
    `dequantized_weight()`), `weight_absmax`, and with double quantization `weight_nested_absmax`
    and `weight_offset`. `bias` is a frozen parameter. Inputs are cast to `compute_dtype` (bf16 or
    fp32); outputs come back in the input's dtype. The state dict uses bitsandbytes' keys.
    """

    is_quantized = True
    quant_type = "nf4"

    def __init__(
        self,
        q: NF4Weight,
        bias: Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        backend: Backend | None = None,
    ) -> None:
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out, in) weight, got shape {tuple(q.shape)}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be torch.bfloat16 or torch.float32, not {compute_dtype}")
        self.out_features, self.in_features = q.shape
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.dense: Tensor | None = None  # inference helpers, held only while decoding (hold_for_inference)
        self.__dict__["kernel"] = None  # not a submodule: never saved, moved or cast with the layer
        self._set_weight(q)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _set_weight(self, q: NF4Weight) -> None:
        self.blocksize, self.quant_dtype = q.blocksize, q.dtype
        self.register_buffer("weight", q.data)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("weight_nested_absmax", q.nested_absmax)
        self.register_buffer("weight_offset", q.offset)

    @property
    def nf4_weight(self) -> NF4Weight:
        """The layer's quantized weight (views of its buffers)."""
        shape = torch.Size((self.out_features, self.in_features))
        return NF4Weight(
            self.weight, self.weight_absmax, shape, self.quant_dtype, self.blocksize,
            self.weight_nested_absmax, self.weight_offset,
        )  # fmt: skip

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, backend: Backend | None = None
    ) -> NF4Linear:
        """Quantize `linear`'s weight (double-quantized, blocks of 64). `compute_dtype` None means
        the weight's dtype when that is fp32 or bf16, else bf16."""
        weight = linear.weight.detach()
        if compute_dtype is None:
            compute_dtype = weight.dtype if weight.dtype in COMPUTE_DTYPES else torch.bfloat16
        return cls(quantize_nf4(weight, backend=backend), linear.bias, compute_dtype, backend)

    def dequantized_weight(self) -> Tensor:
        """The dense (out, in) weight in `compute_dtype` (a new tensor each call, no grad)."""
        return dequantize_nf4(self.nf4_weight, self.compute_dtype, self.backend)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if not torch.is_grad_enabled():
            if self.kernel is not None:
                return self.kernel(x.to(self.compute_dtype)).to(x.dtype)
            if self.dense is not None:
                return F.linear(x.to(self.compute_dtype), self.dense, bias).to(x.dtype)
        return _NF4LinearFn.apply(x.to(self.compute_dtype), self, bias).to(x.dtype)

    def hold_for_inference(self, hold: bool) -> None:
        """Prepare (or drop) a fast path for forwards without gradients, for decoding, which runs one
        token at a time: dequantizing every weight at every step costs more than the products.

        Where bitsandbytes runs on the CPU, its 4-bit inference kernel over a private copy of the codes
        (it repacks them in place, which must never reach this layer's own codes: that is the trap that
        drops training gradients); otherwise one dequantized copy. Measured on the built-in model, 24
        greedy tokens, one thread: the kernel 1.25 s (batch 1) and 1.99 s (batch 8), a dequantized copy
        1.81 s and 2.14 s, dequantizing at every step 2.16 s and 2.65 s; the bf16 model 1.51 s and 2.07 s.
        Training never takes this path (its forwards run with gradients)."""
        self.dense, self.__dict__["kernel"] = None, None
        if hold and self.weight.device.type == "cpu":  # on a GPU dequantizing is cheap; a copy is not
            self.__dict__["kernel"] = _inference_kernel(self)
            if self.kernel is None:
                self.dense = self.dequantized_weight()

    def to_linear(self) -> nn.Linear:
        """A plain, frozen nn.Linear holding the dequantized weight (in `compute_dtype`)."""
        weight = self.dequantized_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> NF4Linear:
        # model.to(torch.bfloat16) (or .half()) casts every float buffer; the fp32 statistics must
        # stay fp32 (a bf16 absmax changes every dequantized value), so they only follow the device.
        stats = {n: self._buffers[n] for n in ("weight_absmax", "weight_nested_absmax", "weight_offset")}
        super()._apply(fn, recurse)
        for name, before in stats.items():
            after = self._buffers[name]
            if before is not None and after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in nf4_state_items(self.nf4_weight).items():
            destination[f"{prefix}weight.{key}"] = value

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        needed = ["weight", f"weight.{_STATE_KEY}", "weight.absmax", "weight.quant_map"]
        needed += ["bias"] if self.bias is not None else []
        missing = [prefix + k for k in needed if k not in ours]
        missing_keys.extend(missing)
        known = set(needed) | {"weight.nested_absmax", "weight.nested_quant_map"}
        unexpected_keys.extend(prefix + k for k in ours if k not in known)
        if missing:
            return
        items = {k[len("weight.") :]: v for k, v in ours.items() if k.startswith("weight.")}
        try:
            q = nf4_from_state_items(ours["weight"], items)
        except (ValueError, KeyError, AttributeError, TypeError) as err:  # a malformed entry
            error_msgs.append(f"{prefix}weight: {err}")
            return
        if q.shape != (self.out_features, self.in_features):
            error_msgs.append(
                f"{prefix}weight: holds {tuple(q.shape)}, this layer is ({self.out_features}, {self.in_features})"
            )
            return
        device = self.weight.device
        q = NF4Weight(
            q.data.to(device), q.absmax.to(device), q.shape, q.dtype, q.blocksize,
            None if q.nested_absmax is None else q.nested_absmax.to(device),
            None if q.offset is None else q.offset.to(device),
        )  # fmt: skip
        self._set_weight(q)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(ours["bias"])


def _inference_kernel(layer: NF4Linear) -> nn.Module | None:
    """bitsandbytes' Linear4bit over a copy of `layer`'s codes, in eval mode, or None where it does not
    apply: no bitsandbytes, not on the CPU, or rows its CPU kernel misreads (see `dequantize_nf4`)."""
    bnb = _bnb()
    straddles = layer.in_features % layer.blocksize != 0  # its CPU kernels misread such rows' scales
    if bnb is None or not _bnb_verified() or layer.weight.device.type != "cpu" or straddles:
        return None
    kernel = bnb.nn.Linear4bit(
        layer.in_features, layer.out_features, bias=layer.bias is not None,
        compute_dtype=layer.compute_dtype, quant_type="nf4",
    )  # fmt: skip
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    kernel.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=kernel)
    if layer.bias is not None:
        kernel.bias = nn.Parameter(state["bias"].to(layer.compute_dtype), requires_grad=False)
    return kernel.eval()


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] = (),
    compute_dtype: torch.dtype | None = None,
    backend: Backend | None = None,
) -> int:
    """Replace every `nn.Linear` in `model` with an NF4Linear, in place; return how many.

    Kept in full precision: the output head (`model.get_output_embeddings()`, often tied to the
    input embeddings) and modules named in `skip` (a name matches itself and any name ending in
    "." + it). Only exact `nn.Linear` is swapped: subclasses such as MultiheadAttention's
    out_proj are read as plain weights by their owners.
    """
    skip = tuple(skip)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    targets = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and module is not head
        and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, NF4Linear.from_linear(getattr(parent, child), compute_dtype, backend))
    return len(targets)
