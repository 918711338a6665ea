"""Shared fixtures: the embedded models (assets/), small random models of each family,
and calibration windows. Everything runs offline on CPU."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker and per process it starts
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from experiments.methods import load_methods  # noqa: E402  (after the offline environment above)

load_methods()  # every method registered, and offered to Hydra as method=<name>
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "assets")


def load(name: str, dtype=torch.float32):
    from experiments.runner import load_model

    return load_model(os.path.join(ASSETS, name), dtype)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))


def random_model(arch: str, layers: int = 2, seed: int = 0):
    """A small randomly initialised model of a family (hidden 64), ptq attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    from aespa.core.attention import register_attention

    torch.manual_seed(seed)
    if arch == "opt":
        cfg = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, ffn_dim=256,
                        word_embed_proj_dim=64, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0)
    else:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128)
    cfg._attn_implementation = register_attention()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ptq").eval()
    return model


@pytest.fixture(scope="session")
def tiny_opt():
    return load("tiny-opt")


@pytest.fixture(scope="session")
def tiny_llama():
    return load("tiny-llama")


def compose(*overrides: str):
    """The resolved run config for these command-line overrides (as run.py sees it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def pytest_collection_modifyitems(config, items):
    """Under ``-n``: the SLURM tests share one worker (one single-node cluster)."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
