"""Lazy package exports: a package's public names load with their module on first use, so
``import lora_jax`` (and a worker importing one light submodule such as
`lora_jax.train.records`) does not import JAX, transformers or the trainer.

Example:
  >>> import lora_jax
  >>> callable(lora_jax.init)   # lora_jax.tree (and JAX) load here
  True
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping


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
