"""Paper-style tables from run records, next to the papers' reported numbers.

    python -m experiments.tables                      # every spec in conf/tables/
    python -m experiments.tables aespa_table1 tiny    # some of them
    python -m experiments.tables --runs DIR --out DIR

A table spec (``conf/tables/<name>.yaml``) names the models, the measures (dataset x metric),
the rows (method x setting) and where the paper's numbers are (``results/paper/*.csv``).
Each cell shows "ours" — the mean over the run records of that configuration, ``mean ± std (n=k)``
over k > 1 records — then, where the paper has a number, "paper" and "Δ" (ours − paper).
A cell without records shows "—": nothing is ever filled in. The only inputs are the
records (JSON, searched recursively) and the paper CSVs.

Output: Markdown on stdout, and ``<name>.md``, ``<name>.tex`` (LaTeX tabular) and
``<name>.csv`` (one row per cell) under ``results/tables/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from experiments.records import read_records

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)
METRICS = ("ppl", "acc", "time_min", "time_h", "memory_gb", "rss_gb")
SPEC_KEYS = {"title", "caption", "models", "metric", "datasets", "measures", "methods", "settings", "fp16_row",
             "where", "paper"}
# a paper number in another unit of the same quantity: (paper metric, factor to our metric)
PAPER_UNITS = {"time_min": [("time_min", 1.0), ("time_h", 60.0)],
               "time_h": [("time_h", 1.0), ("time_min", 1 / 60)]}
MISSING = "—"
LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
         "~": r"\textasciitilde{}", "^": r"\^{}", "—": "--", "±": r"$\pm$", "Δ": r"$\Delta$", "−": "-"}


class TableError(Exception):
    """A user error (bad table name, bad spec): reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- specs

def spec_names(conf_dir: Path) -> list[str]:
    """Names of the table specs in ``conf_dir`` (file stems of ``*.yaml``), sorted."""
    return sorted(p.stem for p in Path(conf_dir).glob("*.yaml"))


def load_spec(name: str, conf_dir: Path) -> dict:
    """Read and normalise ``conf_dir/<name>.yaml``.

    After this every setting has ``w_bits``, ``a_bits``, ``group`` and ``label``; every method has
    ``ours``, ``paper``, ``label`` and ``where``; ``measures`` is a list of ``{metric, dataset}``.
    """
    path = Path(conf_dir) / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise TableError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    for key in ("title", "models", "methods", "settings"):
        if not spec.get(key):
            raise TableError(f"{path}: '{key}' is required")
    if "measures" not in spec:
        if "metric" not in spec or "datasets" not in spec:
            raise TableError(f"{path}: give 'measures', or 'metric' and 'datasets'")
        spec["measures"] = [{"metric": spec["metric"], "dataset": d} for d in spec["datasets"]]
    for m in spec["measures"]:
        m.setdefault("dataset", "")
        if m.get("metric") not in METRICS:
            raise TableError(f"{path}: metric {m.get('metric')!r} unknown; allowed: {', '.join(METRICS)}")
        if m["metric"] == "acc" and m["dataset"] == "zeroshot-avg" and not m.get("tasks"):
            raise TableError(f"{path}: the zeroshot-avg measure needs 'tasks'")
    if not all(isinstance(s, dict) and "w_bits" in s for s in spec["settings"]):
        raise TableError(f"{path}: every setting needs 'w_bits' (and optionally a_bits, group, label)")
    if not all(isinstance(m, dict) and "ours" in m for m in spec["methods"]):
        raise TableError(f"{path}: every method needs 'ours' (and optionally paper, label, where)")
    spec["settings"] = [_setting(s) for s in spec["settings"]]
    spec["methods"] = [_method(m) for m in spec["methods"]]
    spec.setdefault("where", {})
    spec["name"] = name
    return spec


def _setting(s: dict) -> dict:
    """Fill a setting's defaults (weight-only, per-channel) and its row label (W4, W4 g128, W6A6)."""
    s = {"a_bits": 16, "group": -1, **s}
    if "label" not in s:
        s["label"] = f"W{s['w_bits']}" + (f"A{s['a_bits']}" if s["a_bits"] != 16 else "") + \
                     (f" g{s['group']}" if s["group"] != -1 else "")
    return s


