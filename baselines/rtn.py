"""RTN: round-to-nearest on the min-max grid, no data (GPTQ paper §5, "Baselines").

Every linear of every block is fake-quantized on its own per-channel (or group-wise)
min-max grid, asymmetric unless ``sym``. Embeddings, norms and the LM head stay in
full precision.
"""
from __future__ import annotations

from aespa.quant import check_group_size, minmax_grid
from aespa.registry import Method, register


@register("rtn")
class RTN(Method):
    def quantize_block(self, ctx) -> None:
        with ctx.phase("round"):
            for role, linear in ctx.block.linears().items():
                w = linear.weight.data.float()
                check_group_size(w.shape[1], self.spec.group_size, f"{role} of block {ctx.index}")
                grid = minmax_grid(w, self.spec.bits, self.spec.sym, self.spec.group_size)
                ctx.set_weight(role, grid.fake_quantize(w), grid)
