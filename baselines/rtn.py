"""RTN: round-to-nearest on the min-max grid, no data (GPTQ paper §5, "Baselines").

Every linear of every block is fake-quantized on its own per-channel (or group-wise)
min-max grid, asymmetric unless ``sym``. Embeddings, norms and the LM head stay in
full precision. With ``act_bits < 16`` the activations are fake-quantized per token
(every linear input, and Q, K, V inside attention; ``aespa.actquant``): the plain
weight-activation baseline.
"""
from __future__ import annotations

from aespa.actquant import install_activation_quantizers
from aespa.quant import check_group_size, minmax_grid
from aespa.registry import Method, register


@register("rtn")
class RTN(Method):
    supports_act_quant = True

    def quantize_block(self, ctx) -> None:
        with ctx.phase("round"):
            for role, linear in ctx.block.linears().items():
                w = linear.weight.data.float()
                check_group_size(w.shape[1], self.spec.group_size, f"{role} of block {ctx.index}")
                grid = minmax_grid(w, self.spec.bits, self.spec.sym, self.spec.group_size)
                ctx.set_weight(role, grid.fake_quantize(w), grid)
        if not self.spec.weight_only:
            install_activation_quantizers(ctx.block, self.spec.act_bits)
