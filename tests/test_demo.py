"""The main job (the seed's digits experiment) does what its table claims."""

import numpy as np

from lora_jax import demo


def test_digits_demo(tmp_path, capsys):
    out = demo.main(["--out", str(tmp_path), "--base-steps", "300"])
    text = capsys.readouterr().out
    assert "digit   base   +LoRA   LoRA off" in text and "trainable%" in text
    # the base is poor at 9 (held out), the adapter trained on 9s only fixes much of that
    assert out["base_acc"][9] < 0.7 and out["tuned_acc"][9] > out["base_acc"][9] + 0.2
    # with the adapter disabled the base predictions come back exactly
    assert out["off_equals_base"] and np.array_equal(out["off_acc"], out["base_acc"])
    # the saved adapter reloads and its merge matches the factorized model
    assert out["merged_vs_wrapped"] < 1e-4
    assert (tmp_path / "adapter" / "adapter.safetensors").exists()
    assert 0 < out["trainable_percent"] < 2
