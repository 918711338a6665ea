"""Z-FOLD (Jeon et al., "Frustratingly Easy Post-Training Quantization Scheme for LLMs",
EMNLP 2023): the layer-wise baseline of aespa's Table 9, as the aespa reference code runs
it (SamsungLabs/aespa with ``--use_zfold --optq_init --act_order`` and neither
``--block_v`` nor ``--learn_rounding``).

Per decoder block:

1. H = 2E[xxᵀ] of every linear's input (the layer-wise objective tr(ΔW H ΔWᵀ) for every
   linear, the value projection included).
2. Per output channel, the clipping of the min-max range minimising tr(ΔW H ΔWᵀ),
   alternated with a per-input-channel factor ζ shared by the linears that read the same
   normalised input (q/k/v; up/gate or fc1) and folded into the norm before them.
3. OPTQ (the GPTQ column sweep, ``act_order``) on that refined grid; its rounding is kept.

It is aespa with the two attention-aware parts switched off, so it shares every step with
``aespa/method.py`` and differs only in its defaults.
"""
from __future__ import annotations

from aespa.method import DEFAULTS, Aespa
from aespa.registry import register


@register("zfold")
class ZFold(Aespa):
    defaults = {**DEFAULTS, "block_v": False, "learn_rounding": False}
