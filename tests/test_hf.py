"""lora_jax.hf against the real clients: PyTorch transformers 5 and PEFT on the same weights.

Every family of `lora_jax.models` is covered by the same four checks, each from a tiny random
PyTorch model (hidden 32, 2 layers, vocab 97; weights spread to std 0.2, norms 1 +- 0.2, so the
outputs are O(1)) saved with ``save_pretrained`` and read back through the real file formats
(nothing is downloaded):

(a) `hf.from_pretrained` gives PyTorch's logits (right- and left-padded rows included);
(b) a PEFT adapter made in PyTorch (``target_modules="all-linear"``, rsLoRA, a ``rank_pattern``
    with a per-layer key and an ``alpha_pattern``, random A and B) loads with `hf.load_peft` and
    gives, through ``lora.wrap``, PeftModel's logits;
(c) an adapter written by `hf.save_peft` loads in ``PeftModel.from_pretrained`` with lora_jax's
    logits (and back into lora_jax exactly), and `hf.save_merged` loads in transformers with the
    merged logits;
(d) greedy `lora_jax.models.generate` equals transformers' ``generate`` (decoders);
(e) the checkpoint table is PyTorch's state dict and our parameter tree, with `init_params`'
    shapes, and saving gives back exactly the tensors ``save_pretrained`` wrote.

This is the conformance suite every model type runs (SPECS: each supported ``model_type`` at
least once, its notable configurations as further cases); the per-family test files keep only
what is particular to a family (config parsing and refusals, rope variants, fused kernels,
expert layouts on disk).

The rest are the edge cases: strict loading, sharded and corrupt files, refusals, DoRA, biases and
``modules_to_save``, several adapters in one tree. Outputs are compared in float32 with rtol=atol=1e-5
on the real (unpadded) tokens; each reference is checked to be far from trivial.
"""

import dataclasses
import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file

import lora_jax as lora
import lora_jax.hf as hf
from lora_jax.models import family as fam
from lora_jax.models.generate import generate
from lora_jax.tree import lora_items

TOL = dict(rtol=1e-5, atol=1e-5)
V = 97

# one full row, one right-padded, one left-padded
IDS = np.random.RandomState(0).randint(3, V, (3, 11))
MASK = np.ones_like(IDS)
MASK[1, 8:] = 0
MASK[2, :4] = 0
DEC_POS = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)  # positions count real tokens (left padding)
ENC_POS = np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape).copy()  # BERT: absolute positions
PROMPT = IDS[:, :6].copy()
PROMPT_MASK = np.ones_like(PROMPT)
PROMPT_MASK[2, :2] = 0

S, F = "sliding_attention", "full_attention"
_DEC = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_GEMMA = dict(_DEC, head_dim=8, sliding_window=4, query_pre_attn_scalar=8)
_BERT = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, vocab_size=V,
             max_position_embeddings=64, num_labels=3)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One family case: the PyTorch model and the names its adapters are patterned on."""

    config: str  # transformers config class
    cls: str  # transformers model class
    kwargs: dict
    head: str  # lora_jax head: causal_lm, seq_cls, base
    layer_key: str  # PEFT module name of one layer's projection (a per-layer rank_pattern key)
    mlp: str  # a short MLP module name (rank_pattern)
    attn: str  # a short attention module name (alpha_pattern)
    gemma_norms: bool = False  # norms store w of (1 + w)

    @property
    def decoder(self):
        return self.head == "causal_lm"

    @property
    def task_type(self):
        return {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "base": "FEATURE_EXTRACTION"}[self.head]

    @property
    def positions(self):
        return DEC_POS if self.decoder else ENC_POS


_LLAMA_NAMES = ("model.layers.1.self_attn.q_proj", "down_proj", "q_proj")
_MOE_NAMES = ("model.layers.1.self_attn.q_proj", "o_proj", "q_proj")
_GPT2 = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64, bos_token_id=1, eos_token_id=2)
SPECS = {
    "llama": Spec("LlamaConfig", "LlamaForCausalLM", _DEC, "causal_lm", *_LLAMA_NAMES),
    # Llama 3.x: tied embeddings, rope_theta 500000, llama3 rope scaling, a list of eos ids
    "llama3_tied": Spec("LlamaConfig", "LlamaForCausalLM",
                        dict(_DEC, tie_word_embeddings=True, rope_parameters=_LLAMA3_ROPE, eos_token_id=[2, 5]),
                        "causal_lm", *_LLAMA_NAMES),
    # biases on attention and MLP, linear rope scaling
    "llama_bias_linear": Spec("LlamaConfig", "LlamaForCausalLM",
                              dict(_DEC, attention_bias=True, mlp_bias=True,
                                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
                              "causal_lm", *_LLAMA_NAMES),
    "mistral": Spec("MistralConfig", "MistralForCausalLM", dict(_DEC, sliding_window=6), "causal_lm", *_LLAMA_NAMES),
    "qwen2": Spec("Qwen2Config", "Qwen2ForCausalLM", _DEC, "causal_lm", *_LLAMA_NAMES),
    "qwen3": Spec("Qwen3Config", "Qwen3ForCausalLM", dict(_DEC, head_dim=8), "causal_lm", *_LLAMA_NAMES),
    "olmo2": Spec("Olmo2Config", "Olmo2ForCausalLM", dict(_DEC, attention_bias=True), "causal_lm", *_LLAMA_NAMES),
    "gemma2": Spec("Gemma2Config", "Gemma2ForCausalLM",
                   dict(_GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0), "causal_lm",
                   *_LLAMA_NAMES, gemma_norms=True),
    "gemma3_text": Spec("Gemma3TextConfig", "Gemma3ForCausalLM",
                        dict(_GEMMA, layer_types=[S, F], attention_bias=True, tie_word_embeddings=False,
                             final_logit_softcapping=5.0), "causal_lm", *_LLAMA_NAMES, gemma_norms=True),
    "phi3": Spec("Phi3Config", "Phi3ForCausalLM", _DEC, "causal_lm", "model.layers.1.self_attn.qkv_proj",
                 "gate_up_proj", "qkv_proj"),
    # Phi-4-mini's shape: partial rotary, tied embeddings, a sliding window
    "phi3_partial_tied": Spec("Phi3Config", "Phi3ForCausalLM",
                              dict(_DEC, partial_rotary_factor=0.5, tie_word_embeddings=True, sliding_window=5,
                                   rope_theta=250000.0), "causal_lm", "model.layers.1.self_attn.qkv_proj",
                              "gate_up_proj", "qkv_proj"),
    # mixtures of experts: the experts are PEFT target_parameters (save_peft), not all-linear modules (PEFT's)
    "qwen3_moe": Spec("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(_DEC, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
                      "causal_lm", *_MOE_NAMES),
    "mixtral": Spec("MixtralConfig", "MixtralForCausalLM", dict(_DEC, num_local_experts=4, num_experts_per_tok=2,
                                                                sliding_window=6), "causal_lm", *_MOE_NAMES),
    "gpt_oss": Spec("GptOssConfig", "GptOssForCausalLM",
                    dict(_DEC, head_dim=8, num_local_experts=4, num_experts_per_tok=2, intermediate_size=16,
                         sliding_window=4, swiglu_limit=0.5), "causal_lm", *_MOE_NAMES),
    "gpt2": Spec("GPT2Config", "GPT2LMHeadModel", _GPT2, "causal_lm", "transformer.h.1.attn.c_attn", "c_fc", "c_attn"),
    # per-layer 1/(i+1) scaling (a scanned input), the reordered float32 path, another MLP width and activation
    "gpt2_layer_scaled": Spec("GPT2Config", "GPT2LMHeadModel",
                              dict(_GPT2, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, n_inner=48,
                                   activation_function="gelu"), "causal_lm", "transformer.h.1.attn.c_attn", "c_fc",
                              "c_attn"),
    "bert_cls": Spec("BertConfig", "BertForSequenceClassification", _BERT, "seq_cls",
                     "bert.encoder.layer.1.attention.self.query", "intermediate.dense", "query"),
    "bert_base": Spec("BertConfig", "BertModel", _BERT, "base", "encoder.layer.1.attention.self.query",
                      "intermediate.dense", "query"),
}
DECODERS = [n for n, s in SPECS.items() if s.decoder]


# -- PyTorch side ------------------------------------------------------------------------------

def torch_config(name, **over):
    spec = SPECS[name]
    return getattr(tf, spec.config)(**dict(spec.kwargs, **over), attn_implementation="eager")


def spread(model, seed, gemma_norms=False):
    """Weights std 0.2; norm scales 1 +- 0.2 (Gemma stores w of 1 + w: 0 +- 0.2); biases nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=g)
            is_norm = re.search(r"(norm|ln_\d|ln_f)\.weight$", name, re.IGNORECASE) and not gemma_norms
            p.copy_(noise + 1.0 if is_norm else noise)
    return model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


