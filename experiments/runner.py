"""One run: config -> model -> calibration -> block-sequential quantization ->
evaluation -> record.

``run(cfg)`` takes the resolved Hydra config (see ``conf/config.yaml``) and returns
the record it wrote under ``results_dir``.
"""
from __future__ import annotations

import os
import platform
import random
import resource
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

from aespa.adapters import ModelAdapter, register_attention
from aespa.errors import UserError
from aespa.pipeline import perplexity, quantize_model
from aespa.quant import check_group_size
from aespa.registry import QuantSpec, act_quant_methods, get_method
from experiments import records
from experiments.resume import BlockCheckpoint
from experiments.data import CALIBRATION_SETS, TEST_SETS, DataCache, calibration_windows, evaluation_windows

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


def validate(cfg) -> None:
    """Checks that need no model: one clear line per mistake."""
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
    method_cls = get_method(cfg.method.name)
    if cfg.act_bits < 16 and not method_cls.supports_act_quant:
        allowed = ", ".join(act_quant_methods()) or "none yet"
        raise UserError(f"method {cfg.method.name!r} is weight-only; act_bits < 16 needs one of: {allowed}")
    if cfg.calib.dataset not in CALIBRATION_SETS:
        raise UserError(f"unknown calibration set {cfg.calib.dataset!r}; allowed: {', '.join(CALIBRATION_SETS)}")
    for ds in cfg.eval.datasets:
        if ds not in TEST_SETS:
            raise UserError(f"unknown dataset {ds!r}; allowed: {', '.join(TEST_SETS)}")


def validate_model(adapter: ModelAdapter, cfg, seqlen: int) -> None:
    context = getattr(adapter.model.config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        raise UserError(f"seqlen={seqlen} exceeds the model's context of {context} positions; allowed: 2..{context}")
    if cfg.bits < 16 and cfg.group_size != -1:
        for role, lin in adapter.block(0).linears().items():
            check_group_size(lin.in_features, cfg.group_size, f"the {role} projection")


# --------------------------------------------------------------------------- loading


def load_model(path: str, dtype: torch.dtype):
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
    from omegaconf import OmegaConf

    config = config_dict if config_dict is not None else OmegaConf.to_container(cfg, resolve=True)
    validate(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    results_dir = in_repo(cfg.results_dir)
    rid = records.run_id(config)
    path = records.record_path(results_dir, rid)
    if os.path.exists(path) and not cfg.force:
        print(f"skip: a record of this configuration exists ({path}); force=true reruns it")
        return _load(path)

    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, tokenizer = load_model(cfg.model.path, dtype)
    adapter = ModelAdapter(model)
    if cfg.model.get("outliers"):  # the outlier variant of a model (experiments/outliers.py)
        from experiments.outliers import plant_outliers

        plant_outliers(adapter, **cfg.model.outliers)
    seqlen = cfg.seqlen or cfg.model.seqlen
    validate_model(adapter, cfg, seqlen)
    cache = DataCache(in_repo(cfg.cache_dir))
    paths = dict(cfg.data_paths or {})

    spec = QuantSpec(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, act_bits=cfg.act_bits)
    method_name = cfg.method.name if cfg.bits < 16 or cfg.act_bits < 16 else "none"
    method = get_method(method_name)(spec, {k: v for k, v in config["method"].items() if k != "name"})

    t0 = time.perf_counter()
    checkpoint = None
    if method_name != "none":
        calibration = calibration_windows(cfg.calib.dataset, tokenizer, cfg.nsamples, seqlen, cfg.seed, cache, paths)
        checkpoint = BlockCheckpoint(in_repo(cfg.checkpoint_dir), rid) if cfg.resume else None
        result = quantize_model(adapter, method, calibration, device, cfg.batch_size, dtype, checkpoint=checkpoint,
                                progress=cfg.progress)
    else:
        from aespa.pipeline import QuantizeResult

        result = QuantizeResult()
    quantize_s = time.perf_counter() - t0 + result.earlier_s  # a resumed run counts its earlier segments too

    t1 = time.perf_counter()
    ppl = {}
    for ds in cfg.eval.datasets:
        windows = evaluation_windows(ds, tokenizer, seqlen, cache, paths)
        if cfg.eval.get("max_windows"):
            windows = windows[: cfg.eval.max_windows]
        ppl[ds] = perplexity(adapter, windows, device, cfg.batch_size, dtype, progress=cfg.progress, desc=f"ppl {ds}")
    zeroshot = {}
    if cfg.eval.get("zeroshot"):
        from experiments.zeroshot import evaluate_zeroshot

        zeroshot = evaluate_zeroshot(model, tokenizer, cfg.eval, device)
    eval_s = time.perf_counter() - t1

    record = {
        "schema": 1, "run_id": rid, "status": "ok",
        "model": cfg.model.name, "family": adapter.family.name, "method": method_name,
        "w_bits": cfg.bits, "a_bits": cfg.act_bits, "group_size": cfg.group_size, "sym": cfg.sym, "seed": cfg.seed,
        "calib": {"dataset": cfg.calib.dataset, "nsamples": cfg.nsamples, "seqlen": seqlen},
        "metrics": {"ppl": ppl, "zeroshot": zeroshot},
        "time": {"quantize_s": round(quantize_s, 3), "eval_s": round(eval_s, 3),
                 "phases": {k: round(v, 3) for k, v in result.phases.items()}},
        "memory": {"peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
                   "peak_rss_bytes": peak_rss_bytes()},
        "env": {"device": device.type,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": _version("transformers"),
                "python": platform.python_version(), "git_commit": records.git_commit(REPO), "hostname": records.hostname()},
        "config": config,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": result.notes,
    }
    for name, value in ppl.items():
        if not np.isfinite(value):
            record["notes"].append(f"perplexity on {name} is not finite")
    if cfg.save:
        from experiments.export import save_quantized

        record["saved_to"] = save_quantized(model, tokenizer, result, cfg, in_repo(cfg.save_dir or f"results/models/{rid}"))
    records.write_record(path, record)
    if checkpoint is not None:
        checkpoint.remove()
    if cfg.logger.name == "wandb":
        from experiments.wandb_logger import log_wandb

        log_wandb(record, cfg.logger)
    print_summary(record, path)
    return record


def _load(path):
    import json

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
