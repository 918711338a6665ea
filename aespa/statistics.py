"""aespa's pre-computed statistics of one decoder block, and the objectives they define.

aespa quantizes every linear of a block separately, but against the *attention output*
(Kim et al., NeurIPS 2024, §3). Because the objectives are quadratic in the weight
perturbation ΔW, everything they need of the calibration data is a few second moments,
computed once per block from one full-precision pass of the block over the
quantized-stream inputs (§3.4, "pre-computation"):

- ``hessians[role]`` = 2 E[x xᵀ] of each linear's input (q, k, v share theirs);
- ``value_hessian`` = 2 E[(A_h X)(A_h X)ᵀ] per head (attention probabilities ``A_h``,
  v's input ``X``), the block-wise value objective (Eq. 17, ``block_v``);
- ``key_covariance`` = 2 E[k kᵀ] per head (post-RoPE keys), which weights the query
  objective (Eq. 21), and ``query_covariance`` = 2 E[q qᵀ] per head (post-RoPE queries),
  which weights the key objective (Eq. 22).

E[·] is the mean over all calibration tokens (the reference code's normalisation: the
factor 2 and the token mean fix the size of the reconstruction loss relative to
AdaRound's rounding regulariser). Every statistic is a running mean, so memory does not
grow with the number of calibration windows, and one optimisation step of the rounding
costs the same whatever their number.

Rotary embeddings. Queries and keys are observed after RoPE, ``q̃_t = R_t q_t``. The
covariance used for the objective is rotated back and averaged over the positions of
a window, ``Ḡ = mean_s R_sᵀ E[k̃ k̃ᵀ] R_s`` (likewise for queries), as the reference
code. The identity that then holds exactly (checked in the tests): with ``Δq_i = ΔW x_i``
the pre-RoPE change of query ``i``,

    Σ_h tr(Ḡ_h ΔW_h H ΔW_hᵀ) = (4 / N²) Σ_h mean_s Σ_i Σ_j ((R_s Δq_{h,i})ᵀ k̃_{h,j})²

over all query tokens ``i`` and key tokens ``j`` (N of each): the squared change of the
score of every query–key pair, with the query placed at a position ``s`` drawn uniformly
and independently of its content. (The score the model computes uses the query's own
position ``i``; the two agree when positions and contents are independent.) Without RoPE
(OPT) it is the plain all-pairs sum, ``(4/N²) Σ (Δq_iᵀ k_j)²``, which is ``d_h`` times the
squared change of the pre-softmax scores ``q_iᵀ k_j / √d_h``.

Grouped-query attention, as the reference code: ``value_hessian`` and
``query_covariance`` (objectives of the shared k/v heads) are the *means* over the query
heads of each key/value head; ``key_covariance`` (objective of the query heads) is each
key/value head's covariance repeated for its query heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aespa.core.attention import AttentionHook, rotation_matrices
from aespa.core.errors import UserError, check_finite
from aespa.core.hessian import RunningSecondMoment
from aespa.core.pipeline import BlockContext


@dataclass
class BlockStatistics:
    hessians: dict[str, torch.Tensor]  # role -> 2 E[x xᵀ] [in, in]
    value_hessian: torch.Tensor | None = None  # [kv_heads, in, in]
    key_covariance: torch.Tensor | None = None  # [heads, head_dim, head_dim]: weights the query objective
    query_covariance: torch.Tensor | None = None  # [kv_heads, head_dim, head_dim]: weights the key objective
    tokens: int = 0


def rotate_back(covariance: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``mean_s R_sᵀ C R_s`` over the positions s of ``cos``/``sin`` ``[.., T, d]``, for
    ``C`` ``[heads, d, d]``."""
    rotations = rotation_matrices(cos.float(), sin.float()).to(covariance.device)
    out = torch.zeros_like(covariance)
    for i in range(0, rotations.shape[0], chunk):
        r = rotations[i:i + chunk, None]  # [t, 1, d, d]
        out += (r.transpose(-1, -2) @ covariance[None] @ r).sum(0)
    return out / rotations.shape[0]