_SAVED = set()


def saved(root, name):
    """The checkpoint directory of ``name`` (PyTorch ``save_pretrained``, safetensors), made once."""
    d = str(root / name)
    if d not in _SAVED:
        spec = SPECS[name]
        torch.manual_seed(0)
        m = spread(getattr(tf, spec.cls)(torch_config(name)).eval(), seed=len(name), gemma_norms=spec.gemma_norms)
        m.save_pretrained(d, safe_serialization=True)
        _SAVED.add(d)
    return d


def load_torch(name, d):
    return getattr(tf, SPECS[name].cls).from_pretrained(d, attn_implementation="eager").eval()


def torch_out(name, m):
    """PyTorch's float32 output (logits; BertModel: last hidden state) on IDS/MASK."""
    spec = SPECS[name]
    with torch.no_grad():
        out = m(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                position_ids=torch.tensor(spec.positions))
    return (out.last_hidden_state if spec.head == "base" else out.logits).numpy()


# -- lora_jax side -----------------------------------------------------------------------------

_JITTED = {}


def jax_out(model, tree, name):
    """The model's output on IDS/MASK through lora.wrap (a LoRA tree runs factorized), jitted once
    per class and config."""
    key = (type(model).__name__, model.config)
    if key not in _JITTED:
        def fwd(p, ids, mask, pos):
            return model.apply({"params": p}, ids, attention_mask=mask, positions=pos)

        _JITTED[key] = jax.jit(lora.wrap(fwd))
    return np.asarray(_JITTED[key](tree, IDS, MASK, SPECS[name].positions))


def real(name, x):
    """The outputs of real tokens (padding queries are not compared); sequence outputs whole."""
    return x if SPECS[name].head == "seq_cls" else x[MASK.astype(bool)]


def assert_close(name, got, want):
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(real(name, got), real(name, want), **TOL)


def assert_differs(name, a, b, by=0.1):
    """The adapter really changes the outputs."""
    assert np.abs(real(name, a) - real(name, b)).max() > by


@functools.lru_cache(maxsize=None)
def _loaded(d):
    return hf.from_pretrained(d)


def load(root, name):
    """(model, params) of ``name`` by hf.from_pretrained (cached: params are never modified)."""
    return _loaded(saved(root, name))


