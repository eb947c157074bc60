"""The public line: every exported name resolves, and importing the package is light."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("package", ["lora_jax", "lora_jax.train", "lora_jax.hf", "lora_jax.io"])
def test_every_exported_name_resolves(package):
    import importlib

    mod = importlib.import_module(package)
    assert mod.__all__ and len(set(mod.__all__)) == len(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
        assert name in dir(mod)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        mod.not_a_name


def test_import_is_light_and_submodules_still_resolve():
    """`import lora_jax` and the tokenizing workers' modules load neither JAX nor transformers (a
    spawned worker starts in a fraction of a second); `lora.tree` still works as an attribute."""
    code = ("import sys, json, lora_jax, lora_jax.train.tokcache, lora_jax.train.records, lora_jax.train.readers\n"
            "heavy = sorted(m for m in ('jax', 'transformers', 'flax', 'optax', 'torch') if m in sys.modules)\n"
            "import lora_jax as lora\n"
            "print(json.dumps([heavy, lora.tree.__name__, lora.init.__module__, 'jax' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    heavy, tree, init_mod, jax_now = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == [] and tree == "lora_jax.tree" and init_mod == "lora_jax.tree" and jax_now
