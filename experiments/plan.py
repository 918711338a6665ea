"""A run's resource plan, before any weight loads.

    python run.py model=llama-2-70b method=aespa bits=2 plan=true
    python -m experiments.plan --table                                   # every paper model, aespa and GPTQ

The architecture is built on the meta device from the model's ``config.json`` (a local
folder) or from the architecture facts of its config (``arch:`` in ``conf/model/*.yaml``),
so nothing is downloaded or allocated. From its shapes, the run's settings (``nsamples``,
``seqlen``, ``batch_size``, ``dtype``) and the method's own estimate
(:meth:`aespa.core.method.Method.footprint`), the plan prints:

- parameters, and the host RAM the loaded model takes (the model lives on the host; the
  pipeline moves one block at a time to the device);
- the device memory at the peak of each phase: capturing the inputs of block 0, quantizing
  one block (the block in fp32, the calibration streams, the forward pass's temporaries of
  one mini-batch, the method's state), evaluation;
- the checkpoint's disk (the streams and the quantized blocks so far, at the last block);
- the time per block from a FLOP count (forward passes of the block over the calibration
  set, plus the method's own FLOPs) at the device's measured matmul throughput (measured
  here, on the device the run would use; ``plan_tflops`` overrides it);
- which GPU memory sizes hold the peak, and the knobs that lower it.

The accounting, term by term (``S = nsamples·seqlen·hidden`` values in the model's dtype,
one calibration stream):

- a block is quantized in three steps, each with its own peak: the method observes the block
  (a pass over the stream with its hooks: one stream, the temporaries, what the method
  accumulates), works on what it observed (its ``work_bytes`` on top of its ``state_bytes``),
  and the pipeline propagates the stream (the stream and the next one being written, 2 S,
  filled in place mini-batch by mini-batch); a method that needs the full-precision stream
  holds its input and output (2 S) throughout;
- forward temporaries of one mini-batch of ``b`` windows
  (:func:`aespa.core.method.activation_bytes`): per token the larger of attention's
  (``6·d``) and the MLP's (``2·d + 2·ff``, ``3·ff`` gated) activations and, where attention is
  observed (the method's ``footprint`` says so), scores and probabilities (``2·b·heads·T·T``), fp32;
- the method's state (its Hessians, statistics, optimiser state) as the method declares it.

Validated against measured peaks (``tests/test_plan.py``): on the CPU the measured value is
the growth of the process's resident memory over its level before quantization
(``VmHWM`` after a reset), on CUDA ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from aespa.core.adapters import ModelAdapter
from aespa.core.errors import UserError
from aespa.core.method import Footprint, Method, activation_bytes, block_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
# memory of the GPUs a researcher is likely to be given (GiB as the driver reports them, rounded)
GPUS = (("RTX 4090 / A10 / L4", 24), ("A100 40GB", 40), ("A6000 / L40S", 48), ("A100 / H100 80GB", 80),
        ("H200", 141))
USABLE = 0.92  # the share of a GPU's memory a run can allocate (context, allocator slack)
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass
class Shapes:
    """The sizes a plan needs, read off the architecture built on the meta device."""

    n_blocks: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    block_params: int
    outside_params: int
    linears: dict[str, tuple[int, int]]  # role -> (out, in)

    @property
    def params(self) -> int:
        return self.n_blocks * self.block_params + self.outside_params


def meta_model(model_config):
    """The causal LM of ``model_config`` on the meta device (shapes, no memory)."""
    from transformers import AutoModelForCausalLM

    from aespa.core.attention import register_attention

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, attn_implementation=register_attention())


def shapes_of(adapter: ModelAdapter) -> Shapes:
    block = adapter.block(0)
    block_params = sum(p.numel() for p in block.module.parameters())
    total = sum(p.numel() for p in adapter.model.parameters())  # tied weights counted once
    linears = {r: (m.out_features, m.in_features) for r, m in block.linears().items()}
    ffn = max(o for r, (o, _) in linears.items() if r in ("up", "gate"))
    g, c = adapter.geometry, adapter.model.config
    return Shapes(len(adapter.blocks), g.hidden_size, g.num_heads, g.num_kv_heads, g.head_dim, ffn,
                  c.vocab_size, block_params, total - len(adapter.blocks) * block_params, linears)


@dataclass
class Settings:
    nsamples: int
    seqlen: int
    batch_size: int
    dtype: torch.dtype  # the model's dtype (fp16 on CUDA by default)
    eval_windows: int = 0  # test windows of the largest evaluation set (0: unknown, 1 window counted)


@dataclass
class Plan:
    shapes: Shapes
    settings: Settings
    footprint: Footprint
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> term -> bytes
    host_bytes: int = 0
    checkpoint_bytes: int = 0
    flops_per_block: float = 0.0
    tflops: float | None = None
    tflops_source: str = "measured"

    @property
    def peaks(self) -> dict[str, int]:
        return {phase: sum(terms.values()) for phase, terms in self.phases.items()}

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    @property
    def peak_phase(self) -> str:
        return max(self.peaks, key=self.peaks.get)

    def seconds_per_block(self) -> float | None:
        return None if not self.tflops else self.flops_per_block / (self.tflops * 1e12)


def make_plan(adapter: ModelAdapter, method: Method, settings: Settings, tflops: float | None = None) -> Plan:
    """The plan of quantizing ``adapter``'s model with ``method`` (weights never touched)."""
    s, st = shapes_of(adapter), settings
    block = adapter.block(0)
    tokens = st.nsamples * st.seqlen
    fp = method.footprint(block, st.nsamples, st.seqlen, st.batch_size)
    plan = Plan(s, st, fp, tflops=tflops)
    model_b = DTYPE_BYTES.get(st.dtype, 4)
    plan.phases["capture"] = {"modules outside the blocks": s.outside_params * model_b,
                              "stream of block 0": tokens * s.hidden * model_b}
    # the streams keep the model's dtype (block 0's inputs as the embedding gives them; every block's
    # outputs cast back to it), while each block computes in fp32
    q_stream = tokens * s.hidden * model_b
    fp_streams = (2 if method.needs_fp_stream else 0) * q_stream
    observed = activation_bytes(block, st.batch_size, st.seqlen, fp.attention_observed)
    plan.phases["observe a block"] = {"block in fp32": 4 * s.block_params, "calibration streams": q_stream + fp_streams,
                                      "forward temporaries": observed, "method state": fp.state_bytes}
    plan.phases["method's own work"] = {"block in fp32": 4 * s.block_params,
                                        "calibration streams": q_stream + fp_streams,
                                        "method state": fp.state_bytes + fp.work_bytes}
    plan.phases["propagate"] = {"block in fp32": 4 * s.block_params, "calibration streams": 2 * q_stream + fp_streams,
                                "forward temporaries": activation_bytes(block, st.batch_size, st.seqlen, False)}
    windows = max(1, st.eval_windows)
    plan.phases["evaluate"] = {
        "one block": s.block_params * model_b,
        "hidden states of the test set": 2 * windows * st.seqlen * s.hidden * model_b,
        "forward temporaries": activation_bytes(block, st.batch_size, st.seqlen, False) * model_b // 4,
        "modules outside the blocks": s.outside_params * model_b,
        "one mini-batch's logits and loss": 3 * 4 * st.batch_size * st.seqlen * s.vocab,
    }
    plan.host_bytes = s.params * model_b
    plan.checkpoint_bytes = q_stream + fp_streams // 2 + s.params * model_b
    plan.flops_per_block = fp.passes * block_flops(block, st.nsamples, st.seqlen) + fp.flops
    return plan


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2**20:.1f} MiB"


