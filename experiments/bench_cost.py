"""What quantization costs: aespa's headline claim (Table 14: BRECQ-level accuracy at a
fraction of block-wise reconstruction's time and memory), measured on this machine.

    python -m experiments.bench_cost --model tiny-opt --bits 2 --brecq-iters 25 100
    python -m experiments.bench_cost --model opt-125m --bits 2 --device cuda     # the defaults, for real

For one model and bit-width, every method (each a normal run through
``experiments.runner.run``, in its own process so that peak host RSS is its own) is
reported as a row of a table in the layout of aespa's Table 14: quantization wall time,
split by the method's phases, peak device memory, peak host RSS, and perplexity. Records
land in ``results/runs`` as usual; the tables (CSV, Markdown) and the plot go to
``results/bench/``.

BRECQ at its default 20 000 iterations per block is out of reach on a CPU. There the
benchmark runs BRECQ at a few affordable budgets (``--brecq-iters``; the schedule —
warm-up, β decay — scales with the budget), measures its time per iteration, reports the
time of the default count as **projected** (measured time outside the reconstruction +
per-iteration time × default iterations × blocks), and plots BRECQ's perplexity against
wall time with the other methods' (time, PPL) points. On a GPU, with no
``--brecq-iters``, it runs the default for real.

Beside the measured times it prints the analytic cost (``loss_flops``, ``layer_flops``),
derived from aespa's complexity analysis (Table 7: per-iteration cost of the loss):

- conventional block-wise reconstruction (BRECQ), per attention head, one iteration on a
  mini-batch of B sequences of L tokens: the head's query, key and value projections
  (3 × 2·B·L·d·d_h), its scores Q Kᵀ (2·B·L²·d_h) and the product with V (2·B·L²·d_h):
  ``6·B·L·d·d_h + 4·B·L²·d_h``;
- aespa, per head, with the pre-computed statistics: query and key losses
  ``tr(G ΔW H ΔWᵀ) = ⟨G ΔW, ΔW H⟩`` cost ΔW·H (2·d_h·d²) and G·ΔW (2·d_h²·d) each, the
  value loss ``⟨ΔW, ΔW H_V⟩`` costs 2·d_h·d²: ``6·d²·d_h + 4·d·d_h²``, independent of B, L.

With B = 4 and L = 2048 these two formulas reproduce every entry of Table 7 (OPT-125M to
13B: 6.7 / 7.5 / 11 / 15 / 34 / 41 and 0.24 / 0.42 / 1.6 / 3.2 / 13 / 20 GFLOPs) to the
digits printed (``tests/test_brecq.py``). Per layer of a block, ``layer_flops`` applies
the same counting to every linear: BRECQ's forward 2·B·L·out·in (plus the attention
core 4·B·L²·d per block); aespa's loss 2·out·in² (+ 2·d_h·out·in for q and k); GPTQ's
one-shot Hessian (2·N·in², once per input group), inverse (in³) and sweep (2·out·in²);
RTN's elementwise rounding (≈ 4·out·in). Loss FLOPs count the forward only; the backward
of an iterative method costs about twice as much, for both, so ratios hold.

Its command line is its own (argparse) rather than Hydra's: it orchestrates several runs
and reports on them; every run it starts is composed by Hydra from ``conf/`` exactly as
``run.py`` composes it (extra ``KEY=VALUE`` overrides pass through).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

import pandas as pd

from aespa.core.errors import UserError
from aespa.core.method import get_method
from aespa.core.options import defaults
from experiments.methods import load_methods
from experiments.tables import markdown_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("bench_cost")
CONF = os.path.join(REPO, "conf")
METHODS = ("rtn", "gptq", "aespa", "brecq", "omniquant")  # benchmarked by default (when registered)
LABELS = {"none": "full precision", "rtn": "RTN", "gptq": "OPTQ (GPTQ)", "aespa": "aespa", "brecq": "BRECQ",
          "omniquant": "OmniQuant",
          "zfold": "Z-FOLD"}
CPU_BRECQ_BUDGETS = (25, 100)  # iterations per block when no GPU runs the default


# --------------------------------------------------------------------------- analytic cost


def loss_flops(hidden: int, head_dim: int, batch: int, seqlen: int) -> dict[str, float]:
    """aespa Table 7: FLOPs of one iteration's loss, per attention head."""
    d, dh, b, n = hidden, head_dim, batch, seqlen
    return {"brecq": 6 * b * n * d * dh + 4 * b * n * n * dh, "aespa": 6 * d * d * dh + 4 * d * dh * dh}


