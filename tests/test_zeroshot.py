"""Zero-shot accuracy through lm-eval on the local task equals the accuracy computed by
hand from the model's own log-likelihoods (full precision, and quantized weights with
activation quantizers installed); the runner records it."""
import json
import os

import pytest
import torch

from aespa.core.actquant import remove_activation_quantizers
from aespa.core.adapters import ModelAdapter
from aespa.core.method import QuantSpec, get_method
from aespa.core.pipeline import quantize_model
from experiments.runner import run
from experiments.zeroshot import TASKS_DIR, evaluate_zeroshot, local_task_config
from tests.conftest import compose, load

TASK = "wikivital_mc"
EVAL = {"zeroshot": [TASK], "zeroshot_batch_size": 8}


def documents() -> list[dict]:
    with open(os.path.join(TASKS_DIR, f"{TASK}.json")) as f:
        return json.load(f)


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer) -> list[list[float]]:
    """Per document, the summed log-probability of each choice's tokens given the question:
    the tokens of "question choice" beyond those of "question" (the choice follows a space),
    scored one sequence at a time by the model itself."""
    out = []
    for doc in documents():
        context = tokenizer.encode(doc["question"])
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(doc["question"] + " " + choice)
            assert whole[: len(context)] == context
            logprobs = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
            scores.append(sum(logprobs[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
        out.append(scores)
    return out


def hand_accuracy(loglikelihoods: list[list[float]]) -> dict[str, float]:
    """acc: argmax of the log-likelihoods; acc_norm: argmax after dividing by the choice's length."""
    docs = documents()
    acc = norm = 0
    for doc, lls in zip(docs, loglikelihoods, strict=True):
        acc += max(range(len(lls)), key=lambda i: lls[i]) == doc["answer"]
        norm += max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["answer"]
    return {"acc": acc / len(docs), "acc_norm": norm / len(docs)}


@pytest.fixture(scope="module")
def fp_loglikelihoods(tiny_opt):
    return choice_loglikelihoods(*tiny_opt)


def test_local_task_is_well_formed():
    docs = documents()
    assert len(docs) == 20
    assert all(2 <= len(d["choices"]) <= 4 and 0 <= d["answer"] < len(d["choices"]) for d in docs)
    assert all(c.isascii() for d in docs for c in d["choices"])  # character length = byte length
    config = local_task_config(TASK)
    assert os.path.isabs(config["dataset_kwargs"]["data_files"]["test"])
    assert os.path.exists(config["dataset_kwargs"]["data_files"]["test"])


def test_accuracy_equals_the_models_own_loglikelihoods(tiny_opt, fp_loglikelihoods):
    model, tokenizer = tiny_opt
    expected = hand_accuracy(fp_loglikelihoods)
    assert evaluate_zeroshot(model, tokenizer, EVAL, "cpu") == {TASK: pytest.approx(expected, abs=1e-12)}


def test_quantized_model_keeps_its_activation_quantizers(fp_loglikelihoods):
    """RTN W3A4 installs per-token activation quantizers; lm-eval must score that model."""
    model, tokenizer = load("tiny-opt")
    adapter = ModelAdapter(model)
    calibration = torch.randint(0, len(tokenizer), (2, 64), generator=torch.Generator().manual_seed(0))  # RTN ignores it
    quantize_model(adapter, get_method("rtn")(QuantSpec(bits=3, act_bits=4)), calibration, "cpu", progress=False)
    assert type(adapter.block(0).linear("q")).__name__ == "QuantInputLinear"
    quantized = choice_loglikelihoods(model, tokenizer)
    change = max(abs(q - f) for qs, fs in zip(quantized, fp_loglikelihoods) for q, f in zip(qs, fs))
    assert change > 0.1  # quantization changes the scores lm-eval must see
    result = evaluate_zeroshot(model, tokenizer, EVAL, "cpu")
    assert result == {TASK: pytest.approx(hand_accuracy(quantized), abs=1e-12)}
    for i in range(len(adapter.blocks)):
        remove_activation_quantizers(adapter.block(i))
    weight_only = hand_accuracy(choice_loglikelihoods(model, tokenizer))
    assert result[TASK] != pytest.approx(weight_only)  # so the quantizers were active in lm-eval's model


def test_runner_records_zeroshot_accuracy(tmp_path, fp_loglikelihoods):
    cfg = compose("model=tiny-opt", "method=none", "eval=zeroshot", f"eval.zeroshot=[{TASK}]", "eval.max_windows=1",
                  "progress=false", f"results_dir={tmp_path}", "resume=false")
    record = run(cfg)
    assert record["metrics"]["zeroshot"] == {TASK: pytest.approx(hand_accuracy(fp_loglikelihoods), abs=1e-12)}
    assert list(record["metrics"]["ppl"]) == ["wikivital"]