def fmt_seconds(x: float) -> str:
    if x < 120:
        return f"{x:.1f} s"
    return f"{x / 60:.1f} min" if x < 7200 else f"{x / 3600:.1f} h"


def report(plan: Plan, title: str, device: str) -> str:
    s, st = plan.shapes, plan.settings
    lines = [f"resource plan: {title}",
             f"  parameters        {s.params / 1e9:.3f} B ({s.n_blocks} blocks of {s.block_params / 1e6:.1f} M, "
             f"hidden {s.hidden}, {s.heads} heads / {s.kv_heads} kv-heads, ffn {s.ffn}, vocab {s.vocab})",
             f"  host RAM to load  {gib(plan.host_bytes)} ({str(st.dtype).removeprefix('torch.')})",
             f"  calibration       {st.nsamples} x {st.seqlen} tokens, mini-batches of {st.batch_size}",
             "  device memory at the peak of each phase:"]
    for phase, terms in plan.phases.items():
        lines.append(f"    {phase:<18} {gib(sum(terms.values())):>11}   "
                     + ", ".join(f"{k} {gib(v)}" for k, v in terms.items() if v))
    lines.append(f"  peak              {gib(plan.peak)} ({plan.peak_phase})")
    lines.append(f"  checkpoint disk   {gib(plan.checkpoint_bytes)} (at the last block: streams + the model)")
    per_block = plan.seconds_per_block()
    flops = f"{plan.flops_per_block / 1e12:.2f} TFLOP per block"
    if per_block is None:
        lines.append(f"  time              {flops} (no throughput measured)")
    else:
        lines.append(f"  time              {flops} at {plan.tflops:.2f} TFLOP/s {plan.tflops_source} on {device}: "
                     f"{fmt_seconds(per_block)} per block, {fmt_seconds(per_block * s.n_blocks)} for the model "
                     "(the FLOP floor: element-wise work and launches come on top)")
    fits = [f"{name} ({size} GB)" for name, size in GPUS if plan.peak <= USABLE * size * 1e9]
    short = [f"{name} ({size} GB)" for name, size in GPUS if plan.peak > USABLE * size * 1e9]
    lines.append(f"  fits              {', '.join(fits) or 'none of ' + ', '.join(n for n, _ in GPUS)}")
    if short:
        lines.append(f"  does not fit      {', '.join(short)}")
    lines.append("  lower the peak    " + "; ".join(knobs(plan)))
    return "\n".join(lines)


