"""Block checkpoints (aespa/core/checkpoint.py): a run stopped in block k and rerun resumes at
block k and ends bit-identical to an uninterrupted run, on small random models."""
import json
import logging
import os
import random
import time

import numpy as np
import pytest
import torch

from aespa.core import checkpoint as resume
from aespa.core.adapters import ModelAdapter
from aespa.core.checkpoint import BlockCheckpoint
from aespa.core.evaluation import perplexity
from aespa.core.grid import minmax_grid
from aespa.core.method import Method, QuantSpec, get_method
from aespa.core.pipeline import quantize_model
from tests.conftest import random_model

N_BLOCKS = 4


class Stop(Exception):
    """Stands for a kill in the middle of a block."""


class StatefulNoisyMethod(Method):
    """A method whose result depends on everything a checkpoint must carry: the
    full-precision stream (fp_outputs), the torch/numpy/random RNG streams, and its own
    state across blocks (``blocks_done``)."""

    name = "noisy"
    needs_fp_stream = True

    def __init__(self, stop_at: int | None = None):
        super().__init__(QuantSpec(bits=3))
        self.stop_at, self.blocks_done = stop_at, 0

    def state_dict(self) -> dict:
        return {"blocks_done": self.blocks_done}

    def load_state_dict(self, state: dict) -> None:
        self.blocks_done = state["blocks_done"]

    def quantize_block(self, ctx) -> None:
        if ctx.index == self.stop_at:
            raise Stop
        shift = torch.randn(()).item() + np.random.rand() + random.random() + ctx.fp_outputs.mean().item()
        shift += self.blocks_done
        for role, linear in ctx.block.linears().items():
            w = linear.weight.data.float() + 1e-3 * shift
            grid = minmax_grid(w, self.spec.bits, self.spec.sym, -1)
            ctx.set_weight(role, grid.fake_quantize(w), grid)
        self.blocks_done += 1


def _seed(seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _data(vocab=512, seqlen=32):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (8, seqlen), generator=g), torch.randint(0, vocab, (4, seqlen), generator=g)


def _quantize(arch, method, checkpoint=None):
    model = random_model(arch, layers=N_BLOCKS, seed=0)
    adapter = ModelAdapter(model)
    calibration, windows = _data()
    _seed()
    result = quantize_model(adapter, method, calibration, "cpu", batch_size=4, checkpoint=checkpoint, progress=False)
    return model, result, perplexity(adapter, windows, "cpu", progress=False)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_stopped_run_resumes_at_its_block_bit_identical(arch, tmp_path, caplog):
    ref_model, ref_result, ref_ppl = _quantize(arch, StatefulNoisyMethod())
    checkpoint = BlockCheckpoint(str(tmp_path), "run")
    with pytest.raises(Stop):
        _quantize(arch, StatefulNoisyMethod(stop_at=2), checkpoint)
    assert checkpoint.progress() == {"run_id": "run", "next_block": 2, "n_blocks": N_BLOCKS}
    caplog.clear()
    caplog.set_level(logging.INFO)

    model, result, ppl = _quantize(arch, StatefulNoisyMethod(), checkpoint)
    assert "resuming at block 2 of 4" in caplog.text
    _assert_same_weights(model, ref_model)
    assert ppl == ref_ppl
    assert result.grids.keys() == ref_result.grids.keys()
    assert all(torch.equal(result.grids[k].scale, ref_result.grids[k].scale) for k in ref_result.grids)
    assert result.notes == ["resumed at block 2 of 4"]


def test_a_rerun_without_the_checkpoint_differs():
    """The control: restarting from scratch after two blocks (RNG and method state reset)
    does not give the same weights, so the test above can fail."""
    ref_model, _, _ = _quantize("opt", StatefulNoisyMethod())
    method = StatefulNoisyMethod()
    method.blocks_done = 2
    model, _, _ = _quantize("opt", method)
    assert not torch.equal(model.state_dict()["model.decoder.layers.3.fc1.weight"],
                           ref_model.state_dict()["model.decoder.layers.3.fc1.weight"])


def stopping(name: str, spec: QuantSpec, options: dict, stop_at: int | None = None):
    """A registered method that raises Stop when the pipeline reaches block ``stop_at``."""
    method = get_method(name)(spec, options)
    quantize_block = method.quantize_block

    def stop_or_quantize(ctx):
        if ctx.index == stop_at:
            raise Stop
        quantize_block(ctx)

    method.quantize_block = stop_or_quantize
    return method


# every registered method, on budgets of a few steps: (name, spec, options)
EVERY_METHOD = [
    ("rtn", QuantSpec(bits=3), {}),
    ("gptq", QuantSpec(bits=3, group_size=16), {"act_order": True}),
    ("aespa", QuantSpec(bits=3, group_size=16), {"iters": 6, "zfold_rounds": 2}),
    ("zfold", QuantSpec(bits=2), {"zfold_rounds": 2}),
    ("brecq", QuantSpec(bits=3), {"iters": 6}),
    ("omniquant", QuantSpec(bits=4, act_bits=4), {"epochs": 1}),
    ("smoothquant", QuantSpec(bits=4, act_bits=6), {}),
    ("qllm", QuantSpec(bits=4, act_bits=4), {"epochs": 1, "blocks_per_chunk": 2}),
    ("boa", QuantSpec(bits=3), {}),
    ("turboboa", QuantSpec(bits=3, group_size=16), {}),
]


