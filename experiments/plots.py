"""Plots over run records (``notebooks/results.ipynb`` draws them).

The records become one DataFrame row each (:func:`records_frame`, flattened with dotted
column names such as ``metrics.ppl.wikivital``, ``time.quantize_s``,
``config.model.size_b``); every plot is a query over that frame and averages the records
that fall on one point (seeds; filter the frame first to keep other knobs such as the
calibration set apart):

- :func:`ppl_vs_bits`: perplexity against weight bit-width, one panel per model, one line
  per method, full precision as a dashed horizontal line;
- :func:`time_vs_model_size`: quantization wall time against model size, one line per
  method, both axes logarithmic;
- :func:`time_vs_ppl`: the cost benchmark's points (method, wall_s, ppl), e.g. BRECQ's
  perplexity after growing iteration budgets against aespa's one point (also reads the CSV
  that ``experiments/bench_cost.py`` writes).

Each function returns a :class:`matplotlib.figure.Figure` (no pyplot state).
"""
from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from experiments.records import read_records

FULL_PRECISION = "none"
TIME = "time.quantize_s"
SIZE = "config.model.size_b"
COLUMNS = ["model", "method", "w_bits", "a_bits", "group_size", "seed", TIME, SIZE]  # of every record


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per successful record, nested fields flattened to dotted column names."""
    ok = [r for r in records if r.get("status", "ok") == "ok"]
    return pd.json_normalize(ok) if ok else pd.DataFrame(columns=COLUMNS)


def load_frame(folder: str) -> pd.DataFrame:
    """The records under ``folder`` (recursively) as a frame."""
    return records_frame(read_records(folder))


def ppl_vs_bits(frame: pd.DataFrame, dataset: str, a_bits: int = 16, group_size: int = -1) -> Figure:
    """Perplexity on ``dataset`` against weight bits, one panel per model, one line per method
    (mean over seeds; log scale), for runs with activations at ``a_bits`` and the given group
    size. Full-precision runs (method ``none``) are the dashed line "FP"."""
    column = f"metrics.ppl.{dataset}"
    if column not in frame:
        raise ValueError(f"no record has perplexity on {dataset!r}")
    rows = frame[frame[column].notna()]
    quantized = rows[(rows.method != FULL_PRECISION) & (rows.a_bits == a_bits) & (rows.group_size == group_size)]
    models = sorted(rows.model.unique())
    fig = Figure(figsize=(4.5 * max(len(models), 1), 3.6), layout="constrained")
    axes = fig.subplots(1, max(len(models), 1), squeeze=False)[0]
    for ax, model in zip(axes, models):
        of_model = quantized[quantized.model == model]
        for method, runs in of_model.groupby("method", sort=True):
            mean = runs.groupby("w_bits")[column].mean().sort_index()
            ax.plot(mean.index, mean.values, marker="o", label=method)
        fp = rows[(rows.model == model) & (rows.method == FULL_PRECISION)][column]
        if len(fp):
            ax.axhline(fp.mean(), color="black", linestyle="--", linewidth=1, label="FP")
        ax.set(title=model, xlabel="weight bits", ylabel=f"perplexity ({dataset})", yscale="log")
        ax.set_xticks(sorted(of_model.w_bits.unique()))
        ax.legend(fontsize="small")
    return fig


def time_vs_model_size(frame: pd.DataFrame, w_bits: int | None = None) -> Figure:
    """Quantization wall time against model size (billions of parameters), one line per method
    (mean over the records of each model, of ``w_bits`` only if given); log-log axes."""
    if SIZE not in frame:
        raise ValueError(f"no record carries a model size ({SIZE})")
    rows = frame[(frame.method != FULL_PRECISION) & frame[TIME].notna() & frame[SIZE].notna()]
    if w_bits is not None:
        rows = rows[rows.w_bits == w_bits]
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    for method, runs in rows.groupby("method", sort=True):
        mean = runs.groupby(SIZE)[TIME].mean().sort_index()
        ax.plot(mean.index, mean.values, marker="o", label=method)
    bits = f", W{w_bits}" if w_bits is not None else ""
    ax.set(xscale="log", yscale="log", xlabel="model size (billions of parameters)",
           ylabel="quantization time (s)", title=f"quantization time vs model size{bits}")
    if len(rows):
        ax.legend(fontsize="small")
    return fig


def cost_points(table: pd.DataFrame) -> pd.DataFrame:
    """The (method, wall_s, ppl) points of a cost table with a measured time and perplexity.

    ``table`` has those columns, or is the CSV of ``experiments/bench_cost.py`` (columns
    ``method`` — a label such as "BRECQ (iters=25)" —, ``time_s``, ``PPL``): there the points of
    one method are the labels that share the part before " (", and rows without a measured
    perplexity (projected times) are left out. Points at zero time (full precision) are left out.
    """
    if {"method", "wall_s", "ppl"} <= set(table.columns):
        points = table[["method", "wall_s", "ppl"]]
    elif {"method", "time_s", "PPL"} <= set(table.columns):
        points = pd.DataFrame({"method": table.method.astype(str).str.split(" (", regex=False).str[0],
                               "wall_s": table.time_s, "ppl": table.PPL})
    else:
        raise ValueError(f"cost points need columns method, wall_s, ppl (or bench_cost's method, time_s, PPL); "
                         f"got {', '.join(map(str, table.columns))}")
    points = points.assign(wall_s=pd.to_numeric(points.wall_s, errors="coerce"),
                           ppl=pd.to_numeric(points.ppl, errors="coerce")).dropna()
    return points[points.wall_s > 0]


def time_vs_ppl(table: pd.DataFrame | str, title: str = "perplexity vs quantization time") -> Figure:
    """The cost benchmark's plot: perplexity against quantization wall time (log scale), one line
    per method through its points in order of time (a method measured once is a single marker).
    ``table``: a frame or CSV path, read by :func:`cost_points`."""
    points = cost_points(pd.read_csv(table) if isinstance(table, str) else table)
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    for method, runs in points.groupby("method", sort=True):
        runs = runs.sort_values("wall_s")
        ax.plot(runs.wall_s, runs.ppl, marker="o", label=method)
    ax.set(xscale="log", xlabel="quantization time (s)", ylabel="perplexity", title=title)
    if len(points):
        ax.legend(fontsize="small")
    return fig
