"""The weight-activation path: activation fake-quantization (hand-worked values), the
quantizers staying on for evaluation, the outlier variant of the embedded models,
SmoothQuant's migration and the bad-input checks of act_bits."""
import os

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from aespa.core.actquant import (
    QKVQuantizer,
    QuantInputLinear,
    install_activation_quantizers,
    remove_activation_quantizers,
)
from aespa.core.adapters import ModelAdapter
from aespa.core.errors import UserError
from aespa.core.evaluation import perplexity
from aespa.core.method import QuantSpec, get_method
from aespa.core.pipeline import quantize_model
from aespa.core.transforms import norm_fed_groups
from experiments.outliers import plant_outliers
from tests.conftest import REPO, load, random_model


def test_quantized_linear_input_hand_worked():
    linear = nn.Linear(4, 2, bias=False)
    linear.weight.data = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, -1.0]])
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [0.25, 0.5, 0.75, 1.0]])
    # 2 bits per token, raw min/max. Token 0: [-1, 2] -> scale 1, zero 1, 0.5 rounds (half to even)
    # to 0 -> x_hat [-1, 0, 0, 2]. Token 1: [0.25, 1] (zero not forced into the range) ->
    # scale 0.25, zero round(-1) = -1, codes [0, 1, 2, 3] -> x_hat = x exactly.
    wrapped = QuantInputLinear(linear, act_bits=2)
    assert wrapped.weight is linear.weight
    assert torch.equal(wrapped(x), torch.tensor([[1.0, -3.0], [2.5, -0.75]]))
    assert torch.equal(linear(x), torch.tensor([[1.5, -3.0], [2.5, -0.75]]))  # unquantized differs


def test_attention_quantizer_per_head_vs_per_token():
    # one token, two heads of two dims: head 0 [0, 3], head 1 [1, 1.5]
    q = torch.tensor([0.0, 3.0, 1.0, 1.5]).view(1, 1, 2, 2).transpose(1, 2)  # [b, heads, T, d]
    per_head = QKVQuantizer(2, per_head=True)
    per_token = QKVQuantizer(2, per_head=False)
    # per (token, head) each head holds only its min and max: reproduced exactly
    assert torch.equal(per_head.quantize(q), q)
    # per token over all heads: range [0, 3], scale 1 -> 1.5 rounds to 2
    assert torch.equal(per_token.quantize(q).transpose(1, 2).reshape(-1), torch.tensor([0.0, 3.0, 1.0, 2.0]))
    qq, kk, vv = per_token(q, q, q)
    assert torch.equal(qq, kk) and torch.equal(kk, vv) and not torch.equal(qq, q)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_activation_quantizers_stay_installed_for_evaluation(arch):
    model = random_model(arch, layers=2)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = model(ids).logits
    quantize_model(adapter, get_method("rtn")(QuantSpec(bits=8, act_bits=4)), ids, "cpu", progress=False)
    for i in range(2):
        block = adapter.block(i)
        assert all(isinstance(lin, QuantInputLinear) for lin in block.linears().values())
        assert isinstance(block.attention._ptq_hook.transform, QKVQuantizer)
    with torch.no_grad():
        w8a4 = model(ids).logits
    ppl_w8a4 = perplexity(adapter, ids, "cpu", progress=False)
    for i in range(2):
        remove_activation_quantizers(adapter.block(i))
    with torch.no_grad():
        w8 = model(ids).logits
    ppl_w8 = perplexity(adapter, ids, "cpu", progress=False)
    # 4-bit activations move the logits far more than 8-bit weights do, and the evaluation sees them
    assert (w8a4 - w8).norm() > 5 * (w8 - fp).norm()
    assert ppl_w8a4 != ppl_w8


def test_installing_twice_keeps_one_wrapper():
    block = ModelAdapter(random_model("llama", layers=1)).block(0)
    install_activation_quantizers(block, 8)
    install_activation_quantizers(block, 4)
    lin = block.linear("q")
    assert isinstance(lin, QuantInputLinear) and lin.act_bits == 4 and type(lin.weight) is nn.Parameter
    assert block.attention._ptq_hook.transform.per_head  # rotary family: per (token, head), after RoPE


