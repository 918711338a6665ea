"""Plotting functions draw the expected lines from hand-written records; the results notebook
runs top to bottom on the records of a small sweep."""
import os

import pandas as pd
import pytest

from experiments.plots import ppl_vs_bits, records_frame, time_vs_model_size, time_vs_ppl
from tests.conftest import REPO, compose


def record(model, method, bits, ppl, seconds, size, seed=0, a_bits=16, status="ok"):
    return {"schema": 1, "run_id": f"{model}-{method}-{bits}-{a_bits}-{seed}", "status": status, "model": model,
            "method": method, "w_bits": bits, "a_bits": a_bits, "group_size": -1, "seed": seed,
            "metrics": {"ppl": {"wikitext2": ppl}, "zeroshot": {}}, "time": {"quantize_s": seconds},
            "config": {"model": {"name": model, "size_b": size}}}


RECORDS = [
    record("opt-a", "rtn", 2, 400.0, 1.0, 0.1), record("opt-a", "rtn", 3, 40.0, 3.0, 0.1),
    record("opt-a", "rtn", 3, 60.0, 5.0, 0.1, seed=1), record("opt-a", "rtn", 4, 30.0, 2.0, 0.1),
    record("opt-a", "gptq", 3, 35.0, 10.0, 0.1), record("opt-a", "gptq", 4, 29.0, 12.0, 0.1),
    record("opt-a", "none", 16, 28.0, 0.0, 0.1), record("opt-a", "none", 3, 28.0, 0.0, 0.1, seed=1),
    record("opt-a", "rtn", 4, 900.0, 2.0, 0.1, a_bits=4),   # weight-activation: not on the weight-only plot
    record("opt-a", "gptq", 2, 1.0, 1.0, 0.1, status="failed"),
    record("opt-b", "rtn", 3, 20.0, 30.0, 1.3), record("opt-b", "gptq", 3, 15.0, 110.0, 1.3),
]


def lines(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_ppl_vs_bits_one_panel_per_model_one_line_per_method():
    fig = ppl_vs_bits(records_frame(RECORDS), "wikitext2")
    a, b = fig.axes
    assert (a.get_title(), b.get_title(), a.get_yscale()) == ("opt-a", "opt-b", "log")
    assert lines(a) == {"gptq": ([3, 4], [35.0, 29.0]), "rtn": ([2, 3, 4], [400.0, 50.0, 30.0]),
                        "FP": ([0, 1], [28.0, 28.0])}
    assert lines(b) == {"gptq": ([3], [15.0]), "rtn": ([3], [20.0])}


def test_time_vs_model_size_is_log_log_one_line_per_method():
    ax = time_vs_model_size(records_frame(RECORDS), w_bits=3).axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert lines(ax) == {"gptq": ([0.1, 1.3], [10.0, 110.0]), "rtn": ([0.1, 1.3], [4.0, 30.0])}
    all_bits = lines(time_vs_model_size(records_frame(RECORDS)).axes[0])
    assert all_bits["rtn"] == ([0.1, 1.3], [pytest.approx(2.6), 30.0])  # mean of 1, 3, 5, 2, 2 s on opt-a
    assert all_bits["gptq"] == ([0.1, 1.3], [11.0, 110.0])  # the failed run is left out


def test_time_vs_ppl_from_cost_points(tmp_path):
    csv = tmp_path / "cost.csv"
    csv.write_text("method,wall_s,ppl,iters\nbrecq,400,30,2000\nbrecq,40,60,200\nbrecq,4000,25,20000\naespa,20,28,\n")
    ax = time_vs_ppl(str(csv)).axes[0]
    assert lines(ax) == {"aespa": ([20], [28]), "brecq": ([40, 400, 4000], [60, 30, 25])}
    with pytest.raises(ValueError, match="cost points need columns method, wall_s, ppl"):
        time_vs_ppl(pd.DataFrame({"method": ["aespa"], "wall_s": [20.0]}))


def test_time_vs_ppl_reads_the_cost_benchmark_csv(tmp_path):
    csv = tmp_path / "cost_tiny-opt_w2.csv"
    csv.write_text("method,iters/block,time,time_s,PPL\nfull precision,-,0.0 s,0.0,85.97\n"
                   "BRECQ (iters=100),100,2.1 min,126.0,150.10\nBRECQ (iters=25),25,40.0 s,40.0,190.50\n"
                   "BRECQ (projected; 20000 iters),20000,projected 7.0 h,25200.0,-\naespa,-,20.0 s,20.0,140.00\n")
    assert lines(time_vs_ppl(str(csv)).axes[0]) == {"aespa": ([20.0], [140.0]),
                                                    "BRECQ": ([40.0, 126.0], [190.5, 150.1])}


def test_notebook_runs_on_the_records_of_a_small_sweep(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from experiments.runner import run

    runs = tmp_path / "runs"
    for method, bits in (("rtn", 3), ("rtn", 4), ("none", 16)):
        run(compose("model=tiny-opt", f"method={method}", f"bits={bits}", "nsamples=4", "eval.max_windows=4",
                    "progress=false", "resume=false", f"results_dir={runs}"))
    cost = tmp_path / "bench"
    cost.mkdir()
    (cost / "cost_tiny-opt_w2.csv").write_text("method,wall_s,ppl\nbrecq,40,60\nbrecq,400,30\naespa,20,28\n")
    (cost / "cost_tiny-opt_w2_flops.csv").write_text("layer,shape,brecq,aespa\nq,256x256,1.0,0.1\n")
    monkeypatch.setenv("RESULTS_RUNS", str(runs))
    monkeypatch.setenv("COST_POINTS", str(cost))
    notebook = nbformat.read(os.path.join(REPO, "notebooks", "results.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("3 records in" in o.get("text", "") for o in outputs)
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # PPL vs bits (wikivital), time vs size, time vs PPL
