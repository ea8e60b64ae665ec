"""The adapter registry: immutable, content-addressed versions of named adapters (see `store.py`)."""

from .refs import STAGES, Ref, parse_ref
from .store import Registry
from .versions import Version

__all__ = ["STAGES", "Ref", "Registry", "Version", "parse_ref"]
