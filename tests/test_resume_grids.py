"""Resume with the grids that test_resume.py's one-configuration-per-method sweep does not reach:
aespa per channel on OPT (ζ on q/k/v, o and fc2) and Z-FOLD with group grids on LLaMA, each stopped
after block 1 and resumed: the weights, every grid field (ζ included), the phases and the notes
equal the uninterrupted run's bit for bit. And what a save writes: the block just done and any
block file missing, never an older one again."""
import os

import pytest
import torch

from aespa.core.checkpoint import BlockCheckpoint
from aespa.core.grid import Grid
from aespa.core.method import QuantSpec
from tests.test_resume import Stop, _assert_same_weights, _quantize, stopping

CASES = [
    ("opt", "aespa", QuantSpec(bits=2), {"iters": 5, "zfold_rounds": 2}),
    ("llama", "zfold", QuantSpec(bits=3, group_size=16), {"zfold_rounds": 2}),
]


@pytest.mark.parametrize("arch,name,spec,options", CASES, ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_resumed_after_block_1_equals_the_uninterrupted_run(arch, name, spec, options, tmp_path):
    ref_model, ref, ref_ppl = _quantize(arch, stopping(name, spec, options))
    checkpoint = BlockCheckpoint(str(tmp_path), name)
    with pytest.raises(Stop):
        _quantize(arch, stopping(name, spec, options, stop_at=1), checkpoint)
    saved = torch.load(checkpoint.path, weights_only=True)
    assert saved["next_block"] == 1 and saved["run_id"] == name
    assert all(key.startswith("0.") for key in saved["grids"])  # block 0's grids, ζ in the saved dict
    assert any("col_scale" in g for g in saved["grids"].values())
    model, result, ppl = _quantize(arch, stopping(name, spec, options), checkpoint)
    assert ppl == ref_ppl
    _assert_same_weights(model, ref_model)
    assert list(result.grids) == list(ref.grids)
    folded = 0
    for key, grid in ref.grids.items():
        mine = result.grids[key]
        assert isinstance(mine, Grid) and (mine.bits, mine.group_size) == (grid.bits, grid.group_size), key
        assert torch.equal(mine.scale, grid.scale) and torch.equal(mine.zero, grid.zero), key
        assert (mine.col_scale is None) == (grid.col_scale is None), key
        if grid.col_scale is not None:
            folded += 1
            assert torch.equal(mine.col_scale, grid.col_scale), key
    assert folded >= 3 * 4  # q, k, v of every block at least
    assert result.phases.keys() == ref.phases.keys()
    assert result.notes == ref.notes + ["resumed at block 1 of 4"]


def test_removing_a_missing_checkpoint_is_not_an_error(tmp_path):
    checkpoint = BlockCheckpoint(str(tmp_path), "never-written")
    checkpoint.remove()
    assert checkpoint.progress() is None and not (tmp_path / "never-written").exists()


def test_save_writes_the_last_block_and_any_missing_one(tmp_path):
    from conftest import random_model

    from aespa.core.adapters import ModelAdapter
    from aespa.core.method import get_method
    from aespa.core.pipeline import QuantizeResult

    adapter = ModelAdapter(random_model("opt", layers=3))
    method = get_method("rtn")(QuantSpec(bits=3))
    checkpoint = BlockCheckpoint(str(tmp_path), "run")
    assert checkpoint.folder == os.path.join(str(tmp_path), "run")  # one folder per run id
    state = {"next_block": 2, "result": QuantizeResult({}, {}, [], 0.0), "q_in": torch.zeros(1, 2, 64), "fp_in": None,
             "kwargs": {}}

    def saved_weight(i):
        return torch.load(checkpoint.block_path(i), weights_only=True)["weights"]["fc1.weight"]

    checkpoint.save(adapter, method, state)  # block 0's file is missing too: both are written
    first = [adapter.block(i).module.fc1.weight.detach().clone() for i in range(2)]
    assert all(torch.equal(saved_weight(i), first[i]) for i in range(2))
    assert not os.path.exists(checkpoint.block_path(2))
    for i in range(2):
        adapter.block(i).module.fc1.weight.data += 1.0
    checkpoint.save(adapter, method, state)  # block 1 (the last done) is written again, block 0 is kept
    assert torch.equal(saved_weight(0), first[0])
    assert torch.equal(saved_weight(1), adapter.block(1).module.fc1.weight)
    assert torch.load(checkpoint.path, weights_only=True)["elapsed_s"] == 0.0  # no time recorded: 0


@pytest.mark.parametrize("which", ["state", "block"])
def test_a_checkpoint_never_unpickles_arbitrary_objects(tmp_path, which, caplog):
    """Loaded with weights_only: a file holding any other object is not read (the run starts over)."""
    import datetime

    from conftest import random_model

    from aespa.core.adapters import ModelAdapter
    from aespa.core.method import get_method
    from aespa.core.pipeline import QuantizeResult

    adapter = ModelAdapter(random_model("opt", layers=2))
    method = get_method("rtn")(QuantSpec(bits=3))
    checkpoint = BlockCheckpoint(str(tmp_path), "run")
    checkpoint.save(adapter, method, {"next_block": 1, "result": QuantizeResult(), "q_in": torch.zeros(1, 2, 64),
                                      "fp_in": None, "kwargs": {}})
    assert checkpoint.load(adapter, method)["q_in"].device.type == "cpu"  # the model's device by default
    assert checkpoint.load(adapter, method, device="meta")["q_in"].device.type == "meta"
    path = checkpoint.path if which == "state" else checkpoint.block_path(0)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "extra": datetime.date(2020, 1, 1)}, path)
    assert checkpoint.load(adapter, method) is None
    assert f"cannot read the checkpoint in {checkpoint.folder} (UnpicklingError: " in caplog.text
    assert caplog.text.rstrip().endswith("starting over")


