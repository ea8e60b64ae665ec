"""Everything a run needs before its first step: seeds, base model, data, adapter."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import peftkit.train.distributed as distributed

from ..base import load_base, save_model_dir
from ..base.facts import base_facts
from ..base.precision import resolve_precision
from ..core.adapted import AdaptedModel
from ..data.encode import IGNORE_INDEX, Encoded, encode_all
from ..data.example import Example
from ..data.files import dataset_hash, split_examples
from ..data.source import load_data
from ..errors import DataError
from ..io import building_dir
from .checkpoint import Position
from .config import TrainConfig, save_config
from .fused import fuse_for_training
from .optim import Trainable
from .run_dir import run_dir


@dataclass
class Prepared:
    """A run ready to train: the model, the encoded data and where things go."""

    config: TrainConfig
    dist: distributed.Dist
    out: Path
    model: nn.Module  # the transformers model (with adapter layers inside for an adapter method)
    tokenizer: Any
    net: nn.Module  # what trains: the AdaptedModel, or the model itself for full fine-tuning
    is_adapter: bool  # an adapter method (not full fine-tuning)
    train_set: list[Encoded]
    val_set: list[Encoded]
    label_counts: list[int]  # labelled (predicted) tokens per training example
    pad_id: int
    total_steps: int
    steps_per_epoch: int
    precision: str
    backbone: nn.Module | None  # the fused loss path: hidden states from here, head applied by train.loss
    head: nn.Module | None
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def best_dir(self) -> Path:
        """Where the weights with the lowest validation loss go."""
        return self.out / ("adapter-best" if self.is_adapter else "model-best")

    @property
    def last_dir(self) -> Path:
        """Where the weights at the end of the run (or at Ctrl-C) go."""
        return self.out / ("adapter-last" if self.is_adapter else "model-last")

    def save_weights(self, path: Path, pos: Position, trainable: Trainable) -> None:
        """Save the adapter (or, for full fine-tuning, the model) in full precision (the fp32
        masters), with the resolved config and the lineage facts beside it: the whole directory
        replaces the old one in one step, so it never mixes two saves."""
        facts = {**self.lineage, **pos.extra, "step": pos.step}
        with building_dir(path, if_exists="replace") as tmp, trainable.masters_in_model():
            if self.is_adapter:
                self.net.save_adapter(tmp, dataset_hash=facts["dataset_hash"], training=facts)
            else:
                save_model_dir(self.model, self.tokenizer, tmp, overwrite=True)
            save_config(self.config, tmp / "training_config.yaml")
            (tmp / "training.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")


def prepare(config: TrainConfig, d: distributed.Dist) -> Prepared:
    """Seed, load the data (first: a bad file fails fast), load the base model, encode the data,
    attach the adapter."""
    seed_everything(config.seed)
    train_ex, val_ex = _examples(config)
    precision = resolve_precision(config.precision, d.device)
    model, tokenizer = load_base(
        config.base,
        dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        device=d.device,
        **({"quantize": config.quantize} if config.quantize else {}),
    )
    kwargs = {"max_length": config.max_length, "train_on": config.train_on, "truncation": config.truncation}
    train_set, stats = encode_all(train_ex, tokenizer, **kwargs)
    val_set = encode_all(val_ex, tokenizer, **kwargs)[0] if val_ex else []  # none: val_fraction 0, tiny data
    label_counts = [sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in train_set]
    if not sum(label_counts):
        raise DataError(
            f"{config.data}: no training example has a token to learn (check train_on and max_length)"
        )

    fuse_for_training(model)  # leaner RMSNorm / SwiGLU autograd; outputs unchanged
    is_adapter = config.adapter() is not None
    if is_adapter:
        net: nn.Module = AdaptedModel.attach(model, config.adapter(), name="default")
    else:
        net = model.requires_grad_(True)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    backbone, head = fused_parts(model)

    per_step = config.batch_size * d.world
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / per_step) / config.grad_accum)
    total = config.max_steps or config.epochs * steps_per_epoch
    out = run_dir(config)
    fingerprint = net.base_fingerprint() if is_adapter else (base_facts(model).fingerprint or "")
    lineage = {
        "base": config.base,
        "base_fingerprint": fingerprint,
        "dataset": config.data,
        "dataset_hash": dataset_hash(train_ex),
        "val_dataset_hash": dataset_hash(val_ex) if val_ex else "",
        "train_examples": len(train_set),
        "val_examples": len(val_set),
        "encode_stats": vars(stats) if hasattr(stats, "__dict__") else dict(stats),
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Prepared(
        config, d, out, model, tokenizer, net, is_adapter, train_set, val_set, label_counts, pad_id,
        total, steps_per_epoch, precision, backbone, head, lineage,
    )  # fmt: skip


def _examples(config: TrainConfig) -> tuple[list[Example], list[Example]]:
    train = load_data(config.data, split="train")
    if config.val_data:
        val = load_data(config.val_data, split="test")
    else:
        train, val = split_examples(train, config.val_fraction, seed=config.seed)
    if config.max_examples is not None:
        train = train[: config.max_examples]
    if config.system:
        train, val = (
            [e.with_system(config.system) for e in train],
            [e.with_system(config.system) for e in val],
        )
    if not train:
        raise DataError(f"{config.data}: no training examples")
    return train, val


def fused_parts(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(backbone, head) when the model's logits are just head(backbone(x)), which lets the loss skip
    unlabelled positions; (None, None) sends training through the model's own forward instead."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    scaled = any(
        getattr(config, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale")
    )
    if head is None or backbone is None or backbone is model or scaled:
        return None, None
    return backbone, head


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