def random_factors(build, tree, seed=0, scale=0.05):
    """``build(tree)`` (a `lora.init` or `lora.add`) with the new adapters' factors drawn in NumPy:
    ``a`` ~ N(0, 1/fan_in), ``b`` ~ N(0, scale) (DoRA ``m`` ~ U(0.5, 1.5)), so the adapters visibly
    change the model while it stays well conditioned (deltas a fraction of the weights). The
    structure comes from ``jax.eval_shape``: no per-shape program is compiled (op-by-op random
    initialisation costs seconds per family on CPU)."""
    shapes = jax.eval_shape(build, tree)
    rs = np.random.RandomState(seed)

    def depth(x):
        return len(x.chain()) if lora.is_lora(x) else 0

    def fill(s, x):
        if lora.is_lora(s):
            if depth(s) == depth(x):  # an adapter that was there before
                return x
            a = jnp.asarray(rs.normal(0, s.a.shape[-2] ** -0.5, s.a.shape), s.a.dtype)
            b = jnp.asarray(rs.normal(0, scale, s.b.shape), s.b.dtype)
            m = None if s.m is None else jnp.asarray(rs.uniform(0.5, 1.5, s.m.shape), s.m.dtype)
            return s.replace(w=x, a=a, b=b, m=m)
        if isinstance(s, lora.Trainable) and not isinstance(x, lora.Trainable):
            return lora.Trainable(x)
        return x

    return jax.tree_util.tree_map(fill, shapes, tree,
                                  is_leaf=lambda v: lora.is_lora(v) or isinstance(v, lora.Trainable))


def init(params, rules, seed=0):
    """`lora.init` with random factors (`random_factors`)."""
    return random_factors(lambda p: lora.init(p, rules, 0), params, seed=seed)


def module_names(model, tree):
    """The PEFT module names of the adapted layers of a LoRA tree (a stacked weight: one per layer)."""
    table = {lf.path: lf for lf in fam.leaves_of(model)}
    out = set()
    for p, lw in lora_items(tree):
        lf = table[p]
        if not lf.layered:
            out.add(lf.module())
            continue
        mask = lw.layer_mask or (True,) * model.config.num_hidden_layers
        out |= {lf.module(i) for i, on in enumerate(mask) if on}
    return out


# -- (a) from_pretrained -------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SPECS))
def test_from_pretrained_matches_pytorch(root, name):
    d = saved(root, name)
    model, params = load(root, name)
    assert fam.torch_class(model) == SPECS[name].cls
    want = torch_out(name, load_torch(name, d))
    assert np.abs(real(name, want)).max() > 0.5  # a real signal, not near-zero outputs
    got = jax_out(model, params, name)
    assert_close(name, got, want)
    # per-layer kernels are stacked on a leading layer axis, (L, in, out)
    stacked = [lf for lf in fam.leaves_of(model) if lf.layered and lf.path.endswith("/kernel")]
    flat = {"/".join(str(k.key) for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert stacked and all(flat[lf.path].shape == (2,) + lf.shape for lf in stacked)


# -- (b) PEFT trained in PyTorch -> lora_jax -------------------------------------------------------

def perturb(pm):
    """Make PEFT's modules_to_save copies (a SEQ_CLS classifier), DoRA magnitudes and trainable
    biases (``bias="all"``/``"lora_only"``) look trained,
    and shrink the random B factors (``init_lora_weights=False`` draws them like a Linear's weight,
    std ~0.3 at rank 4) so the adapted model stays as well conditioned as the base one: float32
    noise would otherwise be amplified past 1e-5 (in PyTorch as much as in JAX)."""
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n or "lora_magnitude_vector" in n:
                p.mul_(1.5).add_(0.1)
            elif n.endswith("bias") and p.requires_grad:
                p.add_(0.1)
            elif "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(0.2)


def make_peft_adapter(name, base_dir, out_dir, seed=1, **config):
    """A PEFT adapter with random A and B saved by PeftModel.save_pretrained; returns its outputs."""
    torch.manual_seed(seed)
    pm = get_peft_model(load_torch(name, base_dir), LoraConfig(init_lora_weights=False, **config)).eval()
    perturb(pm)
    pm.save_pretrained(out_dir)
    return torch_out(name, pm)


@pytest.mark.parametrize("name", list(SPECS))
def test_load_peft_all_linear_matches_peft(root, tmp_path, name):
    spec = SPECS[name]
    d = saved(root, name)
    want = make_peft_adapter(name, d, tmp_path / "ad", r=4, lora_alpha=8, target_modules="all-linear",
                             use_rslora=True, rank_pattern={spec.layer_key: 6, spec.mlp: 2},
                             alpha_pattern={spec.attn: 12}, task_type=spec.task_type)
    model, params = load(root, name)
    base = jax_out(model, params, name)
    assert_differs(name, want, base)
    before = jax.tree_util.tree_map(np.array, params)
    tree = hf.load_peft(tmp_path / "ad", params, model)
    assert_close(name, jax_out(model, tree, name), want)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, params)  # params untouched
    # exactly the modules PEFT adapted, each layer's rank and alpha kept
    # (PEFT's all-linear on a mixture of experts adds the experts and the router as target_parameters)
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert module_names(model, tree) == {re.sub(r"(\.base_layer)*\.lora_[AB]\.weight$", "", k)[len("base_model.model."):]
                                         for k in keys if ".lora_A." in k or ".lora_B." in k}
    items = dict(lora_items(tree))
    table = {lf.path: lf for lf in fam.leaves_of(model)}
    assert all(lw.rslora and lw.layer_mask is None
               and lw.layout == "s" * (table[p].layered + len(table[p].shape) - 2) + "io" for p, lw in items.items())
    attn = next(p for p in items if p.endswith(f"/{spec.layer_key.rpartition('.')[2]}/kernel"))
    lw = items[attn]
    assert lw.rank == 6 and lw.a.shape[0] == 2  # layer 1's rank 6; layer 0's rank 4 zero-padded
    np.testing.assert_array_equal(lw.a[0, :, 4:], 0)
    np.testing.assert_array_equal(lw.b[0, 4:], 0)
    assert {items[p].rank for p in items if p.endswith(f"/{spec.mlp.replace('.', '/')}/kernel")} == {2}
    if spec.head == "seq_cls":  # PEFT's modules_to_save classifier comes back trainable, with its values
        assert isinstance(tree["classifier"]["kernel"], lora.Trainable)
    # written back by save_peft (per-layer ranks zero-padded, per-layer scales folded into b) PEFT agrees
    hf.save_peft(tmp_path / "back", tree, model)
    assert_close(name, torch_out(name, PeftModel.from_pretrained(load_torch(name, d), tmp_path / "back").eval()), want)


PEFT_CASES = {  # explicit target lists: embeddings, short and per-layer patterns, layers_to_transform
    "llama": dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"],
                  rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
                  alpha_pattern={"down_proj": 3, "model.layers.0.self_attn.k_proj": 16}, task_type="CAUSAL_LM"),
    "llama_layers": dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1], task_type="CAUSAL_LM"),
    "llama_regex": dict(target_modules=r".*\.(q_proj|down_proj)", exclude_modules=["model.layers.0.mlp.down_proj"],
                        task_type="CAUSAL_LM"),
    "qwen2_bias": dict(target_modules=["q_proj", "o_proj"], bias="all", task_type="CAUSAL_LM"),
    "gpt2": dict(target_modules=["c_attn", "c_fc", "wpe"], rank_pattern={"c_fc": 2}, fan_in_fan_out=True,
                 alpha_pattern={"h.1.attn.c_attn": 12}, task_type="CAUSAL_LM"),
    "bert_cls": dict(target_modules=["query", "value", "dense", "word_embeddings"], rank_pattern={"value": 2},
                     alpha_pattern={"layer.1.attention.self.query": 16}, task_type="SEQ_CLS"),
}


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_load_peft_patterns_and_embeddings_match_peft(root, tmp_path, case):
    name = case.split("_")[0] if case.startswith(("llama", "qwen2")) else case
    d = saved(root, name)
    want = make_peft_adapter(name, d, tmp_path / "ad", r=4, lora_alpha=8, use_rslora=True, **PEFT_CASES[case])
    model, params = load(root, name)
    assert_differs(name, want, jax_out(model, params, name))
    tree = hf.load_peft(tmp_path / "ad", params, model)
    assert_close(name, jax_out(model, tree, name), want)
    items = dict(lora_items(tree))
    if case == "llama":
        assert items["model/layers/self_attn/v_proj/kernel"].rank == 2
        assert items["model/layers/self_attn/q_proj/kernel"].rank == 6
        assert items["model/embed_tokens/embedding"].a.shape == (V, 4)
        assert items["model/embed_tokens/embedding"].layout == "io"
    if case == "llama_layers":  # layer 0 gets no delta
        assert {p: lw.layer_mask for p, lw in items.items()} == {"model/layers/self_attn/q_proj/kernel": (False, True),
                                                                 "model/layers/self_attn/o_proj/kernel": (False, True)}
    if case == "llama_regex":
        assert {p: lw.layer_mask for p, lw in items.items()} == {
            "model/layers/self_attn/q_proj/kernel": None, "model/layers/mlp/down_proj/kernel": (False, True)}
    if case == "qwen2_bias":  # every bias trained (PEFT bias="all") comes back trainable with its value
        attn = tree["model"]["layers"]["self_attn"]
        assert all(isinstance(attn[m]["bias"], lora.Trainable) for m in ("q_proj", "k_proj", "v_proj"))
    if case == "gpt2":
        assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        assert items["transformer/h/attn/c_attn/kernel"].layout == "sio"
        # PEFT adapts only the input lookup of a tied embedding; lora_jax's head would change too
        make_peft_adapter(name, d, tmp_path / "tied", r=2, target_modules=["wte"], task_type="CAUSAL_LM")
        with pytest.raises(ValueError, match="transformer/wte/embedding: an adapter on the tied input embedding"):
            hf.load_peft(tmp_path / "tied", params, model)
    if case == "bert_cls":
        assert "bert/pooler/dense/kernel" in items and "bert/embeddings/word_embeddings/embedding" in items


