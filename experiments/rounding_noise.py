"""How much of a difference between two implementations of learned rounding is fp32 noise.

    python -m experiments.rounding_noise                          # tiny-llama W2, block 1, 2000 steps
    python -m experiments.rounding_noise model=tiny-opt bits=3 --iters 500

AdaRound runs 2000 Adam steps in fp32 on a non-convex objective. Two implementations of the
same function and gradient (aespa's closed form, :func:`aespa.core.rounding.learn_rounding`,
and autograd through the soft weight, :func:`~aespa.core.rounding.learn_rounding_autograd`)
agree to float tolerance for hundreds of steps and still end with some hard roundings apart,
so the perplexities of whole runs differ a little. This script captures the rounding problems
of aespa's first block (as ``run.py`` composes the configuration from the overrides) and counts
the weights that round the other way:

- the closed form against autograd;
- each path against itself with every input Hessian scaled by ``1 + 2⁻²³`` (one unit in the
  last place of fp32, relatively).

When the first count is of the size of the other two, the difference between the two paths is
the noise of the optimisation in fp32, not a different algorithm. One thread; tiny-llama W2 at
2000 steps takes about 10 min on one core of a 2-core x86_64 CPU (autograd is ~5x slower).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from unittest import mock

import torch

import aespa.method
from aespa.core.errors import UserError
from aespa.core.rounding import RoundingProblem, learn_rounding, learn_rounding_autograd


class _Captured(Exception):
    pass


def first_block_problems(overrides: list[str]) -> tuple[list[RoundingProblem], dict]:
    """The rounding problems aespa builds for block 1, and its learn_rounding arguments: the
    pipeline runs as in a run until aespa hands them to ``learn_rounding``, which is replaced
    here by a function that keeps them and stops the run."""
    from aespa.core.pipeline import quantize_model
    from experiments.runner import load_for_quantization

    cfg, checked, adapter, _, calibration = load_for_quantization(["method=aespa", *overrides, "progress=false"])
    if not checked.method.options.learn_rounding:
        raise UserError("method.learn_rounding=false: aespa learns no rounding, nothing to compare")
    seen = {}

    def capture(problems, **kwargs):
        seen["problems"], seen["kwargs"] = list(problems), kwargs
        raise _Captured

    with mock.patch.object(aespa.method, "learn_rounding", capture):
        try:
            quantize_model(adapter, checked.method, calibration, checked.device, cfg.batch_size, checked.dtype,
                           progress=False)
        except _Captured:
            pass
    return seen["problems"], seen["kwargs"]


def perturbed(p: RoundingProblem) -> RoundingProblem:
    """The problem with its input Hessian scaled by 1 + 2⁻²³."""
    return dataclasses.replace(p, hessian=p.hessian * (1 + 2.0**-23))


def flips(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    return sum(((x >= 0) != (y >= 0)).sum().item() for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", default=[], help="run.py overrides (default: model=tiny-llama bits=2)")
    parser.add_argument("--iters", type=int, default=2000, help="rounding steps (aespa's default: 2000)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    overrides = ["model=tiny-llama", "bits=2", *args.overrides]
    if args.iters < 1:
        print(f"error: --iters={args.iters}: at least 1 rounding step", file=sys.stderr)
        return 2
    print(f"capturing block 1's rounding problems ({' '.join(overrides)}) ...", flush=True)
    try:
        problems, kwargs = first_block_problems(overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kw = dict(iterations=args.iters, lr=kwargs["lr"], warmup=kwargs["warmup"], beta=kwargs["beta"])
    shifted = [perturbed(p) for p in problems]
    runs = {}
    for name, fn in [("closed form", lambda ps: [r.v for r in learn_rounding(ps, **kw)]),
                     ("autograd", lambda ps: [learn_rounding_autograd(p, **kw) for p in ps])]:
        for tag, ps in [("", problems), (", H·(1+2⁻²³)", shifted)]:
            t = time.perf_counter()
            runs[name + tag] = fn(ps)
            print(f"  {name + tag}: {time.perf_counter() - t:.0f} s", flush=True)
    n = sum(p.weight.numel() for p in problems)
    print(f"\nweights that round the other way after {args.iters} steps, of {n}:")
    print("| pair | weights | share |\n|---|---|---|")
    for a, b in [("closed form", "autograd"), ("closed form", "closed form, H·(1+2⁻²³)"),
                 ("autograd", "autograd, H·(1+2⁻²³)")]:
        f = flips(runs[a], runs[b])
        print(f"| {a} vs {b} | {f} | {100 * f / n:.3f} % |")
    per_layer = ", ".join(f"{p.name} {flips([x], [y])}" for p, x, y in
                          zip(problems, runs["closed form"], runs["autograd"]))
    print(f"\nclosed form vs autograd per layer: {per_layer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