def _method(m: dict) -> dict:
    """Fill a method's defaults: the paper's name equals ours unless given, label = our name."""
    return {"paper": m["ours"], "label": m["ours"], "where": {}, **m}


def table_rows(spec: dict) -> list[dict]:
    """The rows of a table in paper order: the FP16 row, then each setting x each method."""
    rows = []
    if spec.get("fp16_row", True):
        rows.append({"setting": "FP16", "method": "none", "ours": "none", "paper": "fp16",
                     "w_bits": 16, "a_bits": 16, "group": -1, "where": {}})
    for s in spec["settings"]:
        for m in spec["methods"]:
            where = {k: v for k, v in {**spec["where"], **m["where"]}.items() if v is not None}
            rows.append({"setting": s["label"], "method": m["label"], "ours": m["ours"], "paper": m["paper"],
                         "w_bits": s["w_bits"], "a_bits": s["a_bits"], "group": s["group"], "where": where})
    return rows


# ----------------------------------------------------------------------------- records

def load_records(runs_dir: Path) -> list[dict]:
    """The run records under ``runs_dir`` (``experiments.records.read_records``)."""
    if not Path(runs_dir).is_dir():
        log.warning(f"no records folder {runs_dir}: every 'ours' cell is {MISSING}")
    return read_records(runs_dir)


def lookup(record: dict, dotted: str) -> Any:
    """``record['a']['b']`` for ``'a.b'``; falls back to the record's ``config``; None if absent."""
    for root in (record, record.get("config") or {}):
        value = root
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            return value
    return None


def _number(value) -> float | None:
    """A float, or None for missing / non-numeric values (NaN stays NaN: a diverged run)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def record_value(record: dict, measure: dict) -> float | None:
    """The number a record gives for one measure (dataset x metric), or None."""
    metric, dataset = measure["metric"], measure["dataset"]
    if metric == "ppl":
        return _number(lookup(record, f"metrics.ppl.{dataset}"))
    if metric == "acc":
        tasks = measure["tasks"] if dataset == "zeroshot-avg" else [dataset]
        accs = [_number(lookup(record, f"metrics.zeroshot.{t}.acc")) for t in tasks]
        return None if None in accs else 100 * statistics.fmean(accs)
    if metric in ("time_min", "time_h"):
        seconds = _number(lookup(record, "time.quantize_s"))
        return None if seconds is None else seconds / (60 if metric == "time_min" else 3600)
    field = "memory.peak_device_bytes" if metric == "memory_gb" else "memory.peak_rss_bytes"
    size = _number(lookup(record, field))
    return size / 2**30 if size else None  # 0 = not measured (e.g. no GPU)


def matching_records(records: list[dict], row: dict) -> list[dict]:
    """Successful records of a row's configuration: method, bits, group size and the row's filters.
    Full precision ("none") matches whatever bits the record carries."""
    out = []
    for rec in records:
        if rec.get("status") != "ok" or rec.get("method") != row["ours"]:
            continue
        if row["ours"] != "none" and (rec.get("w_bits"), rec.get("a_bits", 16), rec.get("group_size", -1)) != \
                (row["w_bits"], row["a_bits"], row["group"]):
            continue
        if all(lookup(rec, k) == v for k, v in row["where"].items()):
            out.append(rec)
    return out


def run_setting(record: dict) -> str:
    """Everything that makes two records different runs rather than two seeds of one run:
    the model's weights (its path and fingerprint), symmetry, calibration (dataset, samples,
    length), the method's own knobs, the evaluation."""
    config = record.get("config") or {}
    return json.dumps([(config.get("model") or {}).get("path"), record.get("model_fingerprint"), record.get("sym"),
                       record.get("calib"), config.get("method"), config.get("eval")], sort_keys=True, default=str)


