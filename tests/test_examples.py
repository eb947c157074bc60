"""The Hugging Face example runs offline end to end and shows its effect: a pretrained base, a LoRA
that lowers the held-out loss, and an exported PEFT adapter that gives the same loss reloaded."""

import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.slow
def test_hf_finetune_demo(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(EXAMPLES, "hf_finetune.py"), "--demo", "--workdir", str(tmp_path),
                        "--pretrain-steps", "150", "--steps", "40"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = p.stdout
    pre = re.search(r"pretrained 150 steps on pretrain.txt \(loss ([\d.]+) -> ([\d.]+)", out)
    assert pre and float(pre.group(2)) < float(pre.group(1)) - 1.0, out  # the base learned something
    m = re.search(r"held-out loss: base ([\d.]+) -> with the adapter ([\d.]+) .*reloaded from (\S+): ([\d.]+)", out)
    assert m, out
    base, after, adapter, reloaded = float(m.group(1)), float(m.group(2)), m.group(3), float(m.group(4))
    assert after < base - 0.5, out  # the adapter learned the new style
    assert abs(reloaded - after) < 1e-3 and os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))
    assert os.path.isfile(tmp_path / "tiny-llama" / "model.safetensors")
