"""Architecture twins: a paper model built from the facts of its architecture, with seeded
random weights, instead of being downloaded.

Every paper model's config (``conf/model/*.yaml``) carries ``arch``: the fields of its hub
``config.json`` that shape the model (model type, widths, layers, heads and kv-heads,
vocabulary, positions, rope theta and scaling, tying, pre/post-LayerNorm, the word-embedding
projection, the sliding window). :func:`architecture_config` turns them into the transformers
configuration of the real model (what a resource plan reads). ``model.twin=true`` builds the
model from them (:func:`build_twin`), optionally reduced:

- ``model.twin_layers``: the first N decoder blocks (null = all of them);
- ``model.twin_hidden``: a narrower hidden width. The numbers of heads and kv-heads are kept
  (so the grouped-query ratio is), the head dimension becomes ``twin_hidden / heads``, and the
  MLP width and OPT's word-embedding projection scale with the hidden width (OPT-350M's
  512 <-> 1024 projection stays a 1 : 2 projection). The vocabulary shrinks to the project's
  tokenizer (``assets/tokenizer``, 8192 tokens), so the embedding and head stay small.
  Everything else is the real model's: rope theta and scaling, tying, post-LayerNorm,
  sliding window, context length. null = the real width and vocabulary.

A twin always reads text through the project's tokenizer (its ids are valid rows of any
twin's embedding). Weights are transformers' own initialisation of the architecture (normal,
std 0.02; norms at 1) drawn from a generator seeded with the run's ``seed``, in fp32, then cast
to the run's dtype: the same seed gives the same twin bit for bit, and its activations and
perplexity are finite.

What a twin's perplexity means: nothing about quality. A random model predicts roughly
uniformly, so its perplexity is about the size of its vocabulary, and quantizing it moves the
number by noise. It says everything about the code path: the real model's shapes, families
and features go through loading, validation, calibration, every method, evaluation, records
and resume, in seconds on a CPU for a reduced twin, or at full width on a GPU to measure time
and memory.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import torch

from aespa.core.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "assets", "tokenizer")
ROTARY_TYPES = ("llama", "mistral", "qwen2")


def _plain(cfg) -> dict:
    """A model config (DictConfig or mapping) as a plain dict."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def architecture_facts(model_cfg) -> dict:
    """The ``arch`` block of a model config; a one-line error when it has none."""
    model = _plain(model_cfg)
    arch = model.get("arch")
    if not arch:
        raise UserError(f"model {model.get('name')!r} has no architecture facts (model.arch), so model.twin=true "
                        f"cannot build it; the paper models' configs (conf/model/opt-*.yaml, llama-*.yaml, "
                        f"mistral-7b.yaml) have them")
    if not isinstance(arch, Mapping) or "model_type" not in arch:
        raise UserError("model.arch must be a mapping of config.json fields with at least model_type")
    return _plain(arch)


def _geometry_error(arch: dict) -> str | None:
    """What is wrong with the head geometry of ``arch`` (None when nothing is)."""
    hidden, heads = arch.get("hidden_size"), arch.get("num_attention_heads")
    kv = arch.get("num_key_value_heads") or heads
    if not all(isinstance(v, int) and v > 0 for v in (hidden, heads, kv)):
        return "hidden_size, num_attention_heads and num_key_value_heads must be positive integers"
    if heads % kv:
        return f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
    if "head_dim" not in arch and hidden % heads:
        return f"hidden_size={hidden} does not split into num_attention_heads={heads}"
    return None


def architecture_config(model_cfg):
    """The transformers configuration of the real model (full size) from the model config's
    ``arch`` facts: ``AutoConfig.for_model(model_type, **facts)``. No weights, no hub."""
    arch = architecture_facts(model_cfg)
    problem = _geometry_error(arch)
    if problem:
        raise UserError(f"model.arch: {problem}")
    return _config(arch)


def _config(facts: dict):
    from transformers import AutoConfig

    facts = dict(facts)
    try:
        return AutoConfig.for_model(facts.pop("model_type"), **facts)
    except (ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"model.arch does not describe a transformers model ({reason})") from None