# --------------------------------------------------------------------------- the outlier variant


def outlier_config(name: str) -> dict:
    return dict(OmegaConf.load(os.path.join(REPO, "conf", "model", f"{name}-outlier.yaml")).outliers)


def input_channel_ratio(adapter, ids) -> float:
    """Smallest, over blocks and norm-fed groups, of max_j / median_j of the channel maxima."""
    seen = {}
    hooks = []
    for i in range(len(adapter.blocks)):
        block = adapter.block(i)
        for group in norm_fed_groups(block):
            key = (i, group.feeder)

            def pre(module, args, key=key):
                absmax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
                seen[key] = absmax if key not in seen else torch.maximum(seen[key], absmax)

            hooks.append(block.linear(group.roles[0]).register_forward_pre_hook(pre))
    with torch.no_grad():
        adapter.model(ids)
    for h in hooks:
        h.remove()
    return min((m.max() / m.median()).item() for m in seen.values())


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_outlier_variant_same_function_with_llm_like_outliers(name, tokenizer):
    from experiments.data import evaluation_windows

    model, _ = load(name)
    adapter = ModelAdapter(model)
    ids = evaluation_windows("wikivital", tokenizer, 128)[:4]
    with torch.no_grad():
        logits = model(ids).logits
    plain_ratio = input_channel_ratio(adapter, ids)
    plant_outliers(adapter, **outlier_config(name))
    with torch.no_grad():
        outlier_logits = model(ids).logits
    assert (outlier_logits - logits).abs().max().item() < 1e-4
    assert plain_ratio < 20
    assert input_channel_ratio(adapter, ids) > 20


def test_smoothquant_flattens_the_planted_outliers():
    model = random_model("opt", layers=1)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    plant_outliers(adapter, channels=2, factor=100.0)
    before = input_channel_ratio(adapter, ids)
    with torch.no_grad():
        logits = model(ids).logits
    method = get_method("smoothquant")(QuantSpec(bits=8, act_bits=16), {"alpha": 0.5})
    quantize_model(adapter, method, ids, "cpu", progress=False)
    after = input_channel_ratio(adapter, ids)
    assert before > 50 and after < before / 5  # α = 0.5 takes about the square root of the spread
    with torch.no_grad():
        assert (model(ids).logits - logits).abs().max() < 0.05  # smoothing is exact, only W8 rounding moves it


# --------------------------------------------------------------------------- bad input


def config(**overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(os.path.join(REPO, "conf"), version_base="1.3"):
        return compose("config", overrides=[f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "omniquant"])
def test_weight_activation_methods_accept_act_bits(method):
    from experiments.runner import validate

    validate(config(method=method, act_bits=4))
    validate(config(method=method, act_bits=6))


def test_act_bits_validation_names_the_allowed_values_and_methods():
    from experiments.runner import validate

    with pytest.raises(UserError, match=r"act_bits=3 is not allowed; use one of 4, 5, 6, 7, 8, 16"):
        validate(config(method="omniquant", act_bits=3))
    with pytest.raises(UserError) as err:
        validate(config(method="none", act_bits=4))
    message = str(err.value)
    assert "weight-only" in message and all(m in message for m in ("omniquant", "rtn", "smoothquant"))
    assert "\n" not in message


def test_outlier_options_are_checked():
    adapter = ModelAdapter(random_model("opt", layers=1))
    with pytest.raises(UserError, match="outliers.channels=0"):
        plant_outliers(adapter, channels=0)
    with pytest.raises(UserError, match="outliers.factor=-1"):
        plant_outliers(adapter, factor=-1)


def test_outlier_model_config_reaches_the_model(monkeypatch, tmp_path):
    import experiments.outliers as outliers
    from experiments import runner

    calls = []

    def plant(adapter, **options):
        calls.append(options)
        raise UserError("stop here")

    monkeypatch.setattr(outliers, "plant_outliers", plant)
    with pytest.raises(UserError, match="stop here"):
        runner.run(config(model="tiny-opt-outlier", method="rtn", act_bits=4, results_dir=str(tmp_path)))
    assert calls == [outlier_config("tiny-opt")]
