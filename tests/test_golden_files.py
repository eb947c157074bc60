"""Every family's files are what they were before issue 23's model changes (issue 23.6).

`golden_files.record` writes, for a tiny model of each model type with deterministic
quarter-valued weights and LoRA factors, the base checkpoint, a PEFT adapter, a lora_jax adapter
and a merged checkpoint; ``tests/data/golden_files.json`` holds the same record made by the code
of commit 4a65530 (olmo2 and gpt_oss: of the commits that added them). Safetensors files must be
byte-identical (SHA-256), JSON files equal (library versions aside).
"""

import json
import os

import pytest

import golden_files

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_files.json")


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN) as f:
        return json.load(f)


def test_the_golden_record_covers_every_supported_model_type(golden):
    import lora_jax.models as M

    types = {golden_files.CONFIGS[n][0]["model_type"] for n in golden}
    assert types == set(M.SUPPORTED_MODEL_TYPES)
    assert set(golden) == set(golden_files.CONFIGS)


def test_checkpoints_adapters_and_exports_are_bit_identical(golden):
    now = golden_files.record()
    diffs = []
    for name, kinds in golden.items():
        for what, files in kinds.items():
            got = now[name][what]
            if set(got) != set(files):
                diffs.append(f"{name}/{what}: files {sorted(got)} != {sorted(files)}")
            diffs += [f"{name}/{what}/{f}" for f in files if f in got and got[f] != files[f]]
    assert not diffs, f"files differ from those written before the change: {diffs}"
    # the record sees content: merging changes the checkpoint's bytes, the adapter is not the base
    for name in now:
        assert now[name]["merged"]["model.safetensors"] != now[name]["base"]["model.safetensors"], name
