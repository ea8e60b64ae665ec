"""`peftkit compare`: train an experiment's variants on the same task, data and budget, score them
side by side (task score, forgetting, cost), and write a report. See `run.compare` and docs/compare.md.

    from peftkit.compare import compare
    results = compare("examples/compare_methods.yaml", "runs/compare")
    [(r["name"], r["score"]) for r in results["rows"]]
"""

from .run import compare

__all__ = ["compare"]
