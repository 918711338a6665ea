"""One run: validate -> load -> calibrate -> quantize -> evaluate -> record.

``run(cfg)`` takes the resolved Hydra config (see ``conf/config.yaml``) and returns
the record it wrote under ``results_dir``.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import resource
import sys
import time
from datetime import UTC, datetime

import numpy as np
import torch
from omegaconf import OmegaConf

from aespa.core.adapters import ModelAdapter
from aespa.core.attention import register_attention
from aespa.core.checkpoint import BlockCheckpoint
from aespa.core.errors import UserError
from aespa.core.evaluation import perplexity
from aespa.core.method import Method, QuantSpec, act_quant_methods, get_method
from aespa.core.pipeline import QuantizeResult, quantize_model
from experiments import records
from experiments.data import CALIBRATION_SETS, TEST_SETS, DataCache, calibration_windows, evaluation_windows
from experiments.methods import load_methods

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
ACT_BITS = (4, 5, 6, 7, 8, 16)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def in_repo(path: str) -> str:
    """Relative paths are taken from the repo root (whatever the working directory)."""
    return path if os.path.isabs(path) else os.path.join(REPO, path)


# --------------------------------------------------------------------------- validation


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available on this machine; allowed here: auto, cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device {name!r}; allowed: auto, cpu, cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def validate(cfg) -> Method:
    """Checks that need no model: one clear line per mistake. Returns the method, its
    options parsed and checked."""
    if cfg.bits not in WEIGHT_BITS:
        raise UserError(f"bits={cfg.bits} is not supported; allowed: 2..8, or 16 (not quantized)")
    if cfg.act_bits not in ACT_BITS:
        raise UserError(f"act_bits={cfg.act_bits} is not supported; allowed: 4..8, or 16 (weight-only)")
    if cfg.group_size != -1 and cfg.group_size <= 0:
        raise UserError(f"group_size={cfg.group_size} is not allowed; use -1 (per channel) or a positive group size")
    if cfg.nsamples <= 0:
        raise UserError(f"nsamples must be positive, got {cfg.nsamples}")
    if cfg.seqlen is not None and cfg.seqlen <= 1:
        raise UserError(f"seqlen must be at least 2, got {cfg.seqlen}")
    load_methods()
    method_cls = get_method(cfg.method.name)
    if cfg.act_bits < 16 and not method_cls.supports_act_quant:
        allowed = ", ".join(act_quant_methods()) or "none yet"
        raise UserError(f"method {cfg.method.name!r} is weight-only; act_bits < 16 needs one of: {allowed}")
    if cfg.calib.dataset not in CALIBRATION_SETS:
        raise UserError(f"unknown calibration set {cfg.calib.dataset!r}; allowed: {', '.join(CALIBRATION_SETS)}")
    for ds in cfg.eval.datasets:
        if ds not in TEST_SETS:
            raise UserError(f"unknown dataset {ds!r}; allowed: {', '.join(TEST_SETS)}")
    spec = QuantSpec(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, act_bits=cfg.act_bits)
    options = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"}
    method = method_cls(spec, options)
    if cfg.bits >= 16 and cfg.act_bits >= 16:  # nothing to quantize: the full-precision model
        return get_method("none")(spec)
    return method


def validate_model(adapter: ModelAdapter, method: Method, seqlen: int) -> None:
    """Checks that need the model (its context, its widths): one clear line per mistake."""
    context = getattr(adapter.model.config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        raise UserError(f"seqlen={seqlen} exceeds the model's context of {context} positions; allowed: 2..{context}")
    method.check(adapter)


# --------------------------------------------------------------------------- loading


def load_model(path: str, dtype: torch.dtype) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    local = in_repo(path) if os.path.exists(in_repo(path)) else None
    if local is None and (path.startswith(("/", ".", "~")) or path.count("/") > 1):
        raise UserError(f"model path {path} does not exist")
    source = local or path
    attn = register_attention()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn)
    except OSError as e:
        raise UserError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
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
    method = validate(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    rid = records.run_id(config)
    path = records.record_path(in_repo(cfg.results_dir), rid)
    if os.path.exists(path) and not cfg.force:
        print(f"skip: a record of this configuration exists ({path}); force=true reruns it", flush=True)
        return _load(path)

    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, tokenizer, adapter, seqlen = load(cfg, method)
    data = DataSource(DataCache(in_repo(cfg.cache_dir)), dict(cfg.data_paths or {}), tokenizer, seqlen)

    t0 = time.perf_counter()
    result = quantize(cfg, method, adapter, data, device, dtype, rid)
    quantize_s = time.perf_counter() - t0 + result.earlier_s  # a resumed run counts its earlier segments too

    t1 = time.perf_counter()
    metrics = evaluate(cfg, model, tokenizer, adapter, data, device, dtype)
    eval_s = time.perf_counter() - t1

    record = make_record(cfg, config, rid, method, adapter, seqlen, metrics, result, quantize_s, eval_s, device)
    if cfg.save:
        from experiments.export import save_quantized

        folder = in_repo(cfg.save_dir or f"results/models/{rid}")
        record["saved_to"] = save_quantized(model, tokenizer, result, cfg, folder)
    records.write_record(path, record)
    BlockCheckpoint(in_repo(cfg.checkpoint_dir), rid).remove()
    if cfg.logger.name == "wandb":
        from experiments.wandb_logger import log_wandb

        log_wandb(record, cfg.logger)
    print_summary(record, path)
    return record


def load(cfg, method: Method) -> tuple:
    """The model (its outlier variant where the model config asks for it), its tokenizer,
    its family adapter and the window length; checked against the method."""
    model, tokenizer = load_model(cfg.model.path, resolve_dtype(cfg.dtype, resolve_device(cfg.device)))
    adapter = ModelAdapter(model)
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


def quantize(cfg, method: Method, adapter: ModelAdapter, data: DataSource, device, dtype, rid: str) -> QuantizeResult:
    """Calibration windows, then the block-sequential pipeline (resuming a killed run of
    this configuration from its checkpoint)."""
    if method.name == "none":
        return QuantizeResult()
    calibration = data.calibration(cfg.calib.dataset, cfg.nsamples, cfg.seed)
    checkpoint = BlockCheckpoint(in_repo(cfg.checkpoint_dir), rid) if cfg.resume else None
    return quantize_model(adapter, method, calibration, device, cfg.batch_size, dtype, checkpoint=checkpoint,
                          progress=cfg.progress)


def evaluate(cfg, model, tokenizer, adapter: ModelAdapter, data: DataSource, device, dtype) -> dict:
    """Perplexity on every test set of ``eval.datasets``; zero-shot accuracy on ``eval.zeroshot``."""
    ppl = {}
    for ds in cfg.eval.datasets:
        windows = data.test(ds)
        if cfg.eval.get("max_windows"):
            windows = windows[: cfg.eval.max_windows]
        ppl[ds] = perplexity(adapter, windows, device, cfg.batch_size, dtype, progress=cfg.progress, desc=f"ppl {ds}")
    zeroshot = {}
    if cfg.eval.get("zeroshot"):
        from experiments.zeroshot import evaluate_zeroshot

        zeroshot = evaluate_zeroshot(model, tokenizer, cfg.eval, device)
    return {"ppl": ppl, "zeroshot": zeroshot}


def make_record(cfg, config: dict, rid: str, method: Method, adapter: ModelAdapter, seqlen: int, metrics: dict,
                result: QuantizeResult, quantize_s: float, eval_s: float, device: torch.device) -> dict:
    """The run's record (``experiments.records``; README, "What a run prints and writes")."""
    record = {
        "schema": 1, "run_id": rid, "status": "ok",
        "model": cfg.model.name, "family": adapter.family.name, "method": method.name,
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
    for name, value in metrics["ppl"].items():
        if not np.isfinite(value):
            record["notes"].append(f"perplexity on {name} is not finite")
    return record


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


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