def test_load_peft_dora_both_ways(root, tmp_path):
    d = saved(root, "llama")
    want = make_peft_adapter("llama", d, tmp_path / "ad", r=4, lora_alpha=8, use_rslora=True, use_dora=True,
                             target_modules=["q_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM")
    model, params = load(root, "llama")
    tree = hf.load_peft(tmp_path / "ad", params, model)
    assert all(lw.m is not None and lw.m.shape[0] == 2 for _, lw in lora_items(tree))
    assert_close("llama", jax_out(model, tree, "llama"), want)
    hf.save_peft(tmp_path / "back", tree, model)
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["use_dora"] is True
    pm = PeftModel.from_pretrained(load_torch("llama", d), tmp_path / "back").eval()
    assert_close("llama", torch_out("llama", pm), want)
    # DoRA made in lora_jax (stacked magnitudes, one row per layer) reads in PEFT
    ours = init(params, hf.rules_for(model, "attention", rank=2, use_dora=True))
    want = jax_out(model, ours, "llama")
    hf.save_peft(tmp_path / "ours", ours, model)
    pm = PeftModel.from_pretrained(load_torch("llama", d), tmp_path / "ours").eval()
    assert_close("llama", torch_out("llama", pm), want)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
def test_load_peft_lists_every_problem(root, tmp_path):
    d = saved(root, "llama")
    make_peft_adapter("llama", d, tmp_path / "ad", r=4, lora_alpha=8, **PEFT_CASES["llama"])
    model, params = load(root, "llama")
    f = str(tmp_path / "ad" / "adapter_model.safetensors")
    sd = load_file(f)
    p = "base_model.model.model.layers."
    del sd[p + "0.self_attn.k_proj.lora_B.weight"]                   # half an adapter
    del sd[p + "1.mlp.down_proj.lora_A.weight"], sd[p + "1.mlp.down_proj.lora_B.weight"]  # a targeted module gone
    sd[p + "0.self_attn.q_proj.lora_A.weight"] = np.zeros((3, 32), np.float32)  # rank 3, config says 4
    sd[p + "0.self_attn.nope.lora_A.weight"] = np.zeros((4, 32), np.float32)   # no such module
    sd[p + "0.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)            # a full weight, not modules_to_save
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        hf.load_peft(tmp_path / "ad", params, model)
    msg = str(e.value)
    assert "5 problem(s)" in msg
    assert "incomplete: model.layers.0.self_attn.k_proj has only ['A']" in msg
    assert "missing: base_model.model.model.layers.1.mlp.down_proj.lora_A/lora_B" in msg
    assert "shape mismatch: model.layers.0.self_attn.q_proj lora_A is (3, 32), expected (4, 32)" in msg
    assert "no kernel or embedding module 'model.layers.0.self_attn.nope'" in msg
    assert "full weight of 'model.layers.0.mlp.up_proj', which is not in modules_to_save" in msg
    # allow_missing forgives the absent module, and only that
    with pytest.raises(ValueError) as e:
        hf.load_peft(tmp_path / "ad", params, model, allow_missing=True)
    assert "4 problem(s)" in str(e.value) and "missing:" not in str(e.value)
    for k in [k for k in sd if "0.self_attn" in k or "up_proj" in k]:
        del sd[k]
    save_file(sd, f, metadata={"format": "pt"})
    tree = hf.load_peft(tmp_path / "ad", params, model, allow_missing=True)
    items = dict(lora_items(tree))
    assert items["model/layers/mlp/down_proj/kernel"].layer_mask == (True, False)  # layer 1's is absent
    assert items["model/layers/self_attn/q_proj/kernel"].layer_mask == (False, True)
    with pytest.raises(ValueError, match=r"missing: .*layers.0.self_attn.q_proj"):
        hf.load_peft(tmp_path / "ad", params, model)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg.update(lora_bias=True, peft_type="LOHA")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"peft_type is 'LOHA'.*lora_bias=True is not supported"):
        hf.load_peft(tmp_path / "ad", params, model)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
def test_a_config_that_selects_nothing_or_other_modules_is_refused(root, tmp_path, capsys):
    """Issue 22.20: PEFT refuses a config whose target_modules / layers_to_transform select no
    module, and never makes factors for a module they do not select; load_peft and the streaming
    merge refuse both instead of loading every factor in the file."""
    from lora_jax.cli import main

    d = saved(root, "llama")
    make_peft_adapter("llama", d, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model, params = load(root, "llama")
    cfg_file = tmp_path / "ad" / "adapter_config.json"
    good = json.loads(cfg_file.read_text())
    hf.load_peft(tmp_path / "ad", params, model)  # as written by PEFT: loads
    for change, words in [({"target_modules": ["qq_proj"]}, "select no module"),
                          ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [7]}, "select no module"),
                          ({"target_modules": ["q_proj"]}, "'model.layers.0.self_attn.v_proj' is not selected"),
                          ({"layers_to_transform": [1]}, "'model.layers.0.self_attn.q_proj' is not selected"),
                          ({"exclude_modules": ["v_proj"]}, "is not selected")]:
        cfg_file.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=re.escape(words)):
            hf.load_peft(tmp_path / "ad", params, model, allow_missing=True)
        if words != "select no module" or change.get("layers_to_transform"):
            out = tmp_path / "merged"
            assert main(["merge", "--base", d, "--adapter", str(tmp_path / "ad"), "--out", str(out)]) == 2
            assert "do not select" in capsys.readouterr().err and not out.exists()


