"""Tables from run records and the papers' numbers (experiments/tables.py, results/paper/, conf/tables/)."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments import tables

REPO = Path(__file__).resolve().parents[1]
PAPER_DIR = REPO / "results" / "paper"
COLUMNS = ["paper", "table", "model", "method", "w_bits", "a_bits", "group", "dataset", "metric", "value",
           "calibration", "protocol", "note"]
KEY = ["paper", "table", "model", "method", "w_bits", "a_bits", "group", "dataset", "metric", "calibration"]

DEMO_SPEC = """
title: demo
paper:
  - {csv: demo.csv, tables: ["Table 1"]}
metric: ppl
datasets: [wikitext2, c4-new]
models: [m-a, m-b]
methods:
  - {ours: gptq, label: GPTQ}
  - {ours: aespa, label: aespa}
settings:
  - {w_bits: 3}
  - {w_bits: 2}
"""
DEMO_PAPER = """paper,table,model,method,w_bits,a_bits,group,dataset,metric,value,calibration,protocol,note
x,Table 1,m-a,fp16,16,16,-1,wikitext2,ppl,20.0,none,wikitext2,
x,Table 1,m-a,gptq,3,16,-1,wikitext2,ppl,30.0,c4,wikitext2,
x,Table 1,m-b,gptq,3,16,-1,c4-new,ppl,1.3e3,c4,c4-new,
x,Table 1,m-a,aespa,2,16,-1,wikitext2,ppl,NaN,c4,wikitext2,paper reports NaN
x,Table 1,m-b,aespa,2,16,-1,c4-new,ppl,,c4,c4-new,OOM
x,Table 2,m-a,aespa,3,16,-1,wikitext2,ppl,99.0,c4,wikitext2,another table: not used
"""


def record(run_id, method, w_bits, ppl, model="m-a", seed=0, status="ok", group_size=-1, calib="c4"):
    """A run record as the runner writes it (only the fields the tables read, plus a few others)."""
    return {"schema": 1, "run_id": run_id, "status": status, "model": model, "family": "opt", "method": method,
            "w_bits": w_bits, "a_bits": 16, "group_size": group_size, "sym": False, "seed": seed,
            "calib": {"dataset": calib, "nsamples": 128, "seqlen": 512},
            "metrics": {"ppl": ppl, "zeroshot": {}}, "time": {"quantize_s": 12.0, "eval_s": 1.0},
            "memory": {"peak_device_bytes": 0, "peak_rss_bytes": 2**30}, "config": {"seed": seed}, "notes": []}


DEMO_RECORDS = [
    record("fp0", "none", 16, {"wikitext2": 20.5, "c4-new": None}),
    record("g3s0", "gptq", 3, {"wikitext2": 31.0, "c4-new": 40.0}, seed=0),
    record("g3s1", "gptq", 3, {"wikitext2": 33.0, "c4-new": 42.0}, seed=1),
    record("g3s2", "gptq", 3, {"wikitext2": 35.0}, seed=2),                    # c4-new not evaluated
    record("g3grp", "gptq", 3, {"wikitext2": 1.0}, group_size=128),            # another group size
    record("g3fail", "gptq", 3, {"wikitext2": 1.0}, model="m-b", status="failed"),
    record("g2", "gptq", 2, {"wikitext2": 80.0}),
    record("a2", "aespa", 2, {"wikitext2": 50.0}),
]

# the whole table, cell by cell (Setting, Method, m-a wikitext2, m-a c4-new, m-b wikitext2, m-b c4-new)
DEMO_EXPECTED = [
    ["FP16", "none", "20.5; paper 20.0; Δ +0.5", "—", "—", "—"],
    ["W3", "GPTQ", "33 ± 2 (n=3); paper 30.0; Δ +3", "41 ± 1.414 (n=2)", "—", "—; paper 1.3e3"],
    ["W3", "aespa", "—", "—", "—", "—"],
    ["W2", "GPTQ", "80", "—", "—", "—"],
    ["W2", "aespa", "50; paper NaN", "—", "—", "—; paper OOM"],
]


@pytest.fixture
def demo(tmp_path):
    """A spec, a paper CSV and hand-written records (with files the reader must skip) in a tmp dir."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "demo.yaml").write_text(DEMO_SPEC)
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "demo.csv").write_text(DEMO_PAPER)
    runs = tmp_path / "runs" / "sweep" / "0"
    runs.mkdir(parents=True)
    for rec in DEMO_RECORDS:
        (runs / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    (runs / ".tmp-partial.json").write_text('{"schema": 1, "run_')                 # a write in progress
    (tmp_path / "runs" / "wandb-summary.json").write_text('{"ppl": 1.0}')         # not a record
    return tmp_path


def build_demo(root):
    spec = tables.load_spec("demo", root / "conf")
    return spec, tables.build_table(spec, tables.load_records(root / "runs"), root / "paper")


def test_demo_table_has_exactly_the_expected_cells(demo):
    spec, cells = build_demo(demo)
    header, body = tables.grid(spec, cells)
    assert header == ["Setting", "Method", "m-a wikitext2", "m-a c4-new", "m-b wikitext2", "m-b c4-new"]
    assert body == DEMO_EXPECTED


def test_deltas_and_means_are_ours_minus_paper(demo):
    _, cells = build_demo(demo)
    cell = cells.set_index(["setting", "method", "model", "dataset"])
    fp16 = cell.loc[("FP16", "none", "m-a", "wikitext2")]
    assert (fp16["n"], fp16["ours_mean"], fp16["paper_value"], fp16["delta"]) == (1, 20.5, 20.0, 0.5)
    gptq = cell.loc[("W3", "GPTQ", "m-a", "wikitext2")]
    assert (gptq["n"], gptq["ours_mean"], gptq["ours_std"], gptq["delta"]) == (3, 33.0, 2.0, 3.0)
    assert gptq["run_ids"] == "g3s0 g3s1 g3s2"
    two_seeds = cell.loc[("W3", "GPTQ", "m-a", "c4-new")]
    assert two_seeds["n"] == 2 and two_seeds["ours_std"] == pytest.approx(math.sqrt(2))
    assert cell.loc[("W3", "GPTQ", "m-b", "c4-new")]["paper_value"] == 1300.0
    # a paper NaN or OOM gives no delta
    assert math.isnan(cell.loc[("W2", "aespa", "m-a", "wikitext2")]["delta"])


def test_missing_cells_are_marked_never_filled(demo):
    _, cells = build_demo(demo)
    empty = cells[cells["n"] == 0]
    # 15 of the 20 cells have no successful record of their exact configuration
    assert len(empty) == 15
    assert empty["ours_mean"].isna().all() and empty["delta"].isna().all()
    failed_only = cells.set_index(["setting", "method", "model", "dataset"]).loc[("W3", "GPTQ", "m-b", "wikitext2")]
    assert failed_only["n"] == 0 and tables.cell_text(failed_only) == "—"


def test_runs_of_another_setting_are_not_averaged_as_seeds(demo, caplog):
    """A later run with 16 calibration samples is another setting, not a fourth seed of the
    128-sample runs: the cell shows the setting run last, and says what it left out."""
    small = record("g3n16", "gptq", 3, {"wikitext2": 90.0}, seed=0)
    small["calib"]["nsamples"], small["created"] = 16, "2030-01-01T00:00:00+00:00"
    (demo / "runs" / "g3n16.json").write_text(json.dumps(small))
    _, cells = build_demo(demo)
    cell = cells.set_index(["setting", "method", "model", "dataset"]).loc[("W3", "GPTQ", "m-a", "wikitext2")]
    assert (cell["n"], cell["ours_mean"], cell["run_ids"]) == (1, 90.0, "g3n16")
    assert "W3 GPTQ on m-a: 3 record(s) of another setting left out" in caplog.text


def test_runs_of_another_model_folder_with_the_same_name_are_not_seeds(demo, caplog):
    """Same model name, other weights (another model.path, another fingerprint): not a seed."""
    other = record("g3other", "gptq", 3, {"wikitext2": 50.0}, seed=5)
    other["config"]["model"] = {"path": "/elsewhere/m-a"}
    other["model_fingerprint"], other["created"] = "0123456789abcdef", "2030-01-01T00:00:00+00:00"
    (demo / "runs" / "g3other.json").write_text(json.dumps(other))
    _, cells = build_demo(demo)
    cell = cells.set_index(["setting", "method", "model", "dataset"]).loc[("W3", "GPTQ", "m-a", "wikitext2")]
    assert (cell["n"], cell["ours_mean"]) == (1, 50.0)
    assert "record(s) of another setting left out" in caplog.text


def test_cli_writes_markdown_latex_and_csv(demo, capsys):
    out = demo / "out"
    assert tables.main(["demo", "--conf", str(demo / "conf"), "--paper", str(demo / "paper"),
                        "--runs", str(demo / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| W3 | GPTQ | 33 ± 2 (n=3); paper 30.0; Δ +3 | 41 ± 1.414 (n=2) | — | —; paper 1.3e3 |" in printed
    assert (out / "demo.md").read_text() in printed
    tex = (out / "demo.tex").read_text()
    assert r"W3 & GPTQ & 33 $\pm$ 2 (n=3); paper 30.0; $\Delta$ +3 & 41 $\pm$ 1.414 (n=2) & -- & --; paper 1.3e3 \\" in tex
    written = pd.read_csv(out / "demo.csv")
    assert len(written) == 20 and written["delta"].dropna().tolist() == [0.5, 3.0]


def test_real_spec_compares_with_the_paper_and_filters_calibration(tmp_path):
    spec = tables.load_spec("aespa_table1", REPO / "conf" / "tables")
    records = [record("c4run", "aespa", 2, {"wikitext2": 70.0, "c4-new": 57.0}, model="opt-125m"),
               record("wvrun", "aespa", 2, {"wikitext2": 1.0}, model="opt-125m", calib="wikivital"),
               record("fp", "none", 16, {"wikitext2": 27.7}, model="opt-125m", calib="wikivital")]
    cell = tables.build_table(spec, records, PAPER_DIR).set_index(["setting", "method", "model", "dataset"])
    aespa = cell.loc[("INT2", "aespa", "opt-125m", "wikitext2")]
    assert (aespa["n"], aespa["paper"]) == (1, "71.18") and aespa["delta"] == pytest.approx(-1.18)
    assert tables.cell_text(aespa) == "70; paper 71.18; Δ -1.18"
    assert tables.cell_text(cell.loc[("INT2", "aespa", "opt-125m", "c4-new")]) == "57; paper 56.88; Δ +0.12"
    assert tables.cell_text(cell.loc[("FP16", "none", "opt-125m", "wikitext2")]) == "27.7; paper 27.65; Δ +0.05"
    assert tables.cell_text(cell.loc[("INT4", "BRECQ", "llama-7b", "c4-new")]) == "—; paper OOM"


@pytest.mark.parametrize("name", tables.spec_names(REPO / "conf" / "tables"))
def test_every_spec_builds_without_runs(name):
    spec = tables.load_spec(name, REPO / "conf" / "tables")
    cells = tables.build_table(spec, [], PAPER_DIR)
    assert (cells["n"] == 0).all() and cells["ours_mean"].isna().all()
    if name == "tiny":
        assert (cells["paper"] == "").all()
    else:  # each paper spec finds most of its paper numbers
        assert (cells["paper"] != "").mean() > 0.5


def test_paper_lookup_spot_checks():
    def paper(name, setting, method, model, dataset):
        spec = tables.load_spec(name, REPO / "conf" / "tables")
        cells = tables.build_table(spec, [], PAPER_DIR)
        hit = cells[(cells["setting"] == setting) & (cells["method"] == method) & (cells["model"] == model)
                    & (cells["dataset"] == dataset)]
        return hit["paper"].iloc[0]
    assert paper("gptq_opt", "W3", "GPTQ", "opt-175b", "wikitext2") == "8.68"
    assert paper("gptq_opt", "FP16", "none", "opt-125m", "c4-new") == "26.56"
    assert paper("aespa_layerwise", "INT2", "Z-FOLD", "opt-1.3b", "ptb-new") == "53.80"
    assert paper("omniquant_weight_only", "W2 g64", "OmniQuant", "llama-2-7b", "wikitext2") == "9.62"
    # OmniQuant's own table first, QLLM's for QLLM rows; C4 here is the legacy loader
    assert paper("weight_activation", "W4A4", "SmoothQuant", "llama-7b", "wikitext2") == "25.25"
    assert paper("weight_activation", "W4A4", "QLLM", "llama-2-7b", "c4") == "13.26"
    assert paper("weight_activation", "FP16", "none", "llama-7b", "c4") == "7.08"
    # aespa Table 14: hours are converted to minutes
    assert paper("aespa_cost", "INT2", "aespa", "opt-6.7b", "") == "614.4"


@pytest.mark.parametrize("path", sorted(PAPER_DIR.glob("*.csv")), ids=lambda p: p.name)
def test_reference_csv_is_tidy(path):
    df = tables.read_paper_csv(path)
    assert list(df.columns) == COLUMNS
    assert len(df) > 0
    assert df["paper"].isin(["aespa", "gptq", "omniquant", "qllm", "boa", "turboboa"]).all()
    assert df["table"].str.fullmatch(r"Table [A-Z]?\d*|README").all() and (df["table"] != "Table ").all()
    for col in ("w_bits", "a_bits", "group"):
        assert df[col].str.fullmatch(r"-?\d+").all(), col
    assert df["metric"].isin(["ppl", "ppl_std", "acc", "time_min", "time_h", "memory_gb", "gflops"]).all()
    empty = df["value"] == ""
    assert df.loc[empty, "note"].str.startswith("OOM").all()
    printed = df[~empty]
    values = printed["value"].map(float)                               # every other value is a number ...
    nan = values.isna()
    assert printed.loc[nan, "value"].eq("NaN").all()                  # ... or the paper's NaN, with a note
    assert printed.loc[nan, "note"].str.startswith("paper reports NaN").all()
    assert (values[~nan] > 0).all()
    assert not df.duplicated(KEY).any()


def test_reference_numbers_keep_the_loaders_apart():
    rows = pd.concat(tables.read_paper_csv(p) for p in PAPER_DIR.glob("*.csv"))
    fp16 = rows[(rows["method"] == "fp16") & (rows["model"] == "opt-125m")]
    by_dataset = fp16.groupby("dataset")["value"].agg(set)
    assert by_dataset["c4"] == {"24.60"} and by_dataset["c4-new"] == {"26.56"}
    assert by_dataset["ptb"] == {"32.54"} and by_dataset["ptb-new"] == {"38.99"}
    assert set(rows.loc[rows["dataset"] == "c4", "protocol"]) == {"c4-legacy"}


def test_unknown_table_name_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "experiments.tables", "no_such_table"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().split("\n")
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert re.search(r"unknown table 'no_such_table'; allowed: .*aespa_table1.*tiny", lines[0])