def seeds_of_one_setting(records: list[dict]) -> tuple[list[dict], int]:
    """The records of one cell that are seeds of the same setting: where a cell matched runs of
    several settings (e.g. 16 and 128 calibration samples), those of the setting run last.
    Returns them and how many other records were left out."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(run_setting(rec), []).append(rec)
    if len(groups) <= 1:
        return records, 0
    chosen = max(groups.values(), key=lambda g: max(str(r.get("created", "")) for r in g))
    return chosen, len(records) - len(chosen)


# ----------------------------------------------------------------------------- paper numbers

def read_paper_csv(path: Path) -> pd.DataFrame:
    """One paper CSV, every column as text (``value`` kept as printed; empty = OOM, see ``note``)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def load_sources(spec: dict, paper_dir: Path) -> list[pd.DataFrame]:
    """The paper rows a spec compares with, one frame per source, in priority order."""
    frames = []
    for src in spec.get("paper") or []:
        path = Path(paper_dir) / src["csv"]
        if not path.is_file():
            raise TableError(f"table {spec['name']}: paper file {path} not found")
        df = read_paper_csv(path)
        if "tables" in src:
            df = df[df["table"].isin(src["tables"])]
        if "paper" in src:
            df = df[df["paper"] == src["paper"]]
        frames.append(df)
    return frames


def paper_value(sources: list[pd.DataFrame], row: dict, model: str, measure: dict) -> tuple[str, float]:
    """The paper's number for one cell: (text as printed, value in our metric's unit).

    ("", nan) when no source has it; ("OOM", nan) / ("NaN", nan) when the paper says so. The first
    source with a number wins; two numbers within one source are a spec error.
    """
    if row["paper"] is None:
        return "", math.nan
    for df in sources:
        for metric, factor in PAPER_UNITS.get(measure["metric"], [(measure["metric"], 1.0)]):
            hit = df[(df["model"] == model) & (df["method"] == row["paper"]) & (df["w_bits"] == str(row["w_bits"]))
                     & (df["a_bits"] == str(row["a_bits"])) & (df["group"] == str(row["group"]))
                     & (df["dataset"] == measure["dataset"]) & (df["metric"] == metric)]
            if len(hit) > 1:
                raise TableError(f"ambiguous paper numbers for {model} {row['paper']} W{row['w_bits']}A{row['a_bits']} "
                                 f"g{row['group']} {measure['dataset']} {metric}: tables {list(hit['table'])}")
            if len(hit) == 1:
                text = hit.iloc[0]["value"]
                if text == "":
                    return hit.iloc[0]["note"].split(";")[0], math.nan
                value = float(text) * factor
                return (text if factor == 1.0 else fmt(value)), value
    return "", math.nan


# ----------------------------------------------------------------------------- the table

def build_table(spec: dict, records: list[dict], paper_dir: Path = REPO / "results" / "paper") -> pd.DataFrame:
    """One row per cell (table row x model x measure), in display order, with ours, paper and Δ."""
    sources = load_sources(spec, paper_dir)
    cells = []
    for row in table_rows(spec):
        matched = matching_records(records, row)
        for model in spec["models"]:
            mine, left_out = seeds_of_one_setting([r for r in matched if r.get("model") == model])
            if left_out:
                log.warning(f"{spec.get('title', 'table')}: {row['setting']} {row['method']} on {model}: "
                            f"{left_out} record(s) of another setting left out (the last run setting is shown; "
                            "narrow with where:)")
            for measure in spec["measures"]:
                pairs = [(r["run_id"], record_value(r, measure)) for r in mine]
                values = [v for _, v in pairs if v is not None]
                mean = statistics.fmean(values) if values else math.nan
                std = statistics.stdev(values) if len(values) > 1 else math.nan
                text, paper = paper_value(sources, row, model, measure)
                cells.append({
                    "setting": row["setting"], "method": row["method"], "ours_method": row["ours"],
                    "paper_method": row["paper"], "w_bits": row["w_bits"], "a_bits": row["a_bits"],
                    "group": row["group"], "model": model, "dataset": measure["dataset"],
                    "metric": measure["metric"], "n": len(values), "ours_mean": mean, "ours_std": std,
                    "paper": text, "paper_value": paper, "delta": mean - paper,
                    "run_ids": " ".join(rid for rid, v in pairs if v is not None)})
    return pd.DataFrame(cells)