def test_a_checkpoint_saved_with_cuda_generators_resumes_on_the_cpu(tmp_path):
    from conftest import random_model

    from aespa.core.adapters import ModelAdapter
    from aespa.core.method import get_method
    from aespa.core.pipeline import QuantizeResult

    if torch.cuda.is_available():
        pytest.skip("a machine without CUDA is the case")
    adapter = ModelAdapter(random_model("opt", layers=2))
    method = get_method("rtn")(QuantSpec(bits=3))
    checkpoint = BlockCheckpoint(str(tmp_path), "run")
    checkpoint.save(adapter, method, {"next_block": 1, "result": QuantizeResult(), "q_in": torch.zeros(1, 2, 64),
                                      "fp_in": None, "kwargs": {}})
    payload = torch.load(checkpoint.path, weights_only=True)
    payload["rng"]["cuda"] = [torch.get_rng_state()]  # as a GPU machine saves it
    torch.save(payload, checkpoint.path)
    assert checkpoint.load(adapter, method)["next_block"] == 1  # the CUDA states are left alone


def test_a_checkpoint_loads_every_stream_onto_the_device_asked_for(tmp_path):
    from conftest import random_model

    from aespa.core.adapters import ModelAdapter
    from aespa.core.method import get_method
    from aespa.core.pipeline import QuantizeResult

    adapter = ModelAdapter(random_model("opt", layers=2))
    method = get_method("rtn")(QuantSpec(bits=3))
    checkpoint = BlockCheckpoint(str(tmp_path), "run")
    checkpoint.save(adapter, method, {"next_block": 1, "result": QuantizeResult(), "q_in": torch.zeros(1, 2, 64),
                                      "fp_in": torch.ones(1, 2, 64), "kwargs": {"mask": torch.ones(1, 2)},
                                      "elapsed_s": 4.5})
    state = checkpoint.load(adapter, method, device="meta")
    assert [t.device.type for t in (state["q_in"], state["fp_in"], state["kwargs"]["mask"])] == ["meta"] * 3
    assert state["result"].earlier_s == 4.5
    payload = torch.load(checkpoint.path, weights_only=True)
    del payload["elapsed_s"]  # a checkpoint written before the time was kept
    torch.save(payload, checkpoint.path)
    assert checkpoint.load(adapter, method)["result"].earlier_s == 0.0
