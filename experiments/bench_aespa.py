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
default set; nothing is evaluated or recorded.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from omegaconf import OmegaConf

from aespa.adapters import ModelAdapter
from aespa.pipeline import quantize_model
from aespa.registry import QuantSpec, get_method
from experiments.data import DataCache, calibration_windows
from experiments.runner import REPO, in_repo, load_model, resolve_device, seed_everything

PHASES = ("statistics", "qparams", "optq_init", "rounding")


def bench(model_name: str, nsamples: int, bits: int, iters: int, device: torch.device) -> dict:
    card = OmegaConf.load(os.path.join(REPO, "conf", "model", f"{model_name}.yaml"))
    options = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "conf", "method",
                                                                                   "aespa.yaml"))).items()
               if k != "name"} | {"iters": iters}
    seed_everything(0)
    model, tokenizer = load_model(card.path, torch.float32)
    calibration = calibration_windows(card.calib, tokenizer, nsamples, card.seqlen, 0, DataCache(in_repo(".cache/data")))
    method = get_method("aespa")(QuantSpec(bits=bits), options)
    start = time.perf_counter()
    result = quantize_model(ModelAdapter(model), method, calibration, device, progress=False)
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
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join([r["model"], str(r["nsamples"])] + [f"{r[k]:.1f}" for k in (*PHASES, "total")]) + " |")


if __name__ == "__main__":
    main()
