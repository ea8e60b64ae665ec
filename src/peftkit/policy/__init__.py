"""Policy over the registry: what must be true before a version moves, run above the registry (which
only stores and checks results) and above evaluation (which it runs). Gated promotion today."""

from .promotion import pass_gate, promote, run_gate

__all__ = ["pass_gate", "promote", "run_gate"]
