"""Where aespa's quantization time goes: the time of each phase, per model and
calibration-set size.

    python -m experiments.bench_aespa                                  # tiny-opt, tiny-llama; 32 and 128 windows
    python -m experiments.bench_aespa --models opt-125m --device cuda  # a paper model on a GPU
    python -m experiments.bench_aespa --iters 200 --bits 3             # cheaper rounding, other bit-width

Phases (summed over blocks): ``statistics`` (one pass per block: E[XXᵀ], the
attention-weighted value Hessian, query/key covariances), ``qparams`` (clipping search and
Z-Fold), ``optq_init`` (GPTQ sweep on the refined grid), ``rounding`` (AdaRound). Only
``statistics`` should grow with the number of calibration windows: every later phase
reads the pre-computed statistics (aespa §3.4, Table 7). Calibration on the model's
default set; nothing is evaluated or recorded. Each configuration is composed by Hydra from
``conf/`` as ``run.py`` composes it; the command line is argparse because the benchmark
loops over models and calibration sizes and prints one table.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from hydra import compose, initialize_config_dir

from aespa.core.pipeline import quantize_model
from experiments.runner import REPO, DataCache, DataSource, in_repo, load, resolve_device, seed_everything, validate
from experiments.tables import markdown_table

PHASES = ("statistics", "qparams", "optq_init", "rounding")


def bench(model_name: str, nsamples: int, bits: int, iters: int, device: torch.device) -> dict:
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        overrides = [f"model={model_name}", "method=aespa", f"bits={bits}", f"nsamples={nsamples}",
                     f"method.iters={iters}", "dtype=float32"]
        cfg = compose(config_name="config", overrides=overrides)
    method = validate(cfg).method
    seed_everything(cfg.seed)
    model, tokenizer, adapter, seqlen = load(cfg, method, torch.float32)
    calibration = DataSource(DataCache(in_repo(cfg.cache_dir)), dict(cfg.data_paths or {}), tokenizer,
                             seqlen).calibration(cfg.calib.dataset, nsamples, cfg.seed)
    start = time.perf_counter()
    result = quantize_model(adapter, method, calibration, device, progress=False)
    return {"model": model_name, "nsamples": nsamples, **{p: result.phases.get(p, 0.0) for p in PHASES},
            "total": time.perf_counter() - start}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-opt", "tiny-llama"])
    parser.add_argument("--nsamples", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2000, help="AdaRound iterations per linear (default: the paper's)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    rows = [bench(m, n, args.bits, args.iters, device) for m in args.models for n in args.nsamples]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"aespa W{args.bits}, {args.iters} rounding iterations, on {name}; seconds summed over blocks")
    header = ["model", "nsamples", *PHASES, "total"]
    print(markdown_table(header, [[r["model"], r["nsamples"]] + [f"{r[k]:.1f}" for k in (*PHASES, "total")]
                                  for r in rows]))


if __name__ == "__main__":
    main()
