"""One run: validate -> load -> calibrate -> quantize -> evaluate -> record.

``run(cfg)`` takes the resolved Hydra config (see ``conf/config.yaml``) and returns
the record it wrote under ``results_dir``. Everything that can be checked without the
model's weights is checked first (``experiments.validation``); the model, the calibration
windows, the test windows and the zero-shot tasks are all loaded before quantization
starts, so a mistake never surfaces after the expensive part. A non-finite value stops
the run with a ``status: failed`` record naming where it appeared; a record that cannot be
written is printed in full and written to a fallback file instead.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
import torch
from omegaconf import OmegaConf

from aespa.core.adapters import ModelAdapter
from aespa.core.attention import register_attention
from aespa.core.checkpoint import BlockCheckpoint
from aespa.core.errors import NumericalError, UserError, check_finite
from aespa.core.evaluation import perplexity
from aespa.core.method import Method
from aespa.core.pipeline import QuantizeResult, quantize_model
from experiments import records, sweeps, validation
from experiments.data import DataCache, calibration_windows, evaluation_windows
from experiments.validation import REPO, Checked, check_model_folder, in_repo, local_model_folder, local_paths

log = logging.getLogger(__name__)
resolve_device = validation.resolve_device  # for the benchmark scripts


def validate(cfg) -> Checked:
    """Everything that needs no model weights (``experiments.validation``)."""
    from experiments.export import check_exportable

    checked = validation.validate(cfg)
    check_exportable(cfg)  # a model the save format cannot express is refused before anything loads
    return checked


def validate_model(adapter: ModelAdapter, method: Method, seqlen: int) -> None:
    """Checks that need the model (its context, its widths, finite weights)."""
    context = getattr(adapter.model.config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        raise UserError(f"seqlen={seqlen} exceeds the model's context of {context} positions; allowed: 2..{context}")
    method.check(adapter)


# --------------------------------------------------------------------------- loading


def compose(overrides: list[str]):
    """The run config ``run.py`` would compose from these command-line overrides (the
    registered methods offered as ``method=<name>``), for scripts and tests; an override Hydra
    refuses is a UserError of one line."""
    import hydra
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf.errors import OmegaConfBaseException

    from experiments.methods import load_methods

    load_methods()
    try:
        with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except (hydra.errors.HydraException, OmegaConfBaseException) as e:  # a script's bad override: one line
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise UserError("; ".join(lines[:2]) or type(e).__name__) from None


def load_model(path: str, dtype: torch.dtype) -> tuple:
    """The model and its tokenizer from a local folder or a hub id (``model.path``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    local = local_model_folder(path)
    if local is not None:
        check_model_folder(local, f"model.path={path}")
    source = local or path
    attn = register_attention()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"cannot load model.path={path} ({type(e).__name__}: {reason})") from None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- the run


