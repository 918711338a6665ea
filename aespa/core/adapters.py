"""Model-family adapters: a *description* of each family, consumed by every method.

A family says where the decoder blocks are, the role of every linear inside a block
(q, k, v, o, gate, up, down — OPT's fc1/fc2 are ``up``/``down``), which op feeds each
group of linears (the norm before q/k/v, v before o, ...), the attention geometry
(heads, kv-heads, head_dim, rotary embedding) and the modules outside the blocks.
The family is picked from ``config.model_type`` (and, for OPT, from ``do_layer_norm_before``),
never from a path.

Post-LayerNorm OPT (OPT-350M, ``do_layer_norm_before=False``) is its own family, ``opt-postln``:
its norms come *after* each residual add, so q/k/v read the block's input and fc1 reads the
attention norm's output, both of which are also the residual stream. Their feeder is
:data:`RESIDUAL`, not a norm: nothing can be folded into it (SmoothQuant, OmniQuant's LET and
QLLM's reassembly refuse the family; Z-Fold's ζ is kept to o and fc2, whose feeders are
linears). It has no final norm; ``project_in``/``project_out`` map its 512-wide word
embeddings to the 1024-wide blocks and back.

Attention internals (post-RoPE queries/keys, values, attention probabilities) are
reached through a registered transformers attention function (``aespa.core.attention``),
not through forked modeling files: a method attaches an ``AttentionHook`` to a block
(``BlockAdapter.set_attention_hook``) and the function calls it with the tensors the model
really computes.

Adding a family (e.g. Gemma) is one ``Family(...)`` entry below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aespa.core.attention import AttentionHook
from aespa.core.errors import UserError


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, and the op that produces that input."""

    roles: tuple[str, ...]
    feeder: str  # a norm role ("attn_norm", "mlp_norm"), a linear role ("v", "up") or RESIDUAL


RESIDUAL = "residual"  # the feeder of linears that read the residual stream itself (post-LayerNorm)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # path of the decoder-block ModuleList, from the CausalLM
    linears: dict[str, str]  # role -> path inside a block
    norms: dict[str, str]  # "attn_norm" / "mlp_norm" -> path inside a block
    groups: tuple[LinearGroup, ...]  # in true-sequential order
    attention: str  # path of the attention module inside a block
    final_norm: str | None  # None: no norm after the last block (post-LayerNorm OPT)
    head: str
    outside: tuple[str, ...]  # every module outside the blocks the forward pass uses
    after_norm: tuple[str, ...] = ()  # modules between the final norm and the head (OPT project_out)
    rotary: bool = False
    query_prescaled: bool = False  # the query reaches the attention function already multiplied by 1/sqrt(d)
    mlp: str = "relu"  # "relu" (fc1 -> act -> fc2) or "swiglu" (act(gate) * up -> down)
    when: tuple[str, object] | None = None  # (config attribute, value) that also selects the family

    def foldable(self, feeder: str) -> bool:
        """A transform of the feeder's output channels can be folded into it (a norm or a linear)."""
        return feeder in self.norms or feeder in self.linears


OPT = Family(
    name="opt",
    model_types=("opt",),
    blocks="model.decoder.layers",
    linears={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
             "up": "fc1", "down": "fc2"},
    norms={"attn_norm": "self_attn_layer_norm", "mlp_norm": "final_layer_norm"},
    groups=(LinearGroup(("q", "k", "v"), "attn_norm"), LinearGroup(("o",), "v"),
            LinearGroup(("up",), "mlp_norm"), LinearGroup(("down",), "up")),
    attention="self_attn",
    final_norm="model.decoder.final_layer_norm",
    head="lm_head",
    outside=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in",
             "model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    after_norm=("model.decoder.project_out",),
    query_prescaled=True,
    mlp="relu",
)

OPT_POSTLN = Family(
    name="opt-postln",
    model_types=("opt",),
    blocks="model.decoder.layers",
    linears=OPT.linears,
    norms=OPT.norms,
    groups=(LinearGroup(("q", "k", "v"), RESIDUAL), LinearGroup(("o",), "v"),
            LinearGroup(("up",), RESIDUAL), LinearGroup(("down",), "up")),
    attention="self_attn",
    final_norm=None,
    head="lm_head",
    outside=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in",
             "model.decoder.project_out", "lm_head"),
    after_norm=("model.decoder.project_out",),
    query_prescaled=True,
    mlp="relu",
    when=("do_layer_norm_before", False),
)

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks="model.layers",
    linears={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    norms={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    groups=(LinearGroup(("q", "k", "v"), "attn_norm"), LinearGroup(("o",), "v"),
            LinearGroup(("gate", "up"), "mlp_norm"), LinearGroup(("down",), "up")),
    attention="self_attn",
    final_norm="model.norm",
    head="lm_head",
    outside=("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"),
    rotary=True,
    mlp="swiglu",
)

FAMILIES = (OPT_POSTLN, OPT, LLAMA)  # the first that matches: a family with a ``when`` before its plain one


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types and (fam.when is None or getattr(config, fam.when[0], None) == fam.when[1]):
            return fam
    known = sorted({t for f in FAMILIES for t in f.model_types})
    raise UserError(f"unsupported model_type {model_type!r}; supported: {', '.join(known)}")


def get_path(root: nn.Module, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


@dataclass(frozen=True)
class Geometry:
    """Attention geometry of a family instance."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary: bool

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


class BlockAdapter:
    """One decoder block seen through its family description."""

    def __init__(self, module: nn.Module, family: Family, geometry: Geometry, index: int):
        self.module, self.family, self.geometry, self.index = module, family, geometry, index

    def linear(self, role: str) -> nn.Linear:
        return get_path(self.module, self.family.linears[role])

    def linears(self) -> dict[str, nn.Linear]:
        """Every linear of the block, in true-sequential order."""
        return {r: self.linear(r) for g in self.family.groups for r in g.roles}

    def set_linear(self, role: str, module: nn.Module) -> None:
        set_path(self.module, self.family.linears[role], module)

    def norm(self, role: str) -> nn.Module:
        return get_path(self.module, self.family.norms[role])

    @property
    def groups(self) -> tuple[LinearGroup, ...]:
        return self.family.groups

    def feeder(self, role: str) -> str:
        """The op that produces ``role``'s input (a norm role or a linear role)."""
        return next(g.feeder for g in self.groups if role in g.roles)

    @property
    def attention(self) -> nn.Module:
        return get_path(self.module, self.family.attention)

    def set_attention_hook(self, hook: AttentionHook | None) -> None:
        attn = self.attention
        attn._ptq_hook = hook
        attn._ptq_query_prescale = attn.scaling if self.family.query_prescaled else 1.0


class ModelAdapter:
    """A causal LM seen through its family description."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model.config)
        c = model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        self.geometry = Geometry(c.hidden_size, heads, getattr(c, "num_key_value_heads", None) or heads,
                                 head_dim, self.family.rotary)

    @property
    def blocks(self) -> nn.ModuleList:
        return get_path(self.model, self.family.blocks)

    def block(self, i: int) -> BlockAdapter:
        return BlockAdapter(self.blocks[i], self.family, self.geometry, i)

    def outside_modules(self) -> list[nn.Module]:
        return [m for m in (get_path(self.model, p) for p in self.family.outside) if m is not None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm (+ projection) + LM head applied to the last block's output."""
        norm = get_path(self.model, self.family.final_norm) if self.family.final_norm else None
        h = norm(hidden) if norm is not None else hidden
        for p in self.family.after_norm:
            m = get_path(self.model, p)
            if m is not None:
                h = m(h)
        return get_path(self.model, self.family.head)(h)
