"""What loads when: lazy package exports and the optional parts' dependency check.

A package's public names load with their module on first use, so ``import lora_jax`` (and a
worker importing one light submodule such as `lora_jax.train.records`) does not import JAX,
transformers or the trainer. The core needs only jax, optax, numpy and safetensors; the Hugging
Face models and the trainer are extras (``pip install 'lora_jax[hf]'``, ``'lora_jax[train]'``), and
`require` turns a missing one into an error that names the extra to install.

Example:
  >>> import lora_jax
  >>> callable(lora_jax.init)   # lora_jax.tree (and JAX) load here
  True
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Mapping

#: The distributions each extra of pyproject.toml adds, by the module that imports them.
EXTRAS = {
    "hf": ("flax",),
    "train": ("flax", "orbax.checkpoint", "transformers", "tokenizers", "jinja2", "yaml", "pyarrow", "matplotlib",
              "tqdm"),
}


def require(part: str, extra: str) -> None:
    """Raise ModuleNotFoundError naming ``extra`` when a module it installs is missing.

    Called at the top of an optional part (``lora_jax.models``, ``lora_jax.hf``, ``lora_jax.train``)
    so that a light install fails on import with the command that fixes it, not deep inside a run.

    Example:
      >>> require("lora_jax.models", "hf")   # flax is installed here: nothing happens
    """
    missing = []
    for name in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(f"{part} needs {', '.join(missing)}, which the light install of lora_jax leaves "
                                  f"out: pip install 'lora_jax[{extra}]'", name=missing[0])


def exports(package: str, where: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose name ``n`` lives in submodule ``where[n]``.

    A name not in ``where`` that is a submodule of ``package`` is imported as one (``lora.tree``
    works as it did when the package imported everything); anything else is an AttributeError.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        mod = where.get(name)
        if mod is None:
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{package}.{mod}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
