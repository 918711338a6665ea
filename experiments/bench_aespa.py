"""Where aespa's quantization time goes, and how far each phase is from its floor.

    python -m experiments.bench_aespa                                  # tiny-opt, tiny-llama; 32 and 128 windows, W2
    python -m experiments.bench_aespa --models tiny-opt --bits 3 --out results/bench
    python -m experiments.bench_aespa --models opt-125m --device cuda  # a paper model on a GPU
    python -m experiments.bench_aespa --iters 200                      # cheaper rounding
    python -m experiments.bench_aespa --models opt-1.3b --twin-layers 1 4 --twin-hidden 512 --iters 20
                                                                       # depth: twins of 1 and 4 blocks

Phases (summed over blocks): ``statistics`` (one pass per block: E[XXᵀ], the
attention-weighted value Hessian, query/key covariances), ``qparams`` (clipping search and
Z-Fold), ``optq_init`` (GPTQ sweep on the refined grid), ``rounding`` (AdaRound). Only
``statistics`` should grow with the number of calibration windows: every later phase
reads the pre-computed statistics (aespa §3.4, Table 7).

For every phase it prints the measured time, the floating-point work the phase has to do
(its matrix products, counted from the shapes), the machine's matmul throughput measured
here for exactly those shapes, and the floor (work / throughput) as a share of the measured
time ("% of floor": 100 % = nothing but the products, at the speed the BLAS gives them):

- ``statistics``: the block's forward pass up to the input of its last linear (linears and
  the attention core) plus the second moments (XᵀX per input group, (A_h X)ᵀ(A_h X) per head,
  query and key moments); it is also compared with a plain forward pass of the block over
  the same windows (``x forward``);
- ``qparams``: the candidate scoring of every clipping search that ran (each search scores
  100 ratios × 2 zero points, 100 symmetric, per row: ``2·out·in²`` per candidate, and the
  cross terms of group-wise grids); the searches are counted as they run;
- ``optq_init``: the Cholesky inverse (``in³``) and the column sweep (``2·out·in²``) per linear;
- ``rounding``: per step, one ``ΔW·H`` per stacked product and ``G·(ΔW H)`` for the
  Kronecker q/k objectives, times steps and blocks.

Calibration on the model's default set; nothing is evaluated or recorded. Peak host RSS is
the benchmark process's (one process per configuration); "quantization peak" is how far the
resident set rose above its level before quantizing (the loaded model, the calibration ids):
one block resident plus the calibration streams, so it stays flat as ``--twin-layers``
(architecture twins, seeded random weights, ``model.twin=true``) adds depth. On CUDA it is
the allocator's peak over its level before. Each configuration is composed
by Hydra from ``conf/`` as ``run.py`` composes it; the command line is argparse because the
benchmark loops over models and calibration sizes and prints one table.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import torch

from experiments.plan import MemoryGrowth
from experiments.tables import markdown_table

PHASES = ("statistics", "qparams", "optq_init", "rounding")


# --------------------------------------------------------------------------- matmul throughput


def _time(fn, min_s: float = 0.2, device=None) -> float:
    """Seconds per call of ``fn`` (best of 3 batches of calls lasting ``min_s`` or more)."""
    fn()
    best = float("inf")
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        best = min(best, elapsed / calls)
    return best


def matmul_rate(products: list[tuple[int, int, int, int]], device, dtype=torch.float32) -> tuple[float, float]:
    """(FLOPs, seconds) of the batched products ``[batch, m, k] @ [batch, k, n]`` listed,
    each timed on random data of its shape (one of each)."""
    flops = seconds = 0.0
    for batch, m, k, n in products:
        a = torch.randn(batch, m, k, device=device, dtype=dtype)
        b = torch.randn(batch, k, n, device=device, dtype=dtype)
        out = torch.empty(batch, m, n, device=device, dtype=dtype)
        if batch == 1:
            a2, b2, o2 = a[0], b[0], out[0]
            seconds += _time(lambda: torch.mm(a2, b2, out=o2), device=device)
        else:
            seconds += _time(lambda: torch.bmm(a, b, out=out), device=device)
        flops += 2.0 * batch * m * k * n
    return flops, seconds


# --------------------------------------------------------------------------- work per phase


def rounding_products(block) -> list[tuple[int, int, int, int]]:
    """The products of one rounding step of a block, as the solver stacks them
    (``aespa.core.rounding``): q with k (one input Hessian) then ``G·`` per head; v per head;
    o; gate with up; down."""
    g = block.geometry
    lin = block.linears()
    shape = {r: (m.out_features, m.in_features) for r, m in lin.items()}
    d = shape["q"][1]
    rows_qk = shape["q"][0] + shape["k"][0]
    products = [(1, rows_qk, d, d), (g.num_heads + g.num_kv_heads, g.head_dim, g.head_dim, d),
                (g.num_kv_heads, shape["v"][0] // g.num_kv_heads, d, d), (1, *shape["o"], shape["o"][1])]
    mlp = [r for r in lin if r not in ("q", "k", "v", "o")]
    first = [r for r in mlp if r != "down"]
    products.append((1, sum(shape[r][0] for r in first), shape[first[0]][1], shape[first[0]][1]))
    products.append((1, *shape["down"], shape["down"][1]))
    return products


def statistics_flops(block, tokens: int, seqlen: int) -> tuple[float, list[tuple[int, int, int, int]]]:
    """FLOPs of the statistics pass of one block over ``tokens`` tokens in windows of
    ``seqlen``, and the products that dominate it (for the throughput)."""
    g = block.geometry
    lin = block.linears()
    windows = tokens // seqlen
    forward = sum(2.0 * tokens * m.out_features * m.in_features for r, m in lin.items() if r != "down")
    attention = 4.0 * windows * seqlen * seqlen * g.num_heads * g.head_dim  # scores and A·V
    firsts = [grp.roles[0] for grp in block.groups]
    moments = sum(2.0 * tokens * lin[r].in_features ** 2 for r in firsts)
    d = lin["v"].in_features
    value = windows * g.num_heads * (2.0 * seqlen * seqlen * d + 2.0 * seqlen * d * d)  # A_h X and its moment
    query_key = 2.0 * tokens * g.head_dim ** 2 * (g.num_heads + g.num_kv_heads)
    batch = 8 * seqlen
    shapes = [(1, batch, m.in_features, m.out_features) for r, m in lin.items() if r != "down"]
    shapes += [(1, lin[r].in_features, batch, lin[r].in_features) for r in firsts]
    shapes += [(g.num_heads, seqlen, seqlen, d)]
    return forward + attention + moments + value + query_key, shapes


def optq_flops(block) -> tuple[float, list[tuple[int, int, int, int]]]:
    flops, shapes = 0.0, []
    for m in block.linears().values():
        flops += float(m.in_features) ** 3 + 2.0 * m.out_features * m.in_features ** 2
        shapes.append((1, m.out_features, m.in_features, m.in_features))
    return flops, shapes


class SearchCounter:
    """Counts the clipping searches (``aespa.qparams.hessian_weighted_grid``) a run makes:
    their scoring FLOPs and products, by wrapping the function where aespa calls it."""

    def __init__(self) -> None:
        self.flops = 0.0
        self.shapes: dict[tuple, int] = {}
        self.searches = 0

    def __enter__(self):
        import aespa.method
        import aespa.qparams

        self._modules = (aespa.qparams, aespa.method)
        self._original = aespa.qparams.hessian_weighted_grid

        def counted(weight, hessian, bits, sym=False, group_size=-1, col_scale=None):
            out_features, in_features = weight.shape
            size = in_features if group_size == -1 else group_size
            candidates = 100 if sym else 200
            per_candidate = 2.0 * out_features * size * size
            if size < in_features:
                per_candidate += 2.0 * out_features * size  # the cross term
            self.flops += candidates * (in_features // size) * per_candidate
            heads = hessian.shape[0] if hessian.dim() == 3 else 1
            chunk = max(1, aespa.qparams.CHUNK_ELEMENTS // (out_features * size))
            key = (heads, chunk * out_features // heads, size, size)
            self.shapes[key] = self.shapes.get(key, 0) + 1
            self.searches += 1
            return self._original(weight, hessian, bits, sym, group_size, col_scale)

        for module in self._modules:
            module.hessian_weighted_grid = counted
        return self

    def __exit__(self, *exc):
        for module in self._modules:
            module.hessian_weighted_grid = self._original

    def throughput_shapes(self) -> list[tuple[int, int, int, int]]:
        return list(self.shapes)


# --------------------------------------------------------------------------- one configuration


def bench(model_name: str, nsamples: int, bits: int, iters: int, device: torch.device,
          extra: tuple[str, ...] = ()) -> dict:
    from hydra import compose, initialize_config_dir

    from aespa.core.observe import run_block
    from aespa.core.pipeline import capture_inputs, quantize_model
    from experiments.methods import load_methods
    from experiments.runner import REPO, DataCache, DataSource, in_repo, load, local_paths, seed_everything, validate

    load_methods()  # a fresh process: the methods offered to Hydra as method=<name>
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        overrides = [f"model={model_name}", "method=aespa", f"bits={bits}", f"nsamples={nsamples}",
                     f"method.iters={iters}", "dtype=float32", *extra]
        cfg = compose(config_name="config", overrides=overrides)
    method = validate(cfg).method
    seed_everything(cfg.seed)
    model, tokenizer, adapter, seqlen = load(cfg, method, torch.float32)
    calibration = DataSource(DataCache(in_repo(cfg.cache_dir)), local_paths(cfg), tokenizer,
                             seqlen).calibration(cfg.calib.dataset, nsamples, cfg.seed)
    n_blocks = len(adapter.blocks)
    block = adapter.block(0)
    tokens = calibration.numel()

    # a plain forward pass of every block over the same windows (the statistics' yardstick)
    inputs, kwargs = capture_inputs(adapter, calibration, device, cfg.batch_size, store_device=device)
    forward_s = 0.0
    with torch.no_grad():
        for i in range(n_blocks):
            module = adapter.block(i).module.to(device=device, dtype=torch.float32)
            start = time.perf_counter()
            run_block(module, inputs, kwargs, device, torch.float32, cfg.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            forward_s += time.perf_counter() - start
            module.to("cpu")
    del inputs

    with MemoryGrowth(device) as memory:
        start = time.perf_counter()
        with SearchCounter() as searches:
            result = quantize_model(adapter, method, calibration, device, cfg.batch_size, progress=False)
        total = time.perf_counter() - start
    quantization_peak = memory.growth
    phases = {p: result.phases.get(p, 0.0) for p in PHASES}

    work = {}
    flops, shapes = statistics_flops(block, tokens, seqlen)
    work["statistics"] = (n_blocks * flops, shapes)
    work["qparams"] = (searches.flops, searches.throughput_shapes())
    flops, shapes = optq_flops(block)
    work["optq_init"] = (n_blocks * flops, shapes)
    step = rounding_products(block)
    work["rounding"] = (n_blocks * iters * sum(2.0 * b * m * k * n for b, m, k, n in step), step)
    rows = {}
    for phase in PHASES:
        flops, shapes = work[phase]
        rate_flops, rate_s = matmul_rate(shapes, device) if shapes else (0.0, 0.0)
        rate = rate_flops / rate_s if rate_s else float("nan")
        floor = flops / rate if rate == rate else float("nan")
        rows[phase] = {"seconds": phases[phase], "gflop": flops / 1e9, "rate": rate / 1e9,
                       "floor": floor, "share": 100 * floor / phases[phase] if phases[phase] else float("nan")}
    label = model_name + (f" twin, {n_blocks} block{'s' if n_blocks > 1 else ''}" if cfg.model.get("twin") else "")
    return {"model": label, "nsamples": nsamples, "bits": bits, "iters": iters, "blocks": n_blocks,
            "phases": rows, "total": total, "forward": forward_s, "searches": searches.searches,
            "rounding_ms_per_step": 1e3 * phases["rounding"] / max(1, n_blocks * iters),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "quantization_peak": quantization_peak}


def bench_isolated(model: str, nsamples: int, bits: int, iters: int, device, threads: int,
                   extra: tuple[str, ...] = ()) -> dict:
    """:func:`bench` in a fresh process (its own peak RSS and thread count)."""
    from experiments.isolated import run_isolated

    # glibc hands freed tensors back at once above this size, so the resident set follows the live tensors
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return run_isolated(bench, model, nsamples, bits, iters, device, tuple(extra), threads=threads)


# --------------------------------------------------------------------------- report


def report(rows: list[dict], machine: str) -> str:
    first = rows[0]
    lines = [f"### aespa W{first['bits']}, {first['iters']} rounding steps, on {machine}; seconds summed over blocks",
             ""]
    header = ["model", "windows", "phase", "time (s)", "GFLOP", "matmul GFLOP/s (these shapes)", "floor (s)",
              "% of floor"]
    body = []
    for r in rows:
        for phase in PHASES:
            p = r["phases"][phase]
            body.append([r["model"], r["nsamples"], phase, f"{p['seconds']:.1f}", f"{p['gflop']:.1f}",
                         f"{p['rate']:.1f}", f"{p['floor']:.1f}", f"{p['share']:.0f} %"])
    lines += [markdown_table(header, body), ""]
    header = ["model", "windows", "total (s)", "qparams share", "rounding ms/step (block)",
              "statistics / plain forward", "clipping searches", "peak host RSS (GiB)", "quantization peak (MiB)"]
    body = [[r["model"], r["nsamples"], f"{r['total']:.1f}",
             f"{100 * r['phases']['qparams']['seconds'] / r['total']:.1f} %", f"{r['rounding_ms_per_step']:.2f}",
             f"{r['phases']['statistics']['seconds'] / r['forward']:.2f}x ({r['forward']:.1f} s)",
             r["searches"], f"{r['peak_rss'] / 2**30:.2f}", f"{r['quantization_peak'] / 2**20:.0f}"] for r in rows]
    lines += [markdown_table(header, body)]
    return "\n".join(lines)


def main(argv=None) -> None:
    from experiments.runner import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-opt", "tiny-llama"])
    parser.add_argument("--nsamples", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2000, help="AdaRound iterations per linear (default: the paper's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of each run")
    parser.add_argument("--twin-layers", nargs="+", type=int, default=None,
                        help="run the models as architecture twins (model.twin=true) of these depths")
    parser.add_argument("--twin-hidden", type=int, default=None, help="the twins' width (default: the model's)")
    parser.add_argument("--seqlen", type=int, default=None, help="calibration window length (default: the model's)")
    parser.add_argument("--out", default=None, help="also write the report to OUT/aespa_<models>_w<bits>.md")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    common = [] if args.seqlen is None else [f"seqlen={args.seqlen}"]
    if args.twin_layers:  # twins read the project's tokenizer: calibrate on the embedded corpus
        common += ["model.twin=true", "calib=wikivital", "eval.datasets=[wikivital]"]
        common += [] if args.twin_hidden is None else [f"model.twin_hidden={args.twin_hidden}"]
    variants = [[f"model.twin_layers={n}"] for n in args.twin_layers] if args.twin_layers else [[]]
    rows = [bench_isolated(m, n, args.bits, args.iters, device, args.threads, tuple(common + v))
            for m in args.models for n in args.nsamples for v in variants]
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.machine()} CPU ({os.cpu_count()} cores), {args.threads} thread(s)"
    text = report(rows, machine)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        depth = f"_twins{'-'.join(map(str, args.twin_layers))}" if args.twin_layers else ""
        path = os.path.join(args.out, f"aespa_{'_'.join(args.models)}{depth}_w{args.bits}.md")
        with open(path, "w") as f:
            f.write(text + "\n")
        print(f"written: {path}")


if __name__ == "__main__":
    main()
