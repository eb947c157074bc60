"""The seed experiment: LoRA-fine-tune a digits MLP on 9s only, toggle the adapter off, merge it.

The whole experiment is `lora_jax/demo.py` (also `lora-jax demo` and `make demo`); this script
runs it with the command line's options, e.g. ``python examples/digits.py --rank 2 --lora-steps 50``.
Read `lora_jax/demo.py` for the code: every LoRA step there is one lora_jax call
(``lora.init``, ``lora.split``/``lora.freeze``, ``lora.wrap``, ``lora.save_adapter``, ``lora.merge``).
"""

import sys

from lora_jax.demo import main

if __name__ == "__main__":
    main(sys.argv[1:])
