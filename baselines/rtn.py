"""RTN: round-to-nearest on the min-max grid, no data (GPTQ paper §5, "Baselines").

Every linear of every block is fake-quantized on its own per-channel (or group-wise)
min-max grid, asymmetric unless ``sym``. Embeddings, norms and the LM head stay in
full precision. With ``act_bits < 16`` the activations are fake-quantized per token
(every linear input, and Q, K, V inside attention; ``aespa.core.actquant``): the plain
weight-activation baseline.
"""
from __future__ import annotations

from aespa.core.actquant import install_activation_quantizers
from aespa.core.grid import minmax_grid
from aespa.core.method import Method, register
from aespa.core.pipeline import BlockContext


@register("rtn")
class RTN(Method):
    supports_act_quant = True

    def quantize_block(self, ctx: BlockContext) -> None:
        with ctx.phase("round"):
            for role, linear in ctx.block.linears().items():
                w = linear.weight.data.float()
                grid = minmax_grid(w, self.spec.bits, self.spec.sym, self.spec.group_size)
                ctx.set_weight(role, grid.fake_quantize(w), grid)
        if not self.spec.weight_only:
            install_activation_quantizers(ctx.block, self.spec.act_bits)