# -- (c) lora_jax -> PEFT and merged checkpoints in PyTorch --------------------------------------------

@pytest.mark.parametrize("name", list(SPECS))
def test_save_peft_and_save_merged_load_in_pytorch(root, tmp_path, name):
    spec = SPECS[name]
    d = saved(root, name)
    model, params = load(root, name)
    rules = hf.rules_for(model, "all-linear", rank=4, alpha=8, use_rslora=True, rank_pattern={spec.mlp: 2},
                         alpha_pattern={spec.attn: 12})
    lp = random_factors(lambda p: lora.init(p, rules, 0), params)
    if spec.head == "seq_cls":  # an adapter on the classifier is exported merged, as PEFT's modules_to_save
        lp = random_factors(lambda t: lora.init(t, lora.Rules("classifier", rank=2), 0, add=True), lp, seed=2)
    want = jax_out(model, lp, name)
    assert_differs(name, want, jax_out(model, params, name))

    hf.save_peft(tmp_path / "ad", lp, model, base_model_name_or_path=d)
    pm = PeftModel.from_pretrained(load_torch(name, d), tmp_path / "ad").eval()
    assert_close(name, torch_out(name, pm), want)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["bias"]) == (
        "LORA", spec.task_type, 4, 8, True, "none")
    assert cfg["base_model_name_or_path"] == d
    mlp = [lf for lf in fam.leaves_of(model) if lf.path.endswith(f"/{spec.mlp.replace('.', '/')}/kernel")]
    assert cfg["rank_pattern"] == {lf.module(i): 2 for lf in mlp for i in range(2)}  # one PEFT module per layer
    assert set(cfg["alpha_pattern"].values()) == {12}
    if spec.head == "seq_cls":
        assert cfg["modules_to_save"] == ["classifier"]
    # and back into lora_jax exactly
    back = hf.load_peft(tmp_path / "ad", params, model)
    got = dict(lora_items(back))
    for p, lw in lora_items(lp):
        if p.startswith("classifier/"):
            assert isinstance(back["classifier"]["kernel"], lora.Trainable)
            np.testing.assert_array_equal(back["classifier"]["kernel"].value, lw.merge())
            continue
        assert (got[p].rank, got[p].alpha, got[p].rslora, got[p].layout) == (lw.rank, lw.alpha, True, lw.layout)
        np.testing.assert_array_equal(got[p].a, lw.a)
        np.testing.assert_array_equal(got[p].b, lw.b)
    assert set(got) == {p for p, _ in lora_items(lp) if not p.startswith("classifier/")}

    out = tmp_path / "merged"
    hf.save_merged(out, model, lp)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ad", "merged"]  # no temporary directory left behind
    assert json.loads((out / "config.json").read_text())["architectures"] == [spec.cls]
    assert_close(name, torch_out(name, load_torch(name, out)), want)


