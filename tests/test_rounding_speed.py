"""Learned rounding in closed form: the same rounding variables as autograd through the soft
weight (plain, per-head value and Kronecker query/key objectives), the problems of a block
solved together exactly as alone; the progress line and its log lines (aespa, BRECQ,
OmniQuant, QLLM)."""
import io
import logging

import pytest
import torch
from conftest import random_model

from aespa.core.adapters import ModelAdapter
from aespa.core.grid import minmax_grid
from aespa.core.method import QuantSpec, get_method
from aespa.core.pipeline import quantize_model
from aespa.core.progress import ProgressLine
from aespa.core.rounding import (
    RoundingProblem,
    hard_quantized_weight,
    init_rounding,
    learn_rounding,
    learn_rounding_autograd,
    quadratic_loss,
    soft_quantized_weight,
)


def problems(dtype) -> list[RoundingProblem]:
    """A block in miniature: q and k (Kronecker, one shared input Hessian: stacked into one
    product), v (a Hessian per head), o (plain); GPTQ-like starts off the grid's range."""
    g = torch.Generator().manual_seed(0)

    def spd(n):
        x = torch.randn(3 * n, n, generator=g, dtype=dtype) * torch.rand(n, generator=g, dtype=dtype).add(0.2)
        return x.T @ x / (3 * n) + 0.01 * torch.eye(n, dtype=dtype)

    def weight(rows):
        return torch.randn(rows, 24, generator=g, dtype=dtype)

    h = spd(24)
    w_q, w_k, w_v, w_o = weight(16), weight(8), weight(8), weight(12)
    return [
        RoundingProblem(w_q, minmax_grid(w_q, 2), h, torch.stack([spd(4) for _ in range(4)]), round_weight=1.5,
                        start=w_q + 0.4 * torch.randn(w_q.shape, generator=g, dtype=dtype)),
        RoundingProblem(w_k, minmax_grid(w_k, 3), h.clone(), torch.stack([spd(4) for _ in range(2)]), round_weight=1.5),
        RoundingProblem(w_v, minmax_grid(w_v, 2), torch.stack([spd(24), spd(24)]), round_weight=1.5),
        RoundingProblem(w_o, minmax_grid(w_o, 2, group_size=8), spd(24), round_weight=1.0),
    ]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_closed_form_rounding_equals_autograd(dtype, tolerance):
    """120 steps (warm-up, then the regulariser with β decaying): the same V for every kind
    of objective, and the same hard-rounded weight."""
    ps = problems(dtype)
    results = learn_rounding(ps, iterations=120, lr=0.015)
    for p, result in zip(ps, results):
        reference = learn_rounding_autograd(p, iterations=120, lr=0.015)
        torch.testing.assert_close(result.v, reference, rtol=0, atol=tolerance)
        start = p.weight if p.start is None else p.start
        assert torch.equal(result.weight, hard_quantized_weight(start, p.grid, reference))
        assert result.loss == pytest.approx(quadratic_loss(result.weight - p.weight, p.hessian,
                                                           p.head_covariance).item())


def test_a_block_solved_together_equals_each_problem_alone():
    ps = problems(torch.float32)
    together = learn_rounding(ps, iterations=60, lr=0.015)
    for p, joint in zip(ps, together):
        alone, = learn_rounding([p], iterations=60, lr=0.015)
        assert torch.equal(joint.v, alone.v) and torch.equal(joint.weight, alone.weight)


def test_step_hook_reports_the_task_loss():
    ps = problems(torch.float64)
    seen = {}
    results = learn_rounding(ps, iterations=5, lr=0.015, on_step=lambda step, loss: seen.setdefault(step, loss()))
    assert sorted(seen) == [1, 2, 3, 4, 5]
    assert seen[1] == pytest.approx(sum(r.start_loss for r in results))
    start = [(p.weight if p.start is None else p.start) for p in ps]
    soft = sum(quadratic_loss(soft_quantized_weight(s, p.grid, init_rounding(s, p.grid)) - p.weight, p.hessian,
                              p.head_covariance).item() for s, p in zip(start, ps))
    assert seen[1] == pytest.approx(soft)


# --------------------------------------------------------------------------- the progress line


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_shows_block_phase_layer_step_loss_and_eta(caplog):
    screen = Terminal()
    line = ProgressLine(live=True, n_blocks=4, refresh_s=0.01, file=screen)
    line.phase(1, "rounding")
    with caplog.at_level(logging.INFO, logger="aespa.progress"):
        with line.task(1, "rounding", "q k v", total=10) as task:
            for step in range(1, 11):
                task.update(step, loss=lambda: 0.125)
                if step == 4:
                    text = task.text()
    line.close()
    assert text.startswith("block 2/4 · rounding · q k v · step 4/10 · loss 0.125 · 0:00 · ETA")
    assert "block 2/4 · rounding · q k v" in screen.getvalue()  # drawn on the terminal
    assert [r.getMessage() for r in caplog.records][-1].startswith(
        "block 2/4 · rounding · q k v: 10 steps in")
    quiet = ProgressLine(live=True, file=io.StringIO())  # not a terminal: no live line
    quiet.phase(0, "statistics")
    quiet.close()
    assert not quiet.live


@pytest.mark.parametrize("method,options,phase", [
    ("aespa", {"iters": 4, "zfold_rounds": 2}, "rounding"),
    ("brecq", {"iters": 3}, "reconstruction"),
    ("omniquant", {"epochs": 1}, "train"),
    ("qllm", {"epochs": 1, "blocks_per_chunk": 1}, "train"),
])
def test_long_loops_write_one_log_line_each(method, options, phase, caplog):
    """Without a terminal (progress=false): no live line, one log line per loop (aespa: one
    per layer, plus one per Z-Fold group)."""
    model = random_model("opt", layers=1)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="aespa.progress"):
        quantize_model(adapter, get_method(method)(QuantSpec(bits=3), options), ids, "cpu", batch_size=2,
                       progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "aespa.progress"]
    assert any(m.startswith(f"block 1/1 · {phase}") for m in lines), lines
    if method == "aespa":
        layers = [m for m in lines if " · rounding · " in m and ": loss " in m and "rounded" in m]
        assert len(layers) == 6, lines  # q k v o up down
        assert any("Z-Fold" in m for m in lines)


# --------------------------------------------------------------------------- experiments.rounding_noise


def test_rounding_noise_compares_the_paths_on_a_real_block(capsys):
    """aespa's own block-1 problems of tiny-llama: after a few steps the closed form and
    autograd still round every weight alike, and so does each with the Hessians 1 ulp apart."""
    from experiments import rounding_noise

    assert rounding_noise.main(["nsamples=4", "--iters", "5"]) == 0
    out = capsys.readouterr().out
    n = 2 * 256 * 256 + 2 * 64 * 256 + 3 * 256 * 704  # q, o; k, v (2 of 8 heads: GQA); the MLP of tiny-llama
    assert f"of {n}:" in out
    assert "| closed form vs autograd | 0 | 0.000 % |" in out
    assert "| autograd vs autograd, H·(1+2⁻²³) | 0 | 0.000 % |" in out


@pytest.mark.parametrize("argv,message", [
    (["model=nope"], "Could not find 'model/nope'"),
    (["--iters", "0"], "--iters=0: at least 1 rounding step"),
    (["method.learn_rounding=false", "nsamples=4"], "method.learn_rounding=false: aespa learns no rounding"),
])
def test_rounding_noise_bad_input_is_one_line(argv, message, capsys):
    from experiments import rounding_noise

    assert rounding_noise.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