def twin_facts(model_cfg, vocab_size: int | None = None) -> dict:
    """The ``arch`` facts of the twin: ``model.twin_layers`` blocks, ``model.twin_hidden`` wide
    (heads and kv-heads kept; MLP and word-embedding widths scaled alike; the vocabulary that of
    the project's tokenizer, ``vocab_size``, when the width is reduced)."""
    model = _plain(model_cfg)
    arch = architecture_facts(model)
    problem = _geometry_error(arch)
    if problem:
        raise UserError(f"model.arch: {problem}")
    facts = dict(arch)
    layers, hidden = model.get("twin_layers"), model.get("twin_hidden")
    real_layers = arch["num_hidden_layers"]
    if layers is not None:
        if not 1 <= layers <= real_layers:
            raise UserError(f"model.twin_layers={layers} is not allowed; use 1..{real_layers} (the real model's "
                            f"blocks) or null for all")
        facts["num_hidden_layers"] = layers
    if hidden is not None and hidden != arch["hidden_size"]:
        facts.update(_narrower(arch, hidden, model.get("name")))
        facts["vocab_size"] = vocab_size if vocab_size is not None else _tokenizer_vocab()
    return facts


def _narrower(arch: dict, hidden: int, name) -> dict:
    """The widths of a twin ``hidden`` wide: heads kept, every other width scaled."""
    real, heads = arch["hidden_size"], arch["num_attention_heads"]
    rotary = arch["model_type"] in ROTARY_TYPES
    if hidden > real:
        raise UserError(f"model.twin_hidden={hidden} is wider than {name} ({real}); use a narrower width or null")
    step = 2 * heads if rotary else heads  # rotary embeddings rotate pairs: an even head dimension
    if hidden % step:
        near = max(step, round(hidden / step) * step)
        raise UserError(f"model.twin_hidden={hidden} breaks the head geometry of {name}: its "
                        f"{heads} attention heads ({arch.get('num_key_value_heads') or heads} kv-heads) need a "
                        f"width that is a multiple of {step}{' (an even head dimension for RoPE)' if rotary else ''}; "
                        f"e.g. model.twin_hidden={near}")
    out = {"hidden_size": hidden}
    if "head_dim" in arch:
        out["head_dim"] = hidden // heads
    for key in ("intermediate_size", "ffn_dim"):
        if key in arch:
            out[key] = max(1, round(arch[key] * hidden / real))
    if "word_embed_proj_dim" in arch:
        proj = arch["word_embed_proj_dim"]
        if proj * hidden % real:
            raise UserError(f"model.twin_hidden={hidden} breaks the word-embedding projection of {name} "
                            f"({proj} <-> {real}): use a width whose {proj}/{real} share is whole")
        out["word_embed_proj_dim"] = proj * hidden // real
    return out


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def _tokenizer_vocab() -> int:
    return len(_tokenizer())


def twin_config(model_cfg, tokenizer=None):
    """The transformers configuration of the twin (its token ids those of the project's tokenizer)."""
    tokenizer = tokenizer or _tokenizer()
    facts = twin_facts(model_cfg, len(tokenizer))
    facts.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, use_cache=False)
    return _config(facts)


def build_twin(model_cfg, seed: int, dtype: torch.dtype = torch.float32) -> tuple:
    """The twin and the project's tokenizer: weights drawn in fp32 from ``seed`` (the global
    random state is left as it was), then cast to ``dtype``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from aespa.core.attention import register_attention

    hf_logging.set_verbosity_error()
    tokenizer = _tokenizer()
    config = twin_config(model_cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=register_attention())
    model = model.to(dtype).eval()
    model.config.use_cache = False
    return model, tokenizer


def fingerprint(model_cfg) -> str:
    """What identifies a twin's architecture in a record (its seed is the run's)."""
    model = _plain(model_cfg)
    payload = {"arch": model.get("arch"), "layers": model.get("twin_layers"), "hidden": model.get("twin_hidden")}
    return "twin:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def describe(model_cfg) -> dict:
    """The twin's shape for a run record: blocks, width, vocabulary."""
    facts = twin_facts(model_cfg)
    return {"layers": facts["num_hidden_layers"], "hidden": facts["hidden_size"], "vocab": facts["vocab_size"]}