# -- (d) generation --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generate_matches_transformers(root, name):
    d = saved(root, name)
    model, params = load(root, name)
    m = load_torch(name, d)
    with torch.no_grad():
        want = m.generate(torch.tensor(PROMPT), attention_mask=torch.tensor(PROMPT_MASK), max_new_tokens=8,
                          do_sample=False).numpy()
    n = PROMPT.shape[1] + 8
    pad = m.generation_config.pad_token_id
    if want.shape[1] < n:  # transformers stops when every row has ended
        want = np.pad(want, ((0, 0), (0, n - want.shape[1])), constant_values=pad)
    got = np.asarray(generate(model, params, PROMPT, 8, attention_mask=PROMPT_MASK))
    np.testing.assert_array_equal(got, want)
    assert len(set(want[:, PROMPT.shape[1]:].ravel().tolist())) > 1  # not one repeated token


# -- (e) the checkpoint table ----------------------------------------------------------------------

def test_every_supported_model_type_is_a_case():
    types = {json.loads(getattr(tf, s.config)(**s.kwargs).to_json_string())["model_type"] for s in SPECS.values()}
    assert types == set(fam.SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("name", list(SPECS))
def test_table_is_the_state_dict_and_save_writes_what_save_pretrained_wrote(root, tmp_path, name):
    import lora_jax.models as M

    d = saved(root, name)
    model, params = load(root, name)
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    table = fam.leaves_of(model)
    # our parameter tree is the table's, with init_params' shapes and the table's (stacked) shapes
    flat = {lora.rules.path_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    fresh = {lora.rules.path_str(kp): v.shape for kp, v in
             jax.tree_util.tree_flatten_with_path(jax.eval_shape(lambda: fam.init_params(model, jax.random.key(0))))[0]}
    assert set(flat) == set(fresh) == {lf.path for lf in table}
    for lf in table:
        want = ((n_layers,) if lf.layered else ()) + tuple(lf.shape)
        assert flat[lf.path].shape == fresh[lf.path] == want, lf.path
    # the table's names are PyTorch's in-memory state dict (a tied head aside)
    names = {lf.hf_name(i) for lf in table for i in (range(n_layers) if lf.layered else [None])}
    state = set(load_torch(name, d).state_dict())
    tied = {k for k in state if k.endswith("lm_head.weight")} if getattr(cfg, "tie_word_embeddings", False) else set()
    assert names == state - tied - {k for k in state if k.endswith(".masked_bias") or k.endswith(".attn.bias")}
    lf = next(lf for lf in table if lf.layered)
    assert lf.module(1).count(".1.") == 1
    with pytest.raises(ValueError, match="layer index"):
        lf.module()
    # saving writes back exactly the tensors save_pretrained wrote (names, dtypes, values)
    M.save(tmp_path / "again", model, params)
    x, back = load_file(os.path.join(d, "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(back) == set(x)
    for k in x:
        assert back[k].dtype == x[k].dtype and back[k].shape == x[k].shape, k
        np.testing.assert_array_equal(back[k], x[k], err_msg=k)


# -- checkpoints: formats, strictness, refusals ------------------------------------------------------

def test_from_pretrained_bf16_and_save_merged_dtype(root, tmp_path):
    d = saved(root, "llama")
    model, params = hf.from_pretrained(d, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    want = torch_out("llama", load_torch("llama", d))
    got = jax_out(model, params, "llama")
    assert got.dtype == np.float32
    np.testing.assert_allclose(real("llama", got), real("llama", want), atol=0.15, rtol=0.05)
    # bf16 parameters export as bf16 and say so in config.json; they read back bit for bit
    hf.save_merged(tmp_path / "bf16", model, params)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert tf.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    _, back = hf.from_pretrained(tmp_path / "bf16", dtype="bfloat16", prefer="safetensors")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint16),
                                                                      np.asarray(b).view(np.uint16)), back, params)
    _, back32 = hf.from_pretrained(tmp_path / "bf16")  # the default dtype is float32
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, np.float32)), back32, params)


def test_head_and_base_checkpoints_load_across_heads(root, tmp_path):
    """As transformers does: a checkpoint with a head loads into the base model (the head is
    dropped), and a base-model checkpoint into the head model when the head is tied."""
    d = saved(root, "bert_cls")
    base, bparams = hf.from_pretrained(d, architecture="BertModel")
    assert type(base).__name__ == "BertModel" and "classifier" not in bparams and "encoder" in bparams
    want = torch_out("bert_base", tf.BertModel.from_pretrained(d, attn_implementation="eager").eval())
    assert_close("bert_base", jax_out(base, bparams, "bert_base"), want)
    torch.manual_seed(3)
    spread(tf.GPT2Model(torch_config("gpt2")), 3).save_pretrained(tmp_path / "base")
    model, params = hf.from_pretrained(tmp_path / "base", architecture="GPT2LMHeadModel")  # keys lack "transformer."
    want = torch_out("gpt2", tf.GPT2LMHeadModel.from_pretrained(tmp_path / "base", attn_implementation="eager").eval())
    assert_close("gpt2", jax_out(model, params, "gpt2"), want)


def _copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return os.path.join(dst, "model.safetensors")


def test_strict_loading_lists_every_problem(root, tmp_path):
    f = _copy_ckpt(saved(root, "llama"), tmp_path / "bad")
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((12, 32), np.float32)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        hf.from_pretrained(tmp_path / "bad")
    msg = str(e.value)
    assert "does not match LlamaForCausalLM" in msg
    assert "missing 1: ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected 1: ['model.layers.1.mlp.extra.weight']" in msg
    assert "model.layers.0.self_attn.k_proj.weight: expected (16, 32), got (12, 32)" in msg
    f = tmp_path / "bad" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        hf.from_pretrained(tmp_path / "bad")


