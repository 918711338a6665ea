"""The shared grid on hand-worked tensors (exact values)."""
import pytest
import torch

from aespa.core.errors import UserError
from aespa.core.grid import Grid, minmax_grid, quantize_activation, round_to_nearest


def test_asymmetric_per_channel_grid_exact():
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 0.0, 0.0]])
    g = minmax_grid(w, bits=2)
    # row 0: range [-1, 2] -> scale 1, zero round(1) = 1; row 1 is dead -> [-1, 1]
    assert torch.equal(g.scale, torch.tensor([[1.0], [2 / 3]]))
    assert torch.equal(g.zero, torch.tensor([[1.0], [2.0]]))
    # 0.5 rounds half to even -> 0, so code 1
    assert torch.equal(g.quantize(w), torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]))
    assert torch.allclose(g.fake_quantize(w), torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


def test_range_always_contains_zero():
    w = torch.tensor([[1.0, 2.0, 4.0]])  # all positive: lo is clamped to 0
    g = minmax_grid(w, bits=2)
    assert torch.equal(g.zero, torch.tensor([[0.0]]))
    assert torch.allclose(g.scale, torch.tensor([[4 / 3]]))
    assert torch.allclose(g.fake_quantize(w), torch.tensor([[4 / 3, 8 / 3, 4.0]]))


def test_symmetric_grid_exact():
    w = torch.tensor([[-1.0, 3.5, 0.5]])
    g = minmax_grid(w, bits=3, sym=True)
    # range [-3.5, 3.5] -> scale 1, zero fixed at 8 / 2 = 4
    assert torch.allclose(g.scale, torch.tensor([[1.0]]))
    assert torch.equal(g.zero, torch.tensor([[4.0]]))
    # 3.5 -> round 4 (+4) = 8 -> clamped to 7; 0.5 -> round half to even 0 -> 4
    assert torch.equal(g.quantize(w), torch.tensor([[3.0, 7.0, 4.0]]))
    assert torch.allclose(g.fake_quantize(w), torch.tensor([[-1.0, 3.0, 0.0]]))


def test_grouped_grid_exact():
    w = torch.tensor([[0.0, 1.0, -2.0, 2.0]])
    g = minmax_grid(w, bits=2, group_size=2)
    assert g.scale.shape == (1, 2)
    assert torch.allclose(g.scale, torch.tensor([[1 / 3, 4 / 3]]))
    assert torch.equal(g.zero, torch.tensor([[0.0, 2.0]]))
    # group 1: -2/(4/3) = -1.5 -> -2 (+2) = 0; 1.5 -> 2 (+2) = 4 -> clamped to 3
    assert torch.equal(g.quantize(w), torch.tensor([[0.0, 3.0, 0.0, 3.0]]))
    assert torch.allclose(g.fake_quantize(w), torch.tensor([[0.0, 1.0, -8 / 3, 4 / 3]]))


def test_column_scale_multiplies_the_step():
    g = Grid(torch.tensor([[1.0]]), torch.tensor([[1.0]]), bits=2, col_scale=torch.tensor([1.0, 2.0]))
    assert torch.equal(g.dequantize(torch.tensor([[3.0, 3.0]])), torch.tensor([[2.0, 4.0]]))


def test_rtn_at_8_bits_is_close_and_bad_group_size_is_refused():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    assert (round_to_nearest(w, 8) - w).abs().max() < (w.max() - w.min()) / 255
    with pytest.raises(UserError, match="does not divide"):
        minmax_grid(w, bits=4, group_size=48)


def test_activation_quantization_exact():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 0.5, 1.0]])
    # 2 bits per token: row 0 range [0, 3] -> exact; row 1 range [-1, 1]: scale 2/3, zero round(1.5)=2
    y = quantize_activation(x, bits=2)
    assert torch.allclose(y[0], x[0])
    assert torch.allclose(y[1], torch.tensor([-4 / 3, 0.0, 2 / 3, 2 / 3]))
