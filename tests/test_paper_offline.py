"""A paper model's default protocol end to end without the hub: its reduced twin, calibrated on
C4 and evaluated on its default test sets (WikiText-2, C4-new, PTB-new), every set read from
files laid out exactly as the hub serves them (tests/fixtures/hub) through ``data_paths``."""
import math
import os

import pytest

from experiments import data
from experiments.runner import compose, run

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hub")


@pytest.mark.slow
def test_opt125m_twin_with_its_default_calibration_and_test_sets_offline(tmp_path):
    paths = [f"++data_paths.{k}={os.path.join(FIXTURES, *s.repo.split('/'))}" for k, s in data.HUB_SOURCES.items()]
    record = run(compose(["model=opt-125m", "model.twin=true", "model.twin_layers=2", "model.twin_hidden=96",
                          "seqlen=32", "nsamples=4", "method=gptq", "bits=3", "progress=false",
                          f"results_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
                          f"checkpoint_dir={tmp_path / 'ckpt'}"] + paths))
    assert record["config"]["calib"]["dataset"] == "c4"  # the model's default calibration set (calib=auto)
    ppl = record["metrics"]["ppl"]
    assert set(ppl) == {"wikitext2", "c4-new", "ptb-new"}  # the model's default eval list
    # a random twin predicts about uniformly over the project tokenizer's 8192 tokens
    assert all(math.isfinite(v) and 1000 < v < 40000 for v in ppl.values()), ppl