def run(cfg, config_dict: dict | None = None) -> dict:
    """Quantize, evaluate and record one configuration; returns the record."""
    config = config_dict if config_dict is not None else OmegaConf.to_container(cfg, resolve=True)
    checked = validate(cfg)
    method, device, dtype = checked.method, checked.device, checked.dtype
    rid = records.run_id(config)
    path = records.record_path(in_repo(cfg.results_dir), rid)
    existing = records.read_record(path)
    if existing is not None and existing.get("status") == "ok" and not cfg.force:
        print(f"skip: a record of this configuration exists ({path}); force=true reruns it", flush=True)
        sweeps.job_status("skipped")
        return existing

    with records.RunLock(in_repo(cfg.results_dir), rid):
        seed_everything(cfg.seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        try:
            model, tokenizer, adapter, seqlen = load(cfg, method, dtype)
            data = DataSource(DataCache(in_repo(cfg.cache_dir)), local_paths(cfg), tokenizer, seqlen)
            test_windows, tasks = prepare_evaluation(cfg, data)

            t0 = time.perf_counter()
            result = quantize(cfg, method, adapter, data, device, dtype, rid)
            quantize_s = time.perf_counter() - t0 + result.earlier_s  # a resumed run counts its earlier segments

            t1 = time.perf_counter()
            metrics = evaluate(cfg, model, tokenizer, adapter, test_windows, tasks, device, dtype)
            eval_s = time.perf_counter() - t1
        except NumericalError as e:
            failed = failed_record(cfg, config, rid, method, str(e), time.perf_counter() - started)
            write_record(path, failed)
            raise

        record = make_record(cfg, config, rid, method, adapter, seqlen, metrics, result, quantize_s, eval_s, device)
        if cfg.save:
            from experiments.export import save_quantized

            write_record(path, record)  # first: a failed export never loses the run's record
            folder = in_repo(cfg.save_dir or f"results/models/{rid}")
            try:
                record["saved_to"], notes = save_quantized(model, tokenizer, result, cfg, folder, record)
                record["notes"] += notes
            except Exception as e:  # the run stays recorded; the export's failure is said in it
                record["notes"].append(f"not saved ({cfg.save_format}): {e}")
                print(f"error: the model was not saved ({e}); the run's record is kept", file=sys.stderr, flush=True)
        write_record(path, record)
    BlockCheckpoint(in_repo(cfg.checkpoint_dir), rid).remove()
    if cfg.logger.name == "wandb":
        from experiments.wandb_logger import log_wandb

        log_wandb(record, cfg.logger)
    print_summary(record, path)
    sweeps.job_status("ok")
    return record


def write_record(path: str, record: dict) -> None:
    """The record at ``path``; if that fails (a read-only or full disk), the record is printed
    in full and written to a fallback file, and :class:`RecordNotWritten` says where."""
    try:
        records.write_record(path, record)
        return
    except OSError as e:
        reason = e.strerror or type(e).__name__
    fallback = os.path.join(tempfile.gettempdir(), "aespa-ptq-records", os.path.basename(path))
    print(json.dumps(record, indent=2, default=str), flush=True)
    try:
        records.write_record(fallback, record)
        where = f"written to {fallback} instead"
    except OSError:
        where = "printed above (the fallback folder is not writable either)"
    raise RecordNotWritten(f"cannot write the record {path} ({reason}); the record is {where}")


class RecordNotWritten(Exception):
    """The run finished but its record is not where it belongs (the message says where it is)."""


def load(cfg, method: Method, dtype: torch.dtype) -> tuple:
    """The model (its outlier variant where the model config asks for it; its architecture twin
    with ``model.twin=true``), its tokenizer, its family adapter and the window length; checked
    against the method."""
    if cfg.model.get("twin"):
        from experiments.twins import build_twin

        model, tokenizer = build_twin(cfg.model, cfg.seed, dtype)
    else:
        model, tokenizer = load_model(cfg.model.path, dtype)
    adapter = ModelAdapter(model)
    check_finite("the loaded model", {name: p for name, p in model.named_parameters()})
    if cfg.model.get("outliers"):  # the outlier variant of a model (experiments/outliers.py)
        from experiments.outliers import plant_outliers

        plant_outliers(adapter, **cfg.model.outliers)
    seqlen = cfg.seqlen or cfg.model.seqlen
    validate_model(adapter, method, seqlen)
    return model, tokenizer, adapter, seqlen


class DataSource:
    """Where a run's windows come from: the tokenizer, the window length, local files and the cache."""

    def __init__(self, cache: DataCache, paths: dict, tokenizer, seqlen: int):
        self.cache, self.paths, self.tokenizer, self.seqlen = cache, paths, tokenizer, seqlen

    def calibration(self, dataset: str, nsamples: int, seed: int) -> torch.Tensor:
        return calibration_windows(dataset, self.tokenizer, nsamples, self.seqlen, seed, self.cache, self.paths)

    def test(self, dataset: str) -> torch.Tensor:
        return evaluation_windows(dataset, self.tokenizer, self.seqlen, self.cache, self.paths)


def load_for_quantization(overrides: list[str]) -> tuple:
    """For scripts that quantize outside a run (the plan's memory check, benchmarks): the config
    composed from ``overrides`` as ``run.py`` composes it, its checked form, the model's adapter,
    the window length and the calibration windows (tokenized into the data cache if not there)."""
    cfg = compose(overrides)
    checked = validate(cfg)
    model, tokenizer, adapter, seqlen = load(cfg, checked.method, checked.dtype)
    data = DataSource(DataCache(in_repo(cfg.cache_dir)), local_paths(cfg), tokenizer, seqlen)
    return cfg, checked, adapter, seqlen, data.calibration(cfg.calib.dataset, cfg.nsamples, cfg.seed)


def prepare_evaluation(cfg, data: DataSource) -> tuple[dict, object]:
    """The test windows of every ``eval.datasets`` entry and the zero-shot tasks, loaded
    before quantization (a dataset or task that cannot load fails here, not after it)."""
    windows = {}
    for ds in cfg.eval.datasets:
        windows[ds] = data.test(ds)
        if cfg.eval.get("max_windows"):
            windows[ds] = windows[ds][: cfg.eval.max_windows]
    tasks = None
    if cfg.eval.get("zeroshot"):
        from experiments.zeroshot import load_tasks

        tasks = load_tasks(list(cfg.eval.zeroshot))
    return windows, tasks


def quantize(cfg, method: Method, adapter: ModelAdapter, data: DataSource, device, dtype, rid: str) -> QuantizeResult:
    """Calibration windows, then the block-sequential pipeline (resuming a killed run of
    this configuration from its checkpoint)."""
    if method.name == "none":
        return QuantizeResult()
    calibration = data.calibration(cfg.calib.dataset, cfg.nsamples, cfg.seed)
    checkpoint = BlockCheckpoint(in_repo(cfg.checkpoint_dir), rid) if cfg.resume else None
    return quantize_model(adapter, method, calibration, device, cfg.batch_size, dtype, checkpoint=checkpoint,
                          progress=cfg.progress)


def evaluate(cfg, model, tokenizer, adapter: ModelAdapter, windows: dict, tasks, device, dtype) -> dict:
    """Perplexity on every test set; zero-shot accuracy on ``eval.zeroshot``."""
    ppl = {}
    for ds, w in windows.items():
        ppl[ds] = perplexity(adapter, w, device, cfg.batch_size, dtype, progress=cfg.progress, desc=f"ppl {ds}")
        if not np.isfinite(ppl[ds]):
            raise NumericalError(f"the perplexity on {ds} is not finite ({ppl[ds]})")
    zeroshot = {}
    if cfg.eval.get("zeroshot"):
        from experiments.zeroshot import evaluate_zeroshot

        zeroshot = evaluate_zeroshot(model, tokenizer, cfg.eval, device, tasks)
    return {"ppl": ppl, "zeroshot": zeroshot}


def make_record(cfg, config: dict, rid: str, method: Method, adapter: ModelAdapter, seqlen: int, metrics: dict,
                result: QuantizeResult, quantize_s: float, eval_s: float, device: torch.device) -> dict:
    """The run's record (``experiments.records``; README, "What a run prints and writes")."""
    record = {
        "schema": 1, "run_id": rid, "status": "ok",
        "model": model_name(cfg), "model_fingerprint": model_fingerprint(cfg),
        "family": adapter.family.name, "method": method.name,
        "w_bits": cfg.bits, "a_bits": cfg.act_bits, "group_size": cfg.group_size, "sym": cfg.sym, "seed": cfg.seed,
        "calib": {"dataset": cfg.calib.dataset, "nsamples": cfg.nsamples, "seqlen": seqlen},
        "metrics": metrics,
        "time": {"quantize_s": round(quantize_s, 3), "eval_s": round(eval_s, 3),
                 "phases": {k: round(v, 3) for k, v in result.phases.items()}},
        "memory": {"peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
                   "peak_rss_bytes": peak_rss_bytes()},
        "env": {"device": device.type,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
                platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": _version("transformers"),
                "python": platform.python_version(), "git_commit": records.git_commit(REPO),
                "hostname": records.hostname()},
        "config": config,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "notes": list(result.notes),
    }
    if cfg.model.get("twin"):
        from experiments.twins import describe

        record["twin"] = describe(cfg.model)
    return record


def model_name(cfg) -> str:
    """The record's model: the config's name, ``<name>-twin`` for an architecture twin (whose
    numbers never stand for the real model's in a table)."""
    return f"{cfg.model.name}-twin" if cfg.model.get("twin") else cfg.model.name


def model_fingerprint(cfg) -> str:
    if cfg.model.get("twin"):
        from experiments.twins import fingerprint

        return fingerprint(cfg.model)
    return validation.model_fingerprint(cfg.model.path)


def failed_record(cfg, config: dict, rid: str, method: Method, error: str, seconds: float) -> dict:
    """The record of a run stopped by a non-finite value (tables and plots skip it)."""
    return {"schema": 1, "run_id": rid, "status": "failed", "error": error, "model": model_name(cfg),
            "method": method.name, "w_bits": cfg.bits, "a_bits": cfg.act_bits, "group_size": cfg.group_size,
            "sym": cfg.sym, "seed": cfg.seed, "time": {"elapsed_s": round(seconds, 3)}, "config": config,
            "env": {"git_commit": records.git_commit(REPO), "hostname": records.hostname()},
            "created": datetime.now(UTC).isoformat(timespec="seconds")}


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:
        return "?"


def print_summary(record: dict, path: str) -> None:
    bits = "FP" if record["method"] == "none" else f"W{record['w_bits']}A{record['a_bits']}" + (
        f" g{record['group_size']}" if record["group_size"] != -1 else "")
    lines = [
        f"{record['model']} | {record['method']} | {bits} | seed {record['seed']} | calib {record['calib']['dataset']} "
        f"x{record['calib']['nsamples']} @ {record['calib']['seqlen']}",
        "perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in record["metrics"]["ppl"].items()),
    ]
    if record["metrics"]["zeroshot"]:
        lines.append("zero-shot: " + ", ".join(f"{t} {m.get('acc', float('nan')):.4f}"
                                              for t, m in record["metrics"]["zeroshot"].items()))
    phases = record["time"]["phases"]
    lines.append(f"time: quantize {record['time']['quantize_s']:.1f} s"
                 + (" (" + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + ")" if phases else "")
                 + f", eval {record['time']['eval_s']:.1f} s")
    mem = record["memory"]
    lines.append(f"memory: peak device {mem['peak_device_bytes'] / 2**30:.2f} GiB, peak host RSS "
                 f"{mem['peak_rss_bytes'] / 2**30:.2f} GiB on {record['env']['device_name']}")
    for n in record["notes"]:
        lines.append(f"note: {n}")
    lines.append(f"record: {path}")
    print("\n".join(lines), file=sys.stdout, flush=True)
