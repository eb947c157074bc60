"""The light install: the core runs on jax, optax, numpy and safetensors alone; every optional part
names the extra that installs it. Each check runs in a fresh interpreter where the optional
distributions cannot be imported (a meta-path finder refuses them), as after ``pip install lora_jax``."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE_DEPS = {"jax", "optax", "numpy", "safetensors"}
# What `import jax` itself brings (its own dependencies), and the standard library.
CORE_IMPORTS = CORE_DEPS | {"ml_dtypes"}
OPTIONAL = ["flax", "orbax", "transformers", "tokenizers", "jinja2", "yaml", "pyarrow", "matplotlib", "tqdm",
            "huggingface_hub", "torch", "peft", "sklearn", "datasets", "equinox", "hypothesis"]

BLOCK = textwrap.dedent(f"""
    import sys
    BLOCKED = set({OPTIONAL!r})
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: light install)", name=name)
            return None
    sys.meta_path.insert(0, Refuse())
""")


def _light(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def test_core_works_without_any_extra(tmp_path):
    r = _light(f"""
        import jax, jax.numpy as jnp, optax, numpy as np
        import lora_jax as lora
        params = {{"dense": {{"kernel": jnp.arange(12.0).reshape(4, 3) / 10}}}}
        lp = lora.init(params, lora.Rules(rank=2, targets=r"kernel"), jax.random.key(0))
        lp = jax.tree.map(lambda x: x + 0.5, lp)       # non-zero B: the adapter changes the output
        f = lambda p, x: x @ p["dense"]["kernel"]
        x = jnp.ones((2, 4))
        y = lora.wrap(f)(lp, x)
        merged = lora.merge(lp)
        np.testing.assert_allclose(y, f(merged, x), rtol=1e-6)
        tx = lora.freeze(optax.adam(1e-3), lp)
        tx.init(lp)
        lora.save_adapter({str(tmp_path / 'a')!r}, lp)
        back = lora.load_adapter({str(tmp_path / 'a')!r}, jax.tree.map(lambda x: x + 0.5, params))
        np.testing.assert_allclose(lora.wrap(f)(back, x), y, rtol=1e-6)
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        print("ok", leaked)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok []"


@pytest.mark.parametrize("module,extra", [("lora_jax.models", "hf"), ("lora_jax.hf", "hf"),
                                          ("lora_jax.train", "train"), ("lora_jax.train.pipeline", "train")])
def test_optional_part_names_its_extra(module, extra):
    r = _light(f"""
        try:
            import {module}
        except ModuleNotFoundError as e:
            print(type(e).__name__, e)
        else:
            print("imported")
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ModuleNotFoundError "), r.stdout
    assert f"pip install 'lora_jax[{extra}]'" in r.stdout, r.stdout


def test_cli_without_train_extra_is_one_line(tmp_path):
    r = _light(f"""
        from lora_jax.cli import main
        print("rc", main(["train", "train.steps=1", "out_dir={tmp_path / 'run'}"]))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "rc 2"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "lora_jax[train]" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def _top_level_imports(path: pathlib.Path) -> set[str]:
    """Third-party top-level packages a module imports when it is imported (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "lora_jax"}


def test_core_modules_import_only_core_dependencies():
    core = [p for p in (ROOT / "lora_jax").glob("*.py") if p.name not in ("demo.py",)]
    core += list((ROOT / "lora_jax" / "io").glob("*.py"))
    extra = {p.name: _top_level_imports(p) - CORE_IMPORTS for p in core}
    assert {k: v for k, v in extra.items() if v} == {}


def test_pyproject_core_and_extras_agree_with_the_check():
    from lora_jax._lazy import EXTRAS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        out = set()
        for r in reqs:
            name = r.split(";")[0].split("[")[0]
            for op in "<>=!~ ":
                name = name.split(op)[0]
            out.add(name.strip().lower())
        return out

    assert names(project["dependencies"]) == CORE_DEPS
    extras = project["optional-dependencies"]
    dist = {"yaml": "pyyaml", "orbax.checkpoint": "orbax-checkpoint"}
    for extra, modules in EXTRAS.items():
        declared = names(extras[extra]) | set().union(*(names(extras[e[len("lora_jax["):-1]])
                                                         for e in extras[extra] if e.startswith("lora_jax[")))
        assert {dist.get(m, m) for m in modules} <= declared, extra
    assert names(extras["all"]) == {"lora_jax"} and "hf,train" in extras["all"][0]
