"""QLLM (Liu et al., ICLR 2024): adaptive channel reassembly and efficient low-rank error
correction, for weight-activation quantization (W4A4, W4A8, W6A6).

Blocks are processed in chunks of ``blocks_per_chunk`` consecutive blocks (4; the last chunk
takes what is left). When the pipeline reaches the first block of a chunk:

1. **Statistics** — the full-precision chunk runs on the full-precision stream: per-channel
   ``max|x|`` of the input of every reassembly point over all calibration windows, the
   first ``search_samples`` windows of each block's input for the search, and the chunk's
   output (the target of step 4).
2. **Adaptive channel reassembly** (§4.1, ``baselines.qllm.reassembly``) of the inputs of q/k/v,
   of gate/up (fc1) and of down (fc2) — not of o, as in the reference: channel disassembly
   (Eq. 3), channel assembly by bipartite soft matching with the paper's pair distance
   (Eq. 5; ``distance: reference`` uses the official code's surrogate), and θ from the
   uniform grid with at most ``channel_ratio`` extra channels, chosen by the smallest
   measured error (Eq. 6) of the consuming function with fake-quantized weights and input:
   the attention output before o (Q, K, V unquantized in the probe, as in the reference),
   the MLP product that feeds down, the output of down.
3. Weights: per-channel (or group-wise) min-max round-to-nearest of the reassembled weights;
   activations: per-token fake quantization of every linear's input and of Q, K, V
   (``aespa.core.actquant``), softmax output in full precision.
4. **Efficient error correction** (§4.2): a rank-``rank`` pair (A Kaiming-uniform, B zero,
   scaling α/r) on every linear of the chunk, ``Y = Q_a(X) (Q_w(W) + B A α/r)ᵀ``, trained with
   the weights frozen to minimise ``‖F_chunk(W, X_fp) − F_chunk(Ŵ, X_q)‖²``: the target is the
   full-precision chunk on the full-precision stream, the student the quantized chunk on the
   quantized stream at the chunk's first block. AdamW (weight decay 0), lr 5e-4 decayed
   linearly to 0 without warm-up, batch 1, random order each epoch, 10 epochs. The norms'
   gains and biases and the linears' biases train too (``train_norms``; the reference's
   ``mark_only_lora_as_trainable(..., "all")``).
5. **Merge**: ``W ← W + B A α/r`` in full precision, then re-quantized (App. M).

How a chunk fits the block-by-block pipeline: the chunk's later blocks are quantized on
copies when the pipeline reaches its first block (the pipeline still propagates the
full-precision stream through the untouched originals), and each copy's result is moved
into its block when the pipeline reaches that block; the quantized stream it then
propagates is exactly the merged chunk's. Without EEC a chunk is one block.

What the quantized model is: a standard model whose reassembled linears have a new input
width and read their input through one parameter-free index map (a gather and an
``index_add`` over channels; ``baselines.qllm.reassembly.ReassembledLinear``). The reassembly's
per-channel coefficients (``1/T`` of a disassembled channel, ``1/group size`` of a merged
one) are folded into the op producing the activation: the gain (and bias) of the norm
before q/k/v and before gate/up (fc1), and the rows (and bias) of up (fc1) before the MLP
product (ReLU). Nothing else changes.

Ablation switches (paper Tables 2 and 3): ``reassembly`` (off: EEC only), ``assembly``
(off: disassembly only, the inputs widen by the extra channels), ``adaptive`` (off: the
smallest θ within ``channel_ratio``, the reference's uniform disassembly), ``eec``.

Deviations from the reference code (stated on purpose):

- Both the OPT and the LLaMA families are supported (the reference runs LLaMA only); the
  last chunk of a depth not divisible by ``blocks_per_chunk`` is shorter (the reference
  silently leaves those blocks unquantized).
- Assembly pairs channels by their index in the original activation (A even, B odd) both
  while searching θ and when applying it; the reference searches that way but applies the
  matching on the disassembled activation, so its final pairs can differ from the ones it
  measured. When assembly cannot merge as many channels as disassembly added (too few
  channels left to merge), that θ is not tried (the reference merges disassembled ones).
- The search also measures θ = max (no reassembly) and keeps it when it is best; the
  reference only tries thresholds that add channels.
- The reference also tunes the final norm with an added bias after the last chunk
  (``tune_last_ln``; not in the paper); not done here, so the model stays standard.
- Training and the search run in fp32 (the reference uses bf16 autocast); the weight grid
  is the shared min-max grid (range forced to contain 0; per row this almost never
  differs from the reference's raw min/max).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from aespa.core.actquant import install_activation_quantizers
from aespa.core.adapters import BlockAdapter, LinearGroup
from aespa.core.errors import UserError
from aespa.core.grid import minmax_grid, quantize_activation
from aespa.core.method import Method, register
from aespa.core.observe import block_output, observe_block
from aespa.core.options import option
from aespa.core.pipeline import BlockContext
from aespa.core.transforms import (
    ChannelStatistics,
    ChannelTransform,
    refuse_residual_fed,
    scale_norm,
    scale_output_rows,
)
from baselines.qllm.reassembly import DISTANCES, ChannelReassembly, ReassembledLinear, pair_distance, search_threshold

REASSEMBLY_FEEDERS = ("attn_norm", "mlp_norm", "up")  # inputs of q/k/v, of gate/up (fc1), of down (fc2); not o
FOLDS_INTO_UP_ROWS = ("swiglu", "relu")  # act(gate)·up and ReLU(fc1) commute with a positive row factor


class LowRank(nn.Module):
    """A rank-r correction ``B A · α/r`` of a weight ``[out, in]`` (A Kaiming-uniform, B zero)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, device=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def delta(self) -> torch.Tensor:
        return self.B @ self.A * self.scaling

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """The unmerged low-rank path ``x Aᵀ Bᵀ · α/r``."""
        return (x @ self.A.T) @ self.B.T * self.scaling


