"""What a base layer is, and its weight: the two questions every method asks of the layers it wraps.

A base layer need not hold a dense float matrix: a 4-bit layer (`peftkit.base.nf4.NF4Linear`) keeps
packed codes and offers `dequantized_weight()`. Every method reads weights through `dense_weight`,
so a quantized layer is one more layer type, not a special case in each method.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

LINEAR_TYPES = ("linear", "conv1d_gpt2")
ALL_LINEAR = "all-linear"
"""The target spec for every linear layer except the model's output head (HF PEFT's spelling)."""


# Names of the attributes our wrappers use for what they wrap (PEFT's names, so bias keys line up).
WRAPPED_ATTRS = ("base_layer", "original_module")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside an adapter wrapper (or the module itself)."""
    while getattr(module, "is_adapter_wrapper", False):
        module = next(module._modules[a] for a in WRAPPED_ATTRS if a in module._modules)
    return module


def layer_type(module: nn.Module) -> str | None:
    """The type name of a layer methods can wrap: "linear", "conv1d_gpt2" (transformers' GPT-2
    `Conv1D`, weight stored (in, out)), "embedding", "conv1d"/"conv2d"/"conv3d"; None otherwise."""
    if isinstance(module, nn.Linear) or getattr(module, "is_quantized", False):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    for nd, cls in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        if isinstance(module, cls):
            return f"conv{nd}d"
    # transformers' GPT-2 style Conv1D, matched by name so transformers stays an optional import here.
    if (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
    ):
        return "conv1d_gpt2"
    return None


def is_linear(module: nn.Module) -> bool:
    """A linear layer ("all-linear" targets these): nn.Linear, a quantized linear, GPT-2's Conv1D."""
    return layer_type(module) in LINEAR_TYPES


def is_quantized(module: nn.Module) -> bool:
    return bool(getattr(module, "is_quantized", False))


def dense_weight(module: nn.Module) -> Tensor:
    """The layer's weight as a dense float tensor in its native layout: the parameter itself, or, for a
    quantized layer, its weight dequantized (a new tensor each call; nothing weight-sized is kept)."""
    dequantize = getattr(module, "dequantized_weight", None)
    return dequantize() if callable(dequantize) else module.weight


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of `dense_weight(module)`, without dequantizing anything."""
    if is_quantized(module):
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def weight_device(module: nn.Module):  # noqa: ANN201 (torch.device)
    return next(t for t in (*module.parameters(), *module.buffers())).device


def float_dtype(module: nn.Module):  # noqa: ANN201 (torch.dtype)
    """The dtype the layer computes in: its weight's, or a quantized layer's compute dtype."""
    if is_quantized(module):
        return module.compute_dtype
    return module.weight.dtype


def dense_copy(module: nn.Module) -> nn.Module:
    """A quantized layer as a plain float layer holding its dequantized weight; others as they are."""
    return module.to_linear() if is_quantized(module) else module


def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized layer of `model` by a plain float layer holding its dequantized weight,
    in place; return how many. The model then saves and loads as an ordinary checkpoint."""
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, dense_copy(getattr(holder, child)))
    from ..base.facts import base_facts

    base_facts(model).quantization = None
    return len(names)


@contextmanager
def fast_decoding(model: nn.Module) -> Iterator[None]:
    """Within the block, quantized layers keep a fast path for forwards without gradients (generation:
    an inference kernel or one dequantized weight) instead of dequantizing at every step."""
    layers = [m for m in model.modules() if is_quantized(m)]
    for m in layers:
        m.hold_for_inference(True)
    try:
        yield
    finally:
        for m in layers:
            m.hold_for_inference(False)
