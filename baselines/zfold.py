"""Z-FOLD (Jeon et al., "Frustratingly Easy Post-Training Quantization Scheme for LLMs",
EMNLP 2023): the layer-wise baseline of aespa's Table 9, as the aespa reference code runs
it (SamsungLabs/aespa with ``--use_zfold --optq_init --act_order`` and neither
``--block_v`` nor ``--learn_rounding``).

Per decoder block:

1. H = 2E[xxᵀ] of every linear's input (the layer-wise objective tr(ΔW H ΔWᵀ) for every
   linear, the value projection included).
2. Per output channel, the clipping of the min-max range minimising tr(ΔW H ΔWᵀ),
   alternated with a per-input-channel factor ζ shared by the linears that read the same
   normalised input (q/k/v; fc1 on OPT) and folded into the norm before them (and into the
   rows of v and up/fc1 for o and down/fc2; ``aespa.method.zfold_groups``).
3. OPTQ (the GPTQ column sweep, ``act_order``) on that refined grid; its rounding is kept.

It is aespa with the two attention-aware parts switched off, so it shares every step with
``aespa/method.py`` and differs only in its defaults.
"""
from __future__ import annotations

from dataclasses import dataclass

from aespa.core.method import register
from aespa.core.options import option
from aespa.method import Aespa


@register("zfold")
class ZFold(Aespa):
    @dataclass(frozen=True)
    class Options(Aespa.Options):
        block_v: bool = option(False, "the value projection uses the layer-wise Hessian E[X Xᵀ]; true: aespa's "
                                      "attention-weighted one")
        learn_rounding: bool = option(False, "OPTQ's rounding is kept; true: aespa's learned rounding")
