"""`peftkit tune`: see the package docstring."""