def rotary_tables(kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) tables the block receives (``position_embeddings``)."""
    tables = kwargs.get("position_embeddings")
    if tables is None:
        raise UserError("this rotary-embedding model passes no position_embeddings to its blocks; "
                        "aespa needs them to rotate query/key statistics back (supported: LLaMA-family blocks)")
    return tables


@torch.no_grad()
def collect_block_statistics(ctx: BlockContext, *, value: bool = True, query_key: bool = True) -> BlockStatistics:
    """One pass of ``ctx.block`` (not yet quantized) over ``ctx.inputs``, in mini-batches,
    stopped after the input of the last linear.

    ``value``: also the attention-weighted value Hessian (``block_v``); ``query_key``: the
    query/key covariances (needed by the rounding objectives of q and k).
    """
    block, geometry = ctx.block, ctx.block.geometry
    heads, kv_heads = geometry.num_heads, geometry.num_kv_heads
    inputs: dict[str, RunningSecondMoment] = {}
    source: dict[str, str] = {}  # role -> the first role of its group (whose input is hooked)
    for group in block.groups:
        inputs[group.roles[0]] = RunningSecondMoment()
        for role in group.roles:
            source[role] = group.roles[0]
    value_moment, query_moment, key_moment = RunningSecondMoment(), RunningSecondMoment(), RunningSecondMoment()
    value_input: list[torch.Tensor] = []  # the input of v in the current mini-batch

    def input_hook(role):
        def hook(x):
            inputs[role].add(x)
            if value and role == source["v"]:
                value_input[:] = [x]
        return hook

    def observe(query, key, _value, probs):
        if value:
            x = value_input[0].float()
            for b in range(x.shape[0]):  # one window at a time bounds memory to heads x T x d
                weighted = probs[b].float() @ x[b]  # A_h X: [heads, T, d]
                # the query heads of one kv head side by side -> the mean over the group
                value_moment.add(weighted.reshape(kv_heads, -1, weighted.shape[-1]), leading=1)
        if query_key:
            query_moment.add(query.transpose(0, 1), leading=1)  # [heads, b*T, d_h]
            key_moment.add(key.transpose(0, 1), leading=1)  # [kv_heads, b*T, d_h]

    hook = AttentionHook(observe=observe, needs_probs=value) if value or query_key else None
    ctx.observe(on_input={role: input_hook(role) for role in inputs}, attention=hook)

    check_finite(f"the statistics of block {ctx.index}",
                 {**{f"{role} input": m.mean for role, m in inputs.items()},
                  "value Hessian": value_moment.mean, "query covariance": query_moment.mean,
                  "key covariance": key_moment.mean})
    stats = BlockStatistics({role: 2 * inputs[source[role]].mean for role in source}, tokens=inputs[source["q"]].tokens)
    if value:
        stats.value_hessian = 2 * value_moment.mean
    if query_key:
        group = heads // kv_heads
        key_cov = (2 * key_moment.mean).repeat_interleave(group, dim=0)  # [heads, d_h, d_h]
        query_cov = (2 * query_moment.mean).reshape(kv_heads, group, *query_moment.mean.shape[1:]).mean(1)
        if geometry.rotary:
            cos, sin = rotary_tables(ctx.kwargs)
            key_cov, query_cov = rotate_back(key_cov, cos, sin), rotate_back(query_cov, cos, sin)
        stats.key_covariance, stats.query_covariance = key_cov, query_cov
    return stats


class _QuadraticForm(torch.autograd.Function):
    """``Σ d ⊙ (G d H)`` for symmetric G, H, with the closed-form gradient ``2 G d H``: one
    large matrix product per evaluation instead of autograd's three."""

    @staticmethod
    def forward(ctx, delta, hessian, head_covariance):
        weighted = delta @ hessian
        if head_covariance is not None:
            weighted = head_covariance @ weighted
        ctx.save_for_backward(weighted)
        return (delta * weighted).sum()

    @staticmethod
    def backward(ctx, grad):
        (weighted,) = ctx.saved_tensors
        return 2 * grad * weighted, None, None


@dataclass
class QuadraticObjective:
    """The loss a weight perturbation ΔW ``[out, in]`` causes, a quadratic form (symmetric
    ``hessian`` and ``head_covariance``).

    - ``head_covariance`` None, ``hessian`` ``[in, in]``: the layer-wise ``tr(ΔW H ΔWᵀ)``;
    - ``hessian`` ``[heads, in, in]``: ``Σ_h tr(ΔW_h H_h ΔW_hᵀ)``, rows split in ``heads``
      consecutive blocks (the value objective, Eq. 17);
    - ``head_covariance`` ``[heads, d_h, d_h]``: ``Σ_h tr(G_h ΔW_h H ΔW_hᵀ)`` (query and key
      objectives, Eqs. 21-22).
    """

    hessian: torch.Tensor
    head_covariance: torch.Tensor | None = None

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        heads = self.head_covariance.shape[0] if self.head_covariance is not None else \
            self.hessian.shape[0] if self.hessian.dim() == 3 else 1
        return _QuadraticForm.apply(delta.reshape(heads, -1, delta.shape[-1]), self.hessian, self.head_covariance)
