"""Reduced precision on the CPU takes the GPU's path: the model loaded in bf16 (or fp16), every
block upcast to fp32 while it is quantized, the calibration streams and the evaluation in the
model's dtype. Each method's perplexity in bf16 stays within 1 % of its fp32 perplexity."""
import pytest

from experiments.runner import compose, run

# small budgets: the comparison is between dtypes, not against the paper numbers
# one method of each kind of path: round to nearest, a Hessian sweep (GPTQ; BoA's Kronecker rows),
# learned rounding on statistics (aespa; Z-FOLD and TurboBoA share their code with aespa and BoA),
# and training through the block by autograd (OmniQuant, BRECQ)
METHODS = {
    "rtn": [], "gptq": [], "boa": ["method.qparam=minmax"],
    "aespa": ["method.iters=50", "method.zfold_rounds=1"],
    "omniquant": ["method.epochs=1"],
    "brecq": ["method.iters=10"],
}
COMMON = ["model=tiny-llama", "bits=4", "nsamples=16", "eval.max_windows=12", "progress=false", "resume=false"]


def ppl(tmp_path, method: str, dtype: str) -> tuple[float, dict]:
    record = run(compose(COMMON + [f"method={method}", f"dtype={dtype}", f"results_dir={tmp_path}"]
                         + METHODS[method]))
    return record["metrics"]["ppl"]["wikivital"], record


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_bfloat16_within_one_percent_of_float32(tmp_path, method):
    fp32, _ = ppl(tmp_path, method, "float32")
    bf16, record = ppl(tmp_path, method, "bfloat16")
    assert record["config"]["dtype"] == "bfloat16"
    assert abs(bf16 / fp32 - 1) < 0.01, (method, fp32, bf16)


@pytest.mark.slow
def test_float16_on_cpu_within_one_percent_of_float32(tmp_path):
    fp32, _ = ppl(tmp_path, "gptq", "float32")
    fp16, _ = ppl(tmp_path, "gptq", "float16")
    assert abs(fp16 / fp32 - 1) < 0.01, (fp32, fp16)
