"""Test setup: 8 fake CPU devices for the sharding tests (must be set before JAX starts)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tokenized cache of every run the tests start (CLI subprocesses included) stays out of ~/.cache
os.environ.setdefault("LORA_JAX_CACHE", tempfile.mkdtemp(prefix="lora_jax-test-cache-"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