def merge_low_rank(weight: torch.Tensor, low_rank: LowRank) -> torch.Tensor:
    """``W + B A · α/r`` (App. M), to be re-quantized."""
    return weight + low_rank.delta().detach()


@register("qllm")
class QLLM(Method):
    needs_fp_stream = True
    supports_act_quant = True

    @dataclass(frozen=True)
    class Options:
        # adaptive channel reassembly (§4.1), at the inputs of q/k/v, gate/up (fc1) and down (fc2)
        reassembly: bool = option(True, "false = no channel disassembly/assembly at all (the 'EEC only' ablation)")
        assembly: bool = option(True, "merge as many similar channel pairs as disassembly added (CA); false = "
                                      "disassembly only, inputs widen")
        adaptive: bool = option(True, "θ with the smallest measured output error (Eq. 6); false = the smallest θ "
                                      "channel_ratio allows")
        channel_ratio: float = option(0.2, "at most this fraction of extra channels per reassembly point (all "
                                           "reference scripts: 0.2)", low=0, high=1)
        distance: str = option("paper", "channel-pair distance for assembly: paper (Eq. 5) | reference (the "
                                        "official code's surrogate)", choices=DISTANCES)
        search_samples: int = option(1, "calibration windows the θ search measures its error on (reference "
                                        "--calibrate_bs 1)", low=1)
        # efficient error correction (§4.2)
        eec: bool = option(True, "false = reassembly + round-to-nearest only (the 'reassembly only' ablation)")
        rank: int = option(4, "rank of the low-rank pair on every linear", low=1)
        lora_alpha: float = option(1.0, "the pair's scaling is lora_alpha / rank (reference: 1 / 4)")
        blocks_per_chunk: int = option(4, "consecutive blocks trained together (reference --num_layer 4); the last "
                                          "chunk takes the rest", low=1)
        epochs: int = option(10, "passes over the calibration windows per chunk (batch 1, random order)", low=0)
        lr: float = option(5e-4, "AdamW learning rate, decayed linearly to 0 (scripts: 1e-4 for some LLaMA-2 "
                                 "settings)", positive=True)
        weight_decay: float = option(0.0, "AdamW weight decay", low=0)
        train_norms: bool = option(True, "also train the norms' gains/biases and the linears' biases (reference: "
                                         "mark_only_lora_as_trainable 'all')")

    def __init__(self, spec, options=None):
        super().__init__(spec, options)
        o = self.options
        self.reassembly, self.assembly, self.adaptive = o.reassembly, o.assembly, o.adaptive
        self.channel_ratio, self.distance, self.search_samples = o.channel_ratio, o.distance, o.search_samples
        self.eec, self.rank, self.alpha = o.eec, o.rank, o.lora_alpha
        self.blocks_per_chunk, self.epochs, self.lr = o.blocks_per_chunk, o.epochs, o.lr
        self.weight_decay, self.train_norms = o.weight_decay, o.train_norms
        if self.reassembly and not self.assembly and spec.group_size != -1:
            raise UserError("qllm with assembly=false widens the reassembled inputs, which breaks group-wise weights; "
                            "use group_size=-1 or assembly=true")
        self.act_bits = None if spec.weight_only else spec.act_bits
        self.history: list[dict] = []  # per chunk: blocks, first/last epoch loss

    def check(self, model) -> None:
        """Channel reassembly folds into the norms before q/k/v and fc1: a family without them is refused."""
        super().check(model)
        if self.reassembly:
            refuse_residual_fed(model.block(0), "qllm's channel reassembly", "use method.reassembly=false "
                                "(error correction only)")

    # ------------------------------------------------------------------ the pipeline's view

    def span(self, index: int, n_blocks: int) -> int:
        """A chunk runs to the end of its nominal chunk of ``blocks_per_chunk`` (one block without EEC)."""
        if not self.eec:
            return 1
        return min((index // self.blocks_per_chunk + 1) * self.blocks_per_chunk, n_blocks) - index

    def quantize_block(self, ctx: BlockContext) -> None:
        """Steps 1–5 for the chunk ``ctx.blocks``."""
        blocks = ctx.blocks
        kwargs = ctx.call_kwargs()

        with ctx.phase("statistics"):
            fp, observed = ctx.fp_inputs, []
            for b in blocks:
                maxima, search_inputs, fp = self.observe(b, fp, ctx)
                observed.append((maxima, search_inputs))
            target = fp

        reassemblies, fp_weights = {}, {}
        with ctx.phase("reassembly"):
            for b, (maxima, search_inputs) in zip(blocks, observed):
                reassemblies[b.index] = {}
                if self.reassembly:
                    reassemblies[b.index] = self.reassemble_block(b, maxima, search_inputs, kwargs, ctx)
                fp_weights[b.index] = self.install(b, reassemblies[b.index])

        low_ranks = {}
        if self.eec and self.epochs > 0:
            with ctx.phase("train"):
                low_ranks = self.train_chunk(blocks, ctx.inputs, target, kwargs, ctx)

        with ctx.phase("merge"):
            for b in blocks:
                self.finalize(ctx, b, fp_weights[b.index], reassemblies[b.index],
                              {r: lr for (i, r), lr in low_ranks.items() if i == b.index})

    # ------------------------------------------------------------------ step 1: statistics

    def points(self, block: BlockAdapter) -> list[tuple[LinearGroup, str, bool]]:
        """Reassembly points: (group, role whose input/output shows the consuming function's
        result, whether it is that role's output). The consuming function runs up to the
        next linear: q/k/v -> the input of o; gate/up -> the input of down; down -> its output."""
        groups = block.groups
        points = []
        for i, group in enumerate(groups):
            if group.feeder not in REASSEMBLY_FEEDERS:
                continue
            if i + 1 < len(groups):
                points.append((group, groups[i + 1].roles[0], False))
            else:
                points.append((group, group.roles[-1], True))
        return points

    def observe(self, block: BlockAdapter, fp_inputs: torch.Tensor, ctx: BlockContext) -> tuple:
        """Per-channel ``max|x|`` of every point's input over all windows, the windows the
        search runs on, and the block's full-precision output."""
        stats = ChannelStatistics()
        roles = [g.roles[0] for g, _, _ in self.points(block)] if self.reassembly else []
        outputs = ctx.observe(fp_inputs, block=block, on_input=stats.hooks(roles), stop=False)
        return stats.absmax, fp_inputs[: self.search_samples].to(ctx.device), outputs

    # ------------------------------------------------------------------ step 2: reassembly

    def reassemble_block(self, block: BlockAdapter, maxima, search_inputs, kwargs, ctx: BlockContext
                         ) -> dict[str, ChannelReassembly]:
        result = {}
        for group, capture_role, capture_output in self.points(block):
            weights = {r: block.linear(r).weight.detach().float() for r in group.roles}
            stacked = torch.cat(list(weights.values()))
            distance = None
            if self.assembly:
                x = run_until(block, search_inputs, kwargs, group.roles[0])
                distance = pair_distance(x.reshape(-1, x.shape[-1]), stacked, self.distance)
            reference = run_until(block, search_inputs, kwargs, capture_role, capture_output)

            def error(candidate: ChannelReassembly) -> float:
                params = {f"{block.family.linears[r]}.weight": self.quantize_weight(candidate.weight(w))
                          for r, w in weights.items()}
                transform = lambda x: self.quantize_input(candidate.activation(x))  # noqa: E731
                out = run_until(block, search_inputs, kwargs, capture_role, capture_output, params,
                                {r: transform for r in group.roles})
                return nn.functional.mse_loss(out, reference).item()

            chosen, trials = search_threshold(maxima[group.roles[0]], self.channel_ratio, error, distance,
                                              self.adaptive)
            result[group.feeder] = chosen
            ctx.note(f"qllm {group.feeder}->{','.join(group.roles)}: theta={chosen.threshold:.4g}, "
                     f"+{chosen.extra} channels, {chosen.merged} merged, width {chosen.width} "
                     f"({len(trials)} thresholds{' tried' if self.adaptive else ''})", block=block)
        return result

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        return minmax_grid(w, self.spec.bits, self.spec.sym, self.spec.group_size).fake_quantize(w)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_bits is None else quantize_activation(x, self.act_bits)

    # ------------------------------------------------------------------ step 3: quantized block

    def restructure(self, block: BlockAdapter) -> None:
        """Activation quantizers and reassembly wrappers (empty ones: a checkpoint fills them)."""
        if self.act_bits is not None:
            install_activation_quantizers(block, self.act_bits)
        if self.reassembly:
            for group, _, _ in self.points(block):
                for role in group.roles:
                    if not isinstance(block.linear(role), ReassembledLinear):
                        block.set_linear(role, ReassembledLinear(block.linear(role), self.act_bits))

    def restore_block(self, block: BlockAdapter) -> None:
        """A resumed run's saved block gets its wrappers back before its tensors load."""
        self.restructure(block)

    def install(self, block: BlockAdapter, reassemblies: dict[str, ChannelReassembly]) -> dict[str, torch.Tensor]:
        """Activation quantizers, reassembled linears, RTN weights; returns the full-precision
        (reassembled) weights, which EEC corrects and the merge re-quantizes."""
        if self.act_bits is not None:
            install_activation_quantizers(block, self.act_bits)
        self.install_reassembly(block, reassemblies)
        fp_weights = {}
        with torch.no_grad():
            for role, linear in block.linears().items():
                fp_weights[role] = linear.weight.detach().float().clone()
                linear.weight.copy_(self.quantize_weight(fp_weights[role]))
        return fp_weights

    def install_reassembly(self, block: BlockAdapter, reassemblies: dict[str, ChannelReassembly]) -> None:
        """Every consumer of a reassembled activation becomes a :class:`ReassembledLinear` with
        the reassembled weight ``W B`` (full precision; the coefficients still in its index map)."""
        for group, _, _ in self.points(block):
            reassembly = reassemblies.get(group.feeder)
            if reassembly is None or reassembly.is_identity:
                continue
            for role in group.roles:
                linear = block.linear(role)
                block.set_linear(role, ReassembledLinear(linear, self.act_bits, reassembly,
                                                         reassembly.weight(linear.weight.detach().float())))

    # ------------------------------------------------------------------ step 4: error correction

    def trainable_extras(self, block: BlockAdapter) -> dict[str, nn.Parameter]:
        """Norm gains/biases and linear biases by their names in the block (``train_norms``)."""
        if not self.train_norms:
            return {}
        extras = {}
        for role, path in block.family.norms.items():
            for attr in ("weight", "bias"):
                p = getattr(block.norm(role), attr, None)
                if isinstance(p, torch.Tensor):
                    extras[f"{path}.{attr}"] = nn.Parameter(p.detach().float().clone())
        for role, linear in block.linears().items():
            if linear.bias is not None:
                extras[f"{block.family.linears[role]}.bias"] = nn.Parameter(linear.bias.detach().float().clone())
        return extras

    def train_chunk(self, blocks: list[BlockAdapter], inputs, targets, kwargs, ctx: BlockContext
                    ) -> dict[tuple[int, str], LowRank]:
        device = inputs.device
        low_ranks = {(b.index, role): LowRank(lin.out_features, lin.weight.shape[1], self.rank, self.alpha, device)
                     for b in blocks for role, lin in b.linears().items()}
        extras = {b.index: self.trainable_extras(b) for b in blocks}
        trained = [p for lr in low_ranks.values() for p in lr.parameters()] + [
            p for e in extras.values() for p in e.values()]
        optimizer = torch.optim.AdamW(trained, lr=self.lr, weight_decay=self.weight_decay)
        n = inputs.shape[0]
        total = self.epochs * n
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))

        def student(x):
            for b in blocks:
                params = {f"{b.family.linears[role]}.weight": lin.weight.detach() + low_ranks[b.index, role].delta()
                          for role, lin in b.linears().items()}
                params.update(extras[b.index])
                x = block_output(functional_call(b.module, params, (x,), kwargs))
            return x

        frozen = [(p, p.requires_grad) for b in blocks for p in b.module.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            epoch_losses = self.optimize(student, trained, optimizer, schedule, inputs, targets, ctx)
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        with torch.no_grad():
            for b in blocks:
                for name, value in extras[b.index].items():
                    path, _, attr = name.rpartition(".")
                    getattr(b.module.get_submodule(path), attr).copy_(value)
        if epoch_losses:
            self.history.append({"blocks": [b.index for b in blocks], "first_epoch_loss": epoch_losses[0],
                                 "last_epoch_loss": epoch_losses[-1]})
            ctx.note(f"qllm eec blocks {blocks[0].index}-{blocks[-1].index}: loss {epoch_losses[0]:.4g} -> "
                         f"{epoch_losses[-1]:.4g} over {len(epoch_losses)} epochs")
        return low_ranks

    def optimize(self, student, trained, optimizer, schedule, inputs, targets, ctx: BlockContext) -> list[float]:
        """Batch 1, a random order each epoch; stops (keeping the last finite parameters) on a
        non-finite loss. Returns the mean loss of every completed epoch."""
        n = inputs.shape[0]
        epoch_losses, last_good = [], [p.detach().clone() for p in trained]
        task = ctx.progress("train", f"low-rank correction of {len(ctx.blocks)} blocks", self.epochs * n)
        for epoch in range(self.epochs):
            total_loss = 0.0
            for j in torch.randperm(n).tolist():
                loss = nn.functional.mse_loss(student(inputs[j : j + 1]), targets[j : j + 1])
                if not math.isfinite(loss.item()):
                    with torch.no_grad():
                        for p, good in zip(trained, last_good):
                            p.copy_(good)
                    ctx.note(f"qllm: non-finite loss at epoch {epoch}, sample {j}; training of the chunk "
                                 "stopped, the last finite parameters kept")
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                last_good = [p.detach().clone() for p in trained]
                total_loss += loss.item()
                task.update(task.step + 1, loss.item())
            else:
                epoch_losses.append(total_loss / n)
                continue
            break
        task.close()
        return epoch_losses

    # ------------------------------------------------------------------ step 5: merge, fold, re-quantize

    @torch.no_grad()
    def finalize(self, ctx: BlockContext, block: BlockAdapter, fp_weights, reassemblies, low_ranks) -> None:
        """Merge the low-rank corrections, fold the reassembly coefficients into the ops that
        produce the reassembled activations, re-quantize every weight on its grid."""
        weights = {role: merge_low_rank(w, low_ranks[role]) if role in low_ranks else w
                   for role, w in fp_weights.items()}
        self.fold_coefficients(block, weights, reassemblies)
        for role in block.linears():
            grid = minmax_grid(weights[role], self.spec.bits, self.spec.sym, self.spec.group_size)
            ctx.set_weight(role, grid.fake_quantize(weights[role]), grid, block=block)

    @torch.no_grad()
    def fold_coefficients(self, block, weights: dict[str, torch.Tensor], reassemblies) -> None:
        """``x·coef`` produced directly: a norm's gain and bias times ``coef``, or the rows (and
        bias) of up/fc1 in ``weights`` times ``coef`` (its product with act(gate), or its ReLU,
        commutes with a positive factor); the consumers' index maps lose their ``coef``.
        Elsewhere the coefficient stays in the index map."""
        for group, _, _ in self.points(block):
            reassembly = reassemblies.get(group.feeder)
            if reassembly is None or reassembly.is_identity:
                continue
            factor = ChannelTransform(1.0 / reassembly.coef)  # x·coef = x / (1/coef)
            if group.feeder in block.family.norms:
                norm = block.norm(group.feeder)
                weight, bias = scale_norm(norm.weight, getattr(norm, "bias", None), factor)
                norm.weight.copy_(weight)
                if bias is not None:
                    norm.bias.copy_(bias)
            elif block.family.mlp in FOLDS_INTO_UP_ROWS:
                producer = block.linear(group.feeder)
                weights[group.feeder], bias = scale_output_rows(weights[group.feeder], producer.bias, factor)
                if bias is not None:
                    producer.bias.copy_(bias)
            else:
                continue
            for role in group.roles:
                block.linear(role).coef = None

def run_until(block: BlockAdapter, x: torch.Tensor, kwargs: dict, role: str, output: bool = False,
              params: dict | None = None, input_maps: dict | None = None) -> torch.Tensor:
    """Run ``block`` on ``x`` until the linear ``role`` receives its input (or, with ``output``,
    produces its output) and return that tensor. ``params`` replace parameters by name
    (``functional_call``); ``input_maps`` (role -> function) transform linears' inputs."""
    captured = []
    hooks = {role: captured.append}
    observe_block(block, x, kwargs, device=x.device, dtype=x.dtype, batch_size=x.shape[0],
                  on_output=hooks if output else None, on_input=None if output else hooks, params=params,
                  input_maps=input_maps)
    if not captured:
        raise RuntimeError(f"the block never ran its {role} linear")
    return captured[0]