def knobs(plan: Plan) -> list[str]:
    """What to change, biggest term of the peak phase first."""
    terms = plan.phases[plan.peak_phase]
    advice = {
        "calibration streams": "nsamples (the streams scale with it)",
        "forward temporaries": "batch_size (temporaries scale with it; results do not depend on it)",
        "method state": plan.footprint.knob or "the method's own state does not shrink with the run's knobs",
        "block in fp32": "nothing but a smaller model: one block in fp32 is the floor",
        "stream of block 0": "nsamples",
        "modules outside the blocks": "nothing: the embedding and head sit on the device while inputs are captured",
        "hidden states of the test set": "eval.max_windows",
        "one mini-batch's logits and loss": "batch_size",
    }
    return [f"{k}: {advice[k]}" for k, _ in sorted(terms.items(), key=lambda kv: -kv[1]) if k in advice][:3]


def measured_tflops(device: torch.device, s: Shapes, seqlen: int, batch: int) -> float:
    """fp32 matmul throughput of this device on the block's largest linear, one mini-batch."""
    out, inp = max(s.linears.values(), key=lambda oi: oi[0] * oi[1])
    rows = min(batch * seqlen, 8192)
    a = torch.randn(rows, inp, device=device)
    w = torch.randn(out, inp, device=device)

    def once():
        a @ w.T
        if device.type == "cuda":
            torch.cuda.synchronize()

    once()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        once()
        n += 1
    return 2.0 * rows * inp * out * n / (time.perf_counter() - start) / 1e12


def model_architecture(model: dict):
    """The transformers config of a run's model without its weights: a twin's
    (``model.twin=true``), the local folder's config.json, or the architecture facts of the
    model config (``arch:`` in ``conf/model/*.yaml``)."""
    from transformers import AutoConfig

    from experiments import twins
    from experiments.validation import model_config_file

    if model.get("twin"):
        return twins.twin_config(model)
    file = model_config_file(model["path"])
    if file is not None:
        return AutoConfig.from_pretrained(os.path.dirname(file))
    if model.get("arch"):
        return twins.architecture_config(model)
    raise UserError(f"plan=true needs the architecture of model {model.get('name')!r}: a local model.path with its "
                    f"config.json, or architecture facts (arch: in conf/model/{model.get('name')}.yaml)")