def test_sharded_checkpoint_and_index_escape(root, tmp_path):
    d = tmp_path / "sharded"
    f = _copy_ckpt(saved(root, "gpt2"), d)
    sd = load_file(f)
    os.remove(f)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(d / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _, params = hf.from_pretrained(d)
    _, ref = load(root, "gpt2")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)
    index["weight_map"][keys[0]] = "../model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has a '..' part; only plain names inside"):
        hf.from_pretrained(d)
    os.symlink(tmp_path, d / "up")  # a link inside the checkpoint leading out of it
    index["weight_map"][keys[0]] = "up/elsewhere.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        hf.from_pretrained(d)


def test_unsupported_model_types_and_configs(root, tmp_path):
    tf.T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError) as e:
        hf.from_pretrained(tmp_path / "t5")
    assert "'t5' is not supported" in str(e.value)
    assert all(repr(mt) in str(e.value) for mt in hf.SUPPORTED)
    assert set(hf.SUPPORTED) >= {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "bert"}
    # a config feature lora_jax does not implement is named, never silently different logits
    cfg = torch_config("llama").to_dict()
    cfg["rope_parameters"] = {"rope_type": "made_up", "rope_theta": 10000.0}
    shutil.copytree(saved(root, "llama"), tmp_path / "rope")
    (tmp_path / "rope" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="made_up"):
        hf.from_pretrained(tmp_path / "rope")
    with pytest.raises(ValueError, match="architecture 'GPT2ForTokenClassification' is not supported"):
        hf.from_pretrained(saved(root, "gpt2"), architecture="GPT2ForTokenClassification")


def test_hub_id_offline_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        hf.from_pretrained("someone/tiny-llama")
    assert os.path.join(str(tmp_path), "someone/tiny-llama") in str(e.value) and "offline" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no directory at"):
        hf.from_pretrained("./not/here")


# -- rules_for ---------------------------------------------------------------------------------------

PRESET_MODULES = {  # (all-linear, attention, peft): module names of the stacked kernels each preset adapts
    "llama": ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
              {"q_proj", "k_proj", "v_proj", "o_proj"}, {"q_proj", "v_proj"}),
    "phi3": ({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, {"qkv_proj", "o_proj"}, None),
    "gpt2": ({"attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"}, {"attn/c_attn", "attn/c_proj"},
             {"attn/c_attn"}),
    "bert_cls": ({"self/query", "self/key", "self/value", "output/dense", "intermediate/dense", "pooler/dense"},
                 {"self/query", "self/key", "self/value", "attention/output/dense"}, {"self/query", "self/value"}),
}


def test_peft_default_targets_are_peft_s():
    import peft.utils.constants as pc

    for mt in hf.SUPPORTED:
        assert hf.peft_default_targets(mt) == tuple(pc.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(mt, ()))


@pytest.mark.parametrize("name", list(PRESET_MODULES))
def test_rules_for_presets(root, name):
    model, params = load(root, name)
    for preset, want in zip(("all-linear", "attention", "peft"), PRESET_MODULES[name]):
        if want is None:  # PEFT has no default target_modules for this model type
            with pytest.raises(ValueError, match="PEFT has no default target_modules for model_type .phi3."):
                hf.rules_for(model, preset)
            continue
        items = dict(lora_items(jax.eval_shape(lambda p: lora.init(p, hf.rules_for(model, preset, rank=2), 0),
                                               params)))
        got = {p for p in items}
        assert all(any(p.endswith(f"/{m}/kernel") for m in want) for p in got), (preset, sorted(got))
        assert all(any(p.endswith(f"/{m}/kernel") for p in got) for m in want), (preset, sorted(got))
        # stacked layer kernels get one adapter per layer; a top-level kernel (the pooler) none
        assert all(lw.layout == ("io" if "pooler" in p else "sio") for p, lw in items.items())
    rules = hf.rules_for("llama", "attention")
    assert rules.resolve("model/layers/self_attn/o_proj/kernel", (2, 32, 32)).layout == "sio"
    assert rules.resolve("model/layers/mlp/up_proj/kernel", (2, 32, 48)) is None
    with pytest.raises(ValueError, match="preset must be one of"):
        hf.rules_for("llama", "everything")


# -- save_peft: what PEFT cannot express, biases, modules_to_save, several adapters -------------------

def test_save_peft_refuses_what_peft_cannot_express(root, tmp_path):
    model, params = load(root, "llama")
    wrong = init(params, lora.Rules(["q_proj"], rank=2))  # no stack_axes: (L, in, out) as one kernel
    with pytest.raises(ValueError, match=r"layout 'iio', but this leaf is 'sio'.*use lora_jax.hf.rules_for"):
        hf.save_peft(tmp_path / "ad", wrong, model)
    mixed = init(params, lora.Rules([lora.Rule(["q_proj"], use_rslora=True), lora.Rule(["up_proj"])], rank=2,
                                    stack_axes=1))
    with pytest.raises(ValueError, match="use_rslora differs between targets"):
        hf.save_peft(tmp_path / "ad", mixed, model)
    dora_embed = init(params, lora.Rules(["embed_tokens"], rank=2, use_dora=True))
    with pytest.raises(ValueError, match="DoRA on an embedding"):
        hf.save_peft(tmp_path / "ad", dora_embed, model)
    sliced = init(params, lora.Rules(["q_proj"], rank=2, stack_axes=1, enable_lora=[True, False]))
    with pytest.raises(ValueError, match="enable_lora output slices"):
        hf.save_peft(tmp_path / "ad", sliced, model)
    with pytest.raises(ValueError, match="holds no LoraWeight"):
        hf.save_peft(tmp_path / "ad", params, model)
    tmodel, tparams = load(root, "llama3_tied")
    tied = init(tparams, lora.Rules(["embed_tokens"], rank=2))
    with pytest.raises(ValueError, match="tied input embedding"):
        hf.save_peft(tmp_path / "ad", tied, tmodel)
    assert not os.path.exists(tmp_path / "ad")