@pytest.mark.parametrize("name,spec,options", EVERY_METHOD, ids=[m[0] for m in EVERY_METHOD])
def test_every_method_resumed_after_block_2_equals_the_uninterrupted_run(name, spec, options, tmp_path):
    """A stop between blocks 1 and 2, then a run from the checkpoint with a fresh model and a
    fresh method (as a new process would have): weights, grids (Z-Fold's ζ included) and
    perplexity equal the uninterrupted run's bit for bit."""
    from aespa.core.method import METHODS

    assert {m[0] for m in EVERY_METHOD} == set(METHODS) - {"none"}, "a method without a resume test"
    arch = "llama" if name in ("qllm", "aespa", "turboboa") else "opt"
    ref_model, ref_result, ref_ppl = _quantize(arch, stopping(name, spec, options))
    checkpoint = BlockCheckpoint(str(tmp_path), name)
    with pytest.raises(Stop):
        _quantize(arch, stopping(name, spec, options, stop_at=2), checkpoint)
    assert checkpoint.progress()["next_block"] == 2
    model, result, ppl = _quantize(arch, stopping(name, spec, options), checkpoint)
    assert ppl == ref_ppl
    _assert_same_weights(model, ref_model)
    assert result.grids.keys() == ref_result.grids.keys()
    for key, grid in ref_result.grids.items():
        theirs = result.grids[key].to_dict()
        assert theirs.keys() == grid.to_dict().keys(), key
        assert all(not torch.is_tensor(v) or torch.equal(v, theirs[k]) for k, v in grid.to_dict().items()), key


def test_activation_quantizers_of_resumed_blocks_come_back(tmp_path):
    """Weight-activation runs: the quantizers of the blocks done before the stop are modules
    and hooks, not tensors; a resumed run must have them on every block."""
    spec = QuantSpec(bits=4, act_bits=4)
    _, _, ref_ppl = _quantize("llama", stopping("rtn", spec, {}))
    _, _, weights_only_ppl = _quantize("llama", stopping("rtn", QuantSpec(bits=4), {}))
    assert ref_ppl != weights_only_ppl
    checkpoint = BlockCheckpoint(str(tmp_path), "wa")
    with pytest.raises(Stop):
        _quantize("llama", stopping("rtn", spec, {}, stop_at=3), checkpoint)
    model, _, ppl = _quantize("llama", stopping("rtn", spec, {}), checkpoint)
    assert ppl == ref_ppl
    assert all(type(lin).__name__ == "QuantInputLinear" for i in range(N_BLOCKS)
               for lin in ModelAdapter(model).block(i).linears().values())


def test_each_block_is_written_once_and_nothing_is_left_over(tmp_path, monkeypatch):
    writes = []
    real = resume.atomic_write
    monkeypatch.setattr(resume, "atomic_write", lambda path, write: (writes.append(os.path.basename(path)),
                                                                     real(path, write)))
    checkpoint = BlockCheckpoint(str(tmp_path), "io")
    _quantize("opt", StatefulNoisyMethod(), checkpoint)
    blocks = sorted(w for w in writes if w.startswith("block-"))
    assert blocks == [f"block-{i:04d}.pt" for i in range(N_BLOCKS)]
    assert writes.count("state.pt") == N_BLOCKS and writes.count("progress.json") == N_BLOCKS
    assert sorted(os.listdir(checkpoint.folder)) == blocks + ["progress.json", "state.pt"]
    checkpoint.remove()
    assert not os.path.exists(checkpoint.folder)


def test_an_unreadable_checkpoint_starts_over_and_says_so(tmp_path, caplog):
    checkpoint = BlockCheckpoint(str(tmp_path), "torn")
    with pytest.raises(Stop):
        _quantize("opt", StatefulNoisyMethod(stop_at=2), checkpoint)
    os.remove(checkpoint.block_path(1))
    ref_model, _, _ = _quantize("opt", StatefulNoisyMethod())
    model, _, _ = _quantize("opt", StatefulNoisyMethod(), checkpoint)
    assert "cannot read the checkpoint" in caplog.text and "starting over" in caplog.text
    _assert_same_weights(model, ref_model)
    assert json.loads(open(os.path.join(checkpoint.folder, "progress.json")).read())["next_block"] == N_BLOCKS


class SlowMethod(StatefulNoisyMethod):
    """Each block takes at least 0.2 s."""

    def quantize_block(self, ctx) -> None:
        if ctx.index == self.stop_at:
            raise Stop
        time.sleep(0.2)


def test_a_resumed_run_counts_the_time_of_its_earlier_segment(tmp_path):
    checkpoint = BlockCheckpoint(str(tmp_path), "run")
    with pytest.raises(Stop):
        _quantize("opt", SlowMethod(stop_at=2), checkpoint)
    assert torch.load(checkpoint.path, weights_only=True)["elapsed_s"] >= 0.4  # blocks 0 and 1
    _, result, _ = _quantize("opt", SlowMethod(), checkpoint)
    assert 0.4 <= result.earlier_s < 5
