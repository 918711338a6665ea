"""The embedded models load offline, match their model cards and are real LMs."""
import json
import os

import pytest
import torch

from aespa.core.adapters import ModelAdapter
from aespa.core.evaluation import perplexity
from experiments.data import evaluation_windows
from tests.conftest import ASSETS

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ASSETS, "tiny-llama", "training.json")),
                                reason="embedded models not trained yet (python -m experiments.train_tiny)")


def card(name):
    with open(os.path.join(ASSETS, name, "training.json")) as f:
        return json.load(f)


def test_auto_classes_load_offline():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    for name, cls in (("tiny-opt", "OPTForCausalLM"), ("tiny-llama", "LlamaForCausalLM")):
        folder = os.path.join(ASSETS, name)
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.vocab_size == 8192 and tok.bos_token and tok.eos_token and tok.pad_token
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model).__name__ == cls
        assert model.config.max_position_embeddings >= 1024
        assert os.path.getsize(os.path.join(folder, "model.safetensors")) <= 16 * 2**20


@pytest.mark.parametrize("name,fixture", [("tiny-opt", "tiny_opt"), ("tiny-llama", "tiny_llama")])
def test_test_perplexity_matches_card_and_beats_untrained(name, fixture, request):
    from experiments.train_tiny import build_model

    model, tok = request.getfixturevalue(fixture)
    windows = evaluation_windows("wikivital", tok, 512)
    ppl = perplexity(ModelAdapter(model), windows, "cpu", progress=False)
    assert ppl == pytest.approx(card(name)["ppl_test"], rel=0.02)
    assert ppl <= 100
    torch.manual_seed(0)
    untrained = build_model(card(name)["arch"], tok, 1024).eval()
    with torch.no_grad():
        w = windows[:4]
        untrained_ppl = torch.exp(untrained(w, labels=w).loss).item()
    assert untrained_ppl > 10 * ppl


def test_tiny_llama_has_gqa_and_rotary(tiny_llama):
    model, _ = tiny_llama
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    geo = ModelAdapter(model).geometry
    assert geo.rotary and geo.kv_group == cfg.num_attention_heads // cfg.num_key_value_heads
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == cfg.num_key_value_heads * geo.head_dim
    assert hasattr(model.model, "rotary_emb")