def fmt(value: float) -> str:
    """A number the way the papers print it: 4 significant digits, 1.3e4 for large values."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if abs(value) >= 1e4:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.4g}"


def cell_text(cell) -> str:
    """``ours[ ± std (n=k)][; paper p][; Δ d]``, with ``—`` for ours when nothing ran."""
    if cell["n"] == 0:
        parts = [MISSING]
    elif cell["n"] == 1:
        parts = [fmt(cell["ours_mean"])]
    else:
        parts = [f"{fmt(cell['ours_mean'])} ± {fmt(cell['ours_std'])} (n={cell['n']})"]
    if cell["paper"]:
        parts.append(f"paper {cell['paper']}")
    if math.isfinite(cell["delta"]):
        parts.append(f"Δ {'+' if cell['delta'] >= 0 else '-'}{fmt(abs(cell['delta']))}")
    return "; ".join(parts)


def grid(spec: dict, cells: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and body rows of the rendered table: Setting, Method, then model x measure."""
    header = ["Setting", "Method"] + [f"{model} {m['dataset'] or m['metric']}".strip()
                                      for model in spec["models"] for m in spec["measures"]]
    width = len(spec["models"]) * len(spec["measures"])
    body = []
    for start in range(0, len(cells), width):
        block = cells.iloc[start:start + width]
        first = block.iloc[0]
        body.append([first["setting"], first["method"]] + [cell_text(c) for _, c in block.iterrows()])
    return header, body


def legend(spec: dict) -> str:
    """What the cells mean, and where the paper numbers come from."""
    sources = ", ".join(f"{s['csv']} ({s['paper'] + ': ' if 'paper' in s else ''}"
                        f"{', '.join(s.get('tables', ['all tables']))})" for s in spec.get("paper") or [])
    metric = "/".join(sorted({m["metric"] for m in spec["measures"]}))
    text = (f"Cells: ours = mean over run records ({metric}; ± sample std, n = records when n > 1); "
            f"{MISSING} = not run yet. ")
    text += f"paper = reported number ({sources}); Δ = ours − paper." if sources else "No paper numbers."
    return text


def markdown_table(header: list[str], body: list[list]) -> str:
    """A Markdown table (cells as text, ``|`` escaped); every table this project prints."""
    cell = lambda c: str(c).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in body])


def render_markdown(spec: dict, cells: pd.DataFrame) -> str:
    """The table as Markdown, with its title, caption and legend."""
    header, body = grid(spec, cells)
    lines = [f"### {spec['title']}", ""]
    if spec.get("caption"):
        lines += [spec["caption"].strip(), ""]
    lines.append(markdown_table(header, body))
    return "\n".join(lines + ["", legend(spec), ""])


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and spell the few non-ASCII symbols the cells use."""
    return "".join(LATEX.get(char, char) for char in text)


def render_latex(spec: dict, cells: pd.DataFrame) -> str:
    """The table as a LaTeX ``tabular`` (no float, no packages beyond the base)."""
    header, body = grid(spec, cells)
    lines = [f"% {spec['title']}", f"% {legend(spec)}", r"\begin{tabular}{ll" + "c" * (len(header) - 2) + "}",
             r"\hline", " & ".join(latex_escape(h) for h in header) + r" \\", r"\hline"]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in body]
    return "\n".join(lines + [r"\hline", r"\end{tabular}", ""])


def write_outputs(name: str, spec: dict, cells: pd.DataFrame, out_dir: Path) -> str:
    """Write ``<name>.md``, ``.tex`` and ``.csv`` under ``out_dir``; return the Markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(spec, cells)
    (out_dir / f"{name}.md").write_text(markdown)
    (out_dir / f"{name}.tex").write_text(render_latex(spec, cells))
    cells.to_csv(out_dir / f"{name}.csv", index=False)
    return markdown


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.tables", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="tables to build (default: every spec in --conf)")
    p.add_argument("--runs", type=Path, default=REPO / "results" / "runs", help="run records, searched recursively")
    p.add_argument("--out", type=Path, default=REPO / "results" / "tables", help="where .md/.tex/.csv go")
    p.add_argument("--conf", type=Path, default=REPO / "conf" / "tables", help="table specs (<name>.yaml)")
    p.add_argument("--paper", type=Path, default=REPO / "results" / "paper", help="the papers' numbers (CSV)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the named tables (all by default); user errors print one line and return 2."""
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s")
    try:
        allowed = spec_names(args.conf)
        unknown = [n for n in args.names if n not in allowed]
        if unknown:
            raise TableError(f"unknown table {unknown[0]!r}; allowed: {', '.join(allowed)}")
        specs = {name: load_spec(name, args.conf) for name in (args.names or allowed)}
        records = load_records(args.runs)
        for name, spec in specs.items():
            cells = build_table(spec, records, args.paper)
            print(write_outputs(name, spec, cells, args.out))
    except (TableError, yaml.YAMLError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
