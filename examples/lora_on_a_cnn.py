"""LoRA on a small CNN: peftkit adapts any PyTorch model, not only transformers.

A frozen, randomly initialised convolutional network gets two LoRA adapters (on its Conv2d, Conv1d
and Linear layers, each with its own copy of the classification head via modules_to_save), trained
for two different synthetic tasks. Then: switch between them, run one mixed batch where each row
uses its own adapter, merge one into the weights, save and reload. Runs in a few seconds on a CPU.

    python examples/lora_on_a_cnn.py [--steps 150]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from torch import nn

from peftkit import AdaptedModel, LoraConfig


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.mix = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 8, 8) -> (N, classes)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))  # (N, 16, 4, 4)
        x = torch.relu(self.mix(x.flatten(2)))  # (N, 16, 16)
        return self.head(torch.relu(self.fc(x.mean(-1))))


def brightest_quadrant(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Task A: which quadrant of the image is brightest (4 classes)."""
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.5
    y = torch.randint(0, 4, (n,), generator=g)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 0.5
    return x, y


def dominant_channel(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Task B: which colour channel dominates (3 classes, label 3 never used)."""
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.5
    y = torch.randint(0, 3, (n,), generator=g)
    x[torch.arange(n), y] += 0.4
    return x, y


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def train(am: AdaptedModel, name: str, task, steps: int, g: torch.Generator) -> None:
    am.set_adapter(name)
    params = [p for p in am.adapter_state_dict(name).values()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    am.train()
    for _ in range(steps):
        x, y = task(64, g)
        loss = nn.functional.cross_entropy(am(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    am.eval()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    model = SmallCNN().eval()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["conv1", "conv2", "mix", "fc"], modules_to_save=["head"]
    )
    am = AdaptedModel.attach(model, config, name="quadrant")
    am.add_adapter("channel", config.replace(use_dora=True))
    trainable, total = am.trainable_parameters()
    print(f"two adapters on {type(model).__name__}: {trainable:,} trainable of {total:,} parameters")

    train(am, "quadrant", brightest_quadrant, args.steps, g)
    train(am, "channel", dominant_channel, args.steps, g)

    xa, ya = brightest_quadrant(512, g)
    xb, yb = dominant_channel(512, g)
    checks: list[tuple[str, bool]] = []
    with torch.no_grad():
        with am.disable_adapters():
            base_a, base_b = accuracy(am(xa), ya), accuracy(am(xb), yb)
        am.set_adapter("quadrant")
        acc_a = accuracy(am(xa), ya)
        am.set_adapter("channel")
        acc_b = accuracy(am(xb), yb)
        print(f"task A (brightest quadrant): base {base_a:.0%} -> adapter 'quadrant' {acc_a:.0%}")
        print(f"task B (dominant channel):   base {base_b:.0%} -> adapter 'channel' {acc_b:.0%}")
        checks.append(("each adapter learns its task", acc_a > base_a + 0.3 and acc_b > base_b + 0.3))

        # One batch, each row with its own adapter: task-A rows use 'quadrant', task-B rows 'channel'.
        x = torch.cat([xa[:256], xb[:256]])
        mixed = am(x, adapter_names=["quadrant"] * 256 + ["channel"] * 256)
        mixed_a, mixed_b = accuracy(mixed[:256], ya[:256]), accuracy(mixed[256:], yb[:256])
        print(f"one mixed batch: task A rows {mixed_a:.0%}, task B rows {mixed_b:.0%}")
        am.set_adapter("quadrant")
        alone = am(xa[:256])
        checks.append(("mixed rows equal single-adapter runs", torch.allclose(mixed[:256], alone, atol=1e-5)))

        am.merge()
        merged = am(xa[:256])
        am.unmerge()
        checks.append(("merged equals unmerged", torch.allclose(merged, alone, atol=1e-5)))

        with tempfile.TemporaryDirectory() as d:
            am.save_adapter(d, "channel")
            reloaded = AdaptedModel(_same_base(am)).eval()
            reloaded.load_adapter(d, "channel")
            am.set_adapter("channel")
            checks.append(("save -> load gives the same outputs", torch.equal(reloaded(xb), am(xb))))
    for what, ok in checks:
        print(f"[{'ok' if ok else 'FAILED'}] {what}")
    return 0 if all(ok for _, ok in checks) else 1


def _same_base(am: AdaptedModel) -> nn.Module:
    """A fresh SmallCNN holding the same (frozen) base weights as `am`."""
    plain = SmallCNN().eval()
    plain.load_state_dict(dict(am.base_tensors()))
    return plain


if __name__ == "__main__":
    sys.exit(main())