@dataclass(frozen=True)
class LayerShape:
    role: str
    out_features: int
    in_features: int
    group_first: bool  # first linear of a group sharing one input (owns the group's Hessian)


def layer_flops(layers: list[LayerShape], hidden: int, head_dim: int, batch: int, seqlen: int,
                calib_tokens: int) -> list[dict]:
    """Per linear of one block: BRECQ's and aespa's loss FLOPs per iteration, GPTQ's and
    RTN's one-shot FLOPs (module docstring); a last row for BRECQ's attention core."""
    rows = []
    for layer in layers:
        o, i = layer.out_features, layer.in_features
        aespa = 2 * o * i * i + (2 * head_dim * o * i if layer.role in ("q", "k") else 0)
        gptq = (2 * calib_tokens * i * i if layer.group_first else 0) + i**3 + 2 * o * i * i
        rows.append({"layer": layer.role, "shape": f"{o}x{i}", "brecq": 2 * batch * seqlen * o * i, "aespa": aespa,
                     "gptq": gptq, "rtn": 4 * o * i})
    rows.append({"layer": "attention core", "shape": "-", "brecq": 4 * batch * seqlen * seqlen * hidden, "aespa": 0,
                 "gptq": 0, "rtn": 0})
    return rows


def model_shapes(model_path: str) -> tuple:
    """(geometry, layer shapes of one block, number of blocks) of a model, from its config
    alone (the model is built on the meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aespa.core.adapters import ModelAdapter
    from experiments.runner import in_repo

    local = in_repo(model_path)
    config = AutoConfig.from_pretrained(local if os.path.exists(local) else model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = ModelAdapter(model)
    block = adapter.block(0)
    firsts = {g.roles[0] for g in block.groups}
    layers = [LayerShape(r, lin.out_features, lin.in_features, r in firsts) for r, lin in block.linears().items()]
    return adapter.geometry, layers, len(adapter.blocks)


# --------------------------------------------------------------------------- runs


def run_config(overrides: list[str]) -> dict:
    """One run (composed like ``run.py``); its record."""
    from experiments.runner import compose, run

    return run(compose(overrides))


def run_isolated(overrides: list[str], threads: int | None = None) -> dict:
    """:func:`run_config` in a fresh process (its own peak RSS and thread count)."""
    from experiments import isolated

    return isolated.run_isolated(run_config, overrides, threads=threads)


def available_methods(requested: list[str] | None) -> list[str]:
    registered = load_methods()
    if requested is None:
        return [m for m in METHODS if m in registered]
    for name in requested:
        get_method(name)
    return requested


def method_defaults(name: str) -> dict:
    return defaults(get_method(name).Options)


@dataclass
class Row:
    method: str
    label: str
    iters: int | None  # per block, iterative methods
    record: dict | None = None
    projected_s: float | None = None  # BRECQ at the default count, not measured

    @property
    def time_s(self) -> float:
        return self.projected_s if self.record is None else self.record["time"]["quantize_s"]

    def phases(self) -> dict:
        return {} if self.record is None else self.record["time"]["phases"]

    def ppl(self) -> float | None:
        if self.record is None:
            return None
        return next(iter(self.record["metrics"]["ppl"].values()), None)


ITERATIVE_PHASE = {"brecq": "reconstruction", "aespa": "rounding"}


def per_iteration_s(row: Row, n_blocks: int) -> float | None:
    """Measured seconds of one iteration (all linears of a block) of an iterative method."""
    phase = ITERATIVE_PHASE.get(row.method)
    if row.record is None or phase is None or not row.iters or phase not in row.phases():
        return None
    return row.phases()[phase] / (row.iters * n_blocks)


def projected_brecq(measured: Row, default_iters: int, n_blocks: int) -> Row:
    """BRECQ at ``default_iters``: the measured time outside the reconstruction plus the
    measured time per iteration times the default count (labelled projected)."""
    per_iter = per_iteration_s(measured, n_blocks)
    fixed = measured.time_s - measured.phases()["reconstruction"]
    return Row("brecq", f"BRECQ (projected, {default_iters} iters)", default_iters,
               projected_s=fixed + per_iter * default_iters * n_blocks)


# --------------------------------------------------------------------------- report


def gib(n: float | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f}"


def fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def flops_per_block_iteration(method: str, flops: list[dict]) -> float | None:
    if method not in ("brecq", "aespa"):
        return None
    return sum(r[method] for r in flops)


def main_table(rows: list[Row], n_blocks: int, flops: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        rec = r.record
        per_iter = per_iteration_s(r, n_blocks)
        per_block = flops_per_block_iteration(r.method, flops)
        out.append({
            "method": r.label,
            "iters/block": "-" if r.iters is None else r.iters,
            "time": ("projected " if rec is None else "") + fmt_time(r.time_s),
            "time_s": round(r.time_s, 3),
            "phases (s)": "-" if rec is None else ", ".join(f"{k} {v:.1f}" for k, v in r.phases().items()),
            "peak device (GiB)": "-" if rec is None else gib(rec["memory"]["peak_device_bytes"]),
            "peak host RSS (GiB)": "-" if rec is None else gib(rec["memory"]["peak_rss_bytes"]),
            "PPL": "-" if r.ppl() is None else f"{r.ppl():.2f}",
            "ms/iteration (block)": "-" if per_iter is None else f"{1e3 * per_iter:.2f}",
            "loss GFLOP/iteration (block)": "-" if per_block is None else f"{per_block / 1e9:.3g}",
        })
    return out


def markdown(table: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(table[0])
    return markdown_table(columns, [[row[c] for c in columns] for row in table])


def write_csv(path: str, table: list[dict]) -> None:
    pd.DataFrame(table).to_csv(path, index=False)


def plot_ppl_vs_time(rows: list[Row], table: list[dict], path: str, title: str) -> str:
    """``experiments.plots.time_vs_ppl`` over the table (BRECQ's budgets as one line, every
    other method's (time, PPL) point), with the iteration budgets annotated, full precision
    as a dotted line and BRECQ's projected default time as a dashed vertical line."""
    import pandas as pd

    from experiments.plots import time_vs_ppl

    fig = time_vs_ppl(pd.DataFrame(table), title)
    ax = fig.axes[0]
    for r in rows:
        if r.method == "brecq" and r.record is not None and r.ppl() is not None:
            ax.annotate(f"{r.iters} it/block", (r.time_s, r.ppl()), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        elif r.method == "brecq":
            ax.axvline(r.time_s, color="tab:red", linestyle="--", linewidth=1)
            ax.annotate(f"BRECQ, {r.iters} it/block:\nprojected time", (r.time_s, 0.5),
                        xycoords=("data", "axes fraction"), ha="right", va="center", fontsize=7, color="tab:red")
        elif r.method == "none" and r.ppl() is not None:
            ax.axhline(r.ppl(), color="black", linestyle=":", linewidth=1, label=f"full precision ({r.ppl():.1f})")
    ax.set_xlabel("quantization wall time (s)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-opt", help="conf/model/<name>.yaml")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"default: those of {', '.join(METHODS)} that are registered and configured")
    p.add_argument("--brecq-iters", type=int, nargs="+", default=None,
                   help="BRECQ budgets (iterations per block); default: the method's default on CUDA, "
                        f"{' '.join(map(str, CPU_BRECQ_BUDGETS))} on CPU")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a knob of one method's runs, e.g. omniquant.epochs=2 (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (default: torch's choice); 1 gives steady times on a shared machine")
    p.add_argument("--reuse", action="store_true", help="reuse existing records of the same configuration")
    p.add_argument("overrides", nargs="*", help="more run.py overrides for every run, e.g. nsamples=32")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench_cost] %(message)s")
    try:
        return bench(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def bench(args) -> int:
    from experiments.runner import compose, in_repo, resolve_device

    model_file = os.path.join(CONF, "model", f"{args.model}.yaml")
    if not os.path.exists(model_file):
        raise UserError(f"unknown model {args.model!r}; allowed: "
                        + ", ".join(sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "model")))))
    if args.brecq_iters is not None and any(n < 0 for n in args.brecq_iters):
        raise UserError("--brecq-iters takes iteration counts >= 0")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads={args.threads} is not allowed; use a positive count")
    device = resolve_device(args.device)
    methods = available_methods(args.methods)
    options: dict[str, list[str]] = {}
    for item in args.option:
        name, dot, knob = item.partition(".")
        if not dot or "=" not in knob or name not in methods:
            raise UserError(f"--option {item!r} is not allowed; use METHOD.KEY=VALUE with METHOD one of "
                            f"{', '.join(methods)}")
        options.setdefault(name, []).append(f"method.{knob}")
    common = [f"model={args.model}", f"bits={args.bits}", f"device={args.device}", "progress=false", "resume=false",
              f"force={str(not args.reuse).lower()}", *args.overrides]
    probe = compose(common)
    seqlen, nsamples = probe.seqlen or probe.model.seqlen, probe.nsamples
    geometry, layers, n_blocks = model_shapes(probe.model.path)

    brecq_default = method_defaults("brecq")["iters"] if "brecq" in methods else None
    budgets = args.brecq_iters or ([brecq_default] if device.type == "cuda" else list(CPU_BRECQ_BUDGETS))
    rows: list[Row] = []
    for name in ["none", *methods]:
        runs = [(b, [f"method.iters={b}"]) for b in budgets] if name == "brecq" else [(None, [])]
        for iters, extra in runs:
            extra = options.get(name, []) + extra
            log.info(f"{args.model} W{args.bits}: {name}" + (f" ({iters} iterations/block)" if iters else ""))
            try:
                record = run_isolated(common + [f"method={name}", *extra], args.threads)
            except RuntimeError as e:
                log.error(f"{name} failed: {e}")
                continue
            if iters is None and name == "aespa":
                iters = record["config"]["method"].get("iters")
            knobs = [k.removeprefix("method.") for k in extra]
            rows.append(Row(name, LABELS.get(name, name) + (f" ({', '.join(knobs)})" if knobs else ""), iters, record))

    brecq_runs = [r for r in rows if r.method == "brecq" and r.iters]
    if brecq_runs and max(r.iters for r in brecq_runs) < brecq_default:
        rows.append(projected_brecq(max(brecq_runs, key=lambda r: r.iters), brecq_default, n_blocks))

    batch = method_defaults("brecq")["windows_per_step"] if "brecq" in methods else 4
    flops = layer_flops(layers, geometry.hidden_size, geometry.head_dim, batch, seqlen, nsamples * seqlen)
    table = main_table(rows, n_blocks, flops)
    per_head = loss_flops(geometry.hidden_size, geometry.head_dim, batch, seqlen)
    ratios = time_ratios(rows)

    os.makedirs(in_repo(args.out), exist_ok=True)
    stem = os.path.join(in_repo(args.out), f"cost_{args.model}_w{args.bits}")
    env = next((r.record["env"] for r in rows if r.record), None)
    device_name = str(device) if env is None else env["device_name"] + (
        f", {env['threads']} CPU threads" if env["device"] == "cpu" else "")
    title = (f"{args.model} W{args.bits}: quantization time (Table 14 layout) on {device_name}, "
             f"{nsamples} x {seqlen} calibration tokens, {n_blocks} blocks")
    flop_table = [{"layer": r["layer"], "shape": r["shape"],
                   **{m: f"{r[m] / 1e6:.3g}" for m in ("brecq", "aespa", "gptq", "rtn")}} for r in flops]
    text = "\n".join([
        f"### {title}", "",
        markdown(table, [c for c in table[0] if c != "time_s"]) if table else "(no run finished)", "",
        *[f"- {line}" for line in ratios], "",
        f"### Analytic cost per layer of one block (MFLOPs; BRECQ, aespa: loss forward per iteration, "
        f"BRECQ batch {batch} x {seqlen} tokens; GPTQ, RTN: once)", "",
        markdown(flop_table), "",
        f"aespa Table 7 form, per head per iteration: block-wise (BRECQ) {per_head['brecq'] / 1e9:.3g} GFLOPs, "
        f"aespa {per_head['aespa'] / 1e9:.3g} GFLOPs (ratio {per_head['brecq'] / per_head['aespa']:.3g}x).", "",
    ])
    with open(stem + ".md", "w") as f:
        f.write(text)
    if table:
        write_csv(stem + ".csv", table)
    write_csv(stem + "_flops.csv", flop_table)
    plot = plot_ppl_vs_time(rows, table, stem + ".png", f"{args.model} W{args.bits}: perplexity vs quantization "
                                                          f"time\n({device_name})") if rows else None
    print(text)
    print(f"saved: {stem}.md, {stem}.csv, {stem}_flops.csv" + (f", {plot}" if plot else ""))
    return 0


def time_ratios(rows: list[Row]) -> list[str]:
    aespa = next((r for r in rows if r.method == "aespa" and r.record is not None), None)
    if aespa is None:
        return []
    lines = []
    for r in rows:
        if r.method == "brecq":
            kind = "projected" if r.record is None else "measured"
            lines.append(f"time aespa / BRECQ ({r.iters} iters, {kind}): {aespa.time_s / r.time_s:.3g}")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
