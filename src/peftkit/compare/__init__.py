"""`peftkit compare`: see the package docstring."""