def test_save_peft_module_names(root, tmp_path):
    """target_modules: a short name where it selects exactly the adapted modules, else full names;
    a stacked weight restricted to some layers writes only those layers' modules."""
    model, params = load(root, "gpt2")
    hf.save_peft(tmp_path / "gpt2", init(params, hf.rules_for(model, "attention", rank=2)), model)
    cfg = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    # c_attn everywhere -> its short name; c_proj only in attention (not the MLP) -> full names
    assert cfg["target_modules"] == ["c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    model, params = load(root, "llama")
    hf.save_peft(tmp_path / "all", init(params, hf.rules_for(model, "all-linear", rank=2)), model)
    cfg = json.loads((tmp_path / "all" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    lp = init(params, lora.Rules(["q_proj", "down_proj"], rank=2, stack_axes=1, layers=[1]))
    hf.save_peft(tmp_path / "one", lp, model)
    cfg = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    pm = PeftModel.from_pretrained(load_torch("llama", saved(root, "llama")), tmp_path / "one").eval()
    assert_close("llama", torch_out("llama", pm), jax_out(model, lp, "llama"))


def test_save_merged_tied_embedding_adapter_and_tied_head(root, tmp_path):
    """An adapter on a tied embedding merges into the one matrix both ends use; the head stays tied."""
    name = "llama3_tied"
    model, params = load(root, name)
    hf.save_merged(tmp_path / "plain", model, params)
    assert "lm_head.weight" not in load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["tie_word_embeddings"] is True
    lp = init(params, lora.Rules("embed_tokens", rank=2))
    want = jax_out(model, lp, name)
    assert_differs(name, want, jax_out(model, params, name))
    hf.save_merged(tmp_path / "m", model, lp)
    assert_close(name, torch_out(name, load_torch(name, tmp_path / "m")), want)


def test_save_merged_is_atomic_and_refuses_overwrite(root, tmp_path):
    model, params = load(root, "llama")
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        hf.save_merged(out, model, params)
    lp = init(params, hf.rules_for(model, "peft", rank=2))
    k = "model/layers/self_attn/q_proj/kernel"
    bad = jax.tree_util.tree_map(lambda x: x, lp, is_leaf=lora.is_lora)
    bad["model"]["layers"]["self_attn"]["q_proj"]["kernel"] = dict(lora_items(lp))[k].replace(
        b=jnp.full((2, 2, 32), jnp.nan))
    with pytest.raises(ValueError, match="non-finite"):
        hf.save_merged(out, model, bad, overwrite=True)
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["m"]
    with pytest.raises(ValueError, match="no earlier export"):  # overwrite replaces only an earlier export
        hf.save_merged(out, model, lp, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    (out / "config.json").write_text("{}")
    broken = dict(params, lm_head={"kernel": jnp.zeros((32, 5))})
    with pytest.raises(ValueError, match=r"lm_head/kernel: expected \(32, 97\), got \(32, 5\)"):
        hf.save_merged(out, model, broken, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "keep.txt"]
    hf.save_merged(out, model, lp, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def _as_if_trained(tree):
    return jax.tree_util.tree_map(lambda x: lora.Trainable(x.value + 0.05) if isinstance(x, lora.Trainable) else x,
                                  tree, is_leaf=lambda x: isinstance(x, lora.Trainable))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trainable_biases_and_modules_to_save_round_trip_with_peft(root, tmp_path, bias):
    """bias='lora_only'/'all' and a modules_to_save module (not the head) written as PEFT reads them."""
    name = "bert_cls"
    d = saved(root, name)
    model, params = load(root, name)
    rules = lora.Rules(["query", "value"], rank=2, alpha=4, stack_axes=1, bias=bias, modules_to_save=["pooler"])
    lp = _as_if_trained(init(params, rules))
    want = jax_out(model, lp, name)
    hf.save_peft(tmp_path / "ad", lp, model)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["bias"] == bias and "bert.pooler.dense" in cfg["modules_to_save"]
    pm = PeftModel.from_pretrained(load_torch(name, d), tmp_path / "ad").eval()
    assert_close(name, torch_out(name, pm), want)
    back = hf.load_peft(tmp_path / "ad", params, model)
    assert isinstance(back["bert"]["pooler"]["dense"]["kernel"], lora.Trainable)
    biases = back["bert"]["encoder"]["layer"]["attention"]["self"]
    assert isinstance(biases["query"]["bias"], lora.Trainable) and isinstance(biases["value"]["bias"], lora.Trainable)
    assert isinstance(biases["key"]["bias"], lora.Trainable) == (bias == "all")
    assert_close(name, jax_out(model, back, name), want)


def test_save_peft_picks_one_adapter_of_several(root, tmp_path):
    name = "llama"
    model, params = load(root, name)
    lp = init(params, hf.rules_for(model, "attention", rank=2, alpha=4))
    lp = random_factors(lambda t: lora.add(t, "other", lora.Rules(["q_proj"], rank=3, alpha=3, stack_axes=1), 1), lp,
                        seed=2)
    with pytest.raises(ValueError, match=r"holds adapters \['default', 'other'\].*pass adapter=<name>"):
        hf.save_peft(tmp_path / "x", lp, model)
    hf.save_peft(tmp_path / "ad", lp, model, adapter="other")
    pm = PeftModel.from_pretrained(load_torch(name, saved(root, name)), tmp_path / "ad").eval()
    assert_close(name, torch_out(name, pm), jax_out(model, lora.select(lp, "other"), name))