def plan_run(cfg, method: Method, device: torch.device, dtype: torch.dtype) -> Plan:
    """The plan of the run ``cfg`` (composed by Hydra as ``run.py`` composes it)."""
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(cfg.model, resolve=True)
    adapter = ModelAdapter(meta_model(model_architecture(model)))
    seqlen = cfg.seqlen or cfg.model.seqlen
    tflops = cfg.get("plan_tflops") or measured_tflops(device, shapes_of(adapter), seqlen, cfg.batch_size)
    plan_given = bool(cfg.get("plan_tflops"))
    settings = Settings(cfg.nsamples, seqlen, cfg.batch_size, dtype, eval_windows=_eval_windows(cfg, seqlen))
    plan = make_plan(adapter, method, settings, tflops)
    plan.tflops_source = "given (plan_tflops)" if plan_given else "measured"
    return plan


def _eval_windows(cfg, seqlen: int) -> int:
    """Test windows of the largest evaluation set: WikiText-2's test split is ~341 k tokens
    with the LLaMA/OPT tokenizers, C4's 256 windows of the reference protocol; capped by
    ``eval.max_windows``."""
    known = {"wikitext2": 341_469 // seqlen, "c4": 256, "c4-new": 256, "ptb": 82_430 // seqlen,
             "ptb-new": 82_430 // seqlen}
    n = max([known.get(d, 1) for d in cfg.eval.datasets] or [1])
    return min(n, cfg.eval.max_windows) if cfg.eval.get("max_windows") else n


def print_plan(cfg, method: Method, device: torch.device, dtype: torch.dtype) -> Plan:
    plan = plan_run(cfg, method, device, dtype)
    title = f"model={cfg.model.name} method={method.name} bits={cfg.bits}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "a CUDA device"
    else:
        name = f"the CPU ({torch.get_num_threads()} threads)"
    print(report(plan, title, name))
    return plan


def main(cfg) -> Plan:
    """``plan=true``: the checks that need no model (keys, the method's options), then the plan;
    nothing is downloaded, loaded or written. ``device=cuda`` on a machine without one plans
    for a GPU (fp16 unless ``dtype`` says otherwise) at the throughput ``plan_tflops`` gives."""
    from omegaconf import OmegaConf

    from experiments import validation

    config = OmegaConf.to_container(cfg, resolve=True)
    validation.check_keys(config)
    method = validation.check_method(config)
    name = config["device"]
    if name.startswith("cuda") and not torch.cuda.is_available():
        if not config.get("plan_tflops"):
            raise UserError(f"device={name} is not on this machine, so its throughput cannot be measured; give it "
                            "as plan_tflops=<TFLOP/s> (e.g. plan_tflops=60 for an A100's fp32 tensor cores)")
        device = torch.device("cuda")
    else:
        device = validation.resolve_device(name)
    dtype = validation.resolve_dtype(config["dtype"], device)
    return print_plan(cfg, method, device, dtype)


# --------------------------------------------------------------------------- validation against a measurement

RESIDENT = ("block in fp32", "modules outside the blocks", "one block")  # already in host RAM on a CPU (fp32)
MEASURED_PHASES = ("capture", "observe a block", "method's own work", "propagate")


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class MemoryGrowth:
    """How far memory rises above its level at entry, as ``growth`` (bytes) after exit: on
    CUDA the allocator's peak, on a CPU the resident set's peak (``VmHWM``, reset at entry)."""

    def __init__(self, device: torch.device):
        self.device, self.growth = device, 0

    def __enter__(self) -> MemoryGrowth:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.before = 1024 * status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.growth = torch.cuda.max_memory_allocated(self.device) - self.before
        else:
            self.growth = 1024 * status_kib("VmHWM") - self.before


def measure_quantization_peak(overrides: list[str]) -> dict:
    """Quantize one configuration (composed like ``run.py``) and return the plan's predicted
    growth of memory during quantization next to the measured one: on a CPU the resident
    set's peak (``VmHWM``, reset before) over its level before quantization, on CUDA the
    allocator's peak over its level before. Run it in a fresh process
    (``experiments.isolated``) with ``MALLOC_MMAP_THRESHOLD_`` set low, so that freed tensors
    leave the resident set."""
    from aespa.core.pipeline import quantize_model
    from experiments.isolated import run_isolated
    from experiments.runner import load_for_quantization

    # tokenizing a cold cache here would leave freed memory that quantization then reuses
    # (measured: 119 MB instead of 148 MB), so the windows are cached by another process first
    run_isolated(cache_calibration, overrides, threads=1)
    cfg, checked, adapter, seqlen, calibration = load_for_quantization(overrides)
    plan = make_plan(adapter, checked.method, Settings(cfg.nsamples, seqlen, cfg.batch_size, checked.dtype))
    device = checked.device
    with MemoryGrowth(device) as memory:
        quantize_model(adapter, checked.method, calibration, device, cfg.batch_size, checked.dtype, progress=False)
    resident = device.type == "cpu" and checked.dtype == torch.float32
    growth = {p: sum(v for k, v in plan.phases[p].items() if not (resident and k in RESIDENT))
              for p in MEASURED_PHASES}
    phase = max(growth, key=growth.get)
    return {"predicted": growth[phase], "measured": memory.growth, "peak_phase": phase, "terms": plan.phases[phase]}


def cache_calibration(overrides: list[str]) -> None:
    """Tokenize a configuration's calibration windows into the data cache."""
    from experiments.runner import load_for_quantization

    load_for_quantization(overrides)


# --------------------------------------------------------------------------- every paper model


def paper_models() -> list[str]:
    """The model configs with architecture facts (``arch:``), in conf/model/ order."""
    import yaml

    folder = os.path.join(REPO, "conf", "model")
    names = []
    for f in sorted(os.listdir(folder)):
        with open(os.path.join(folder, f)) as fh:
            if f.endswith(".yaml") and (yaml.safe_load(fh) or {}).get("arch"):
                names.append(f[:-5])
    return sorted(names, key=lambda n: (n.split("-")[0], _size(n)))


def _size(name: str) -> float:
    import yaml

    with open(os.path.join(REPO, "conf", "model", f"{name}.yaml")) as f:
        return float(yaml.safe_load(f).get("size_b", 0))


def table(methods: list[str], bits: int, dtype: torch.dtype = torch.float16) -> str:
    """A Markdown table: for every paper model and method, the plan of a GPU run in ``dtype``
    with the papers' calibration (128 x 2048): parameters, host RAM, the peak and its phase,
    the smallest GPU of :data:`GPUS` that holds it."""
    from omegaconf import OmegaConf

    from experiments import validation
    from experiments.runner import compose

    rows = ["| model | params (B) | host RAM (fp16) | method | device peak | at | smallest GPU that fits |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in paper_models():
        for m in methods:
            cfg = compose([f"model={name}", f"method={m}", f"bits={bits}"])
            method = validation.check_method(OmegaConf.to_container(cfg, resolve=True))
            adapter = ModelAdapter(meta_model(model_architecture(OmegaConf.to_container(cfg.model, resolve=True))))
            settings = Settings(cfg.nsamples, cfg.seqlen or cfg.model.seqlen, cfg.batch_size, dtype,
                                eval_windows=_eval_windows(cfg, cfg.seqlen or cfg.model.seqlen))
            plan = make_plan(adapter, method, settings)
            fits = next((f"{g} ({size} GB)" for g, size in GPUS
                         if plan.peak <= USABLE * size * 1e9), "none (> 141 GB)")
            rows.append(f"| {name} | {plan.shapes.params / 1e9:.2f} | {gib(plan.host_bytes)} | {m} | "
                        f"{gib(plan.peak)} | {plan.peak_phase} | {fits} |")
    return "\n".join(rows)


def cli(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="resource plans without loading weights (one run: "
                                                 "python run.py ... plan=true)")
    parser.add_argument("--table", action="store_true", help="every paper model (conf/model with arch:)")
    parser.add_argument("--methods", nargs="+", default=["gptq", "aespa"])
    parser.add_argument("--bits", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.table:
        parser.error("give --table, or plan one run with: python run.py model=... method=... plan=true")
    print(table(args.methods, args.bits))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
