"""The shape of the code: the core imports no method and nothing of the application; every
method's options are typed (unknown keys, wrong types and out-of-range values are one-line
errors before any model loads); a method defined in a module of its own plugs in with no
edit anywhere else."""
import ast
import dataclasses
import math
import sys
from pathlib import Path

import pytest

from aespa.core.errors import UserError
from aespa.core.method import METHODS
from aespa.core.options import Rule
from experiments.methods import describe, load_methods
from experiments.runner import run, validate
from tests.conftest import REPO, compose


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_imports_no_method_and_nothing_of_the_application():
    files = sorted((Path(REPO) / "aespa" / "core").glob("*.py"))
    assert len(files) >= 15
    for path in files:
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top not in ("baselines", "experiments", "hydra_plugins", "tests"), (path.name, name)
            if top == "aespa":
                assert name.startswith("aespa.core"), (path.name, name)


def test_methods_import_nothing_of_the_application():
    files = [p for p in (Path(REPO) / "aespa").glob("*.py")] + sorted((Path(REPO) / "baselines").rglob("*.py"))
    for path in files:
        for name in imports_of(path):
            assert name.split(".")[0] not in ("experiments", "tests"), (path, name)


def test_every_method_is_found_and_offered_to_hydra():
    names = set(load_methods())
    assert names >= {"none", "rtn", "gptq", "aespa", "zfold", "brecq", "omniquant", "smoothquant", "qllm"}
    for name in names:
        cfg = compose(f"method={name}")
        assert cfg.method.name == name
        defaults = {f.name: f.default for f in dataclasses.fields(METHODS[name].Options)}
        assert {k: v for k, v in cfg.method.items() if k != "name"} == defaults
    listing = describe(["gptq"])
    assert "percdamp = 0.01  (a number > 0)" in listing and "baselines/gptq.py" in listing


def _wrong_type(field: dataclasses.Field):
    kinds = str(field.type)
    if "bool" in kinds and field.metadata["rule"].choices is None:
        return "yes"
    if "int" in kinds and "float" not in kinds:
        return 2.5
    return "abc" if "float" in kinds else 3


def _out_of_range(rule: Rule):
    if rule.choices is not None:
        return "no-such-choice"
    if rule.low is not None:
        return rule.low - 1
    if rule.positive:
        return 0
    if rule.high is not None:
        return rule.high + 1
    if rule.below is not None:
        return rule.below
    return None


@pytest.mark.parametrize("name", sorted(load_methods()))
def test_bad_method_options_are_one_line_errors_before_loading(name):
    """Through the config a run gets (Hydra composition, then validation): an unknown key, a
    value of the wrong type and a value outside its constraint each raise a one-line
    UserError naming the key and what is allowed; nothing is loaded (validate needs no model)."""
    fields = dataclasses.fields(METHODS[name].Options)
    cases = [("no_such_knob", 1, "unknown")]
    if fields:
        f = fields[0]
        cases.append((f.name, _wrong_type(f), "not allowed; use"))
        ranged = [f for f in fields if _out_of_range(f.metadata["rule"]) is not None]
        assert ranged or name in ("none", "rtn"), f"{name} declares no constraint on any option"
        for f in ranged:
            cases.append((f.name, _out_of_range(f.metadata["rule"]), "not allowed; use"))
    for key, value, message in cases:
        cfg = compose(f"method={name}", "bits=3", f"++method.{key}={value}")
        with pytest.raises(UserError) as e:
            validate(cfg)
        text = str(e.value)
        assert "\n" not in text and f"method.{key}" in text and message in text, text


def test_a_value_inside_its_range_passes_and_keeps_its_type():
    method = validate(compose("method=qllm", "bits=4", "act_bits=4", "method.lora_alpha=2", "method.rank=8")).method
    assert method.options.lora_alpha == 2.0 and isinstance(method.options.lora_alpha, float)
    assert method.options.rank == 8 and isinstance(method.options.rank, int)
    with pytest.raises(UserError, match=r"method.rank=8.0 is not allowed; use an integer >= 1"):
        validate(compose("method=qllm", "bits=4", "act_bits=4", "method.rank=8.0"))
    with pytest.raises(UserError, match=r"method.act_order='no' is not allowed; use true or false"):
        validate(compose("method=gptq", "bits=4", "method.act_order=no"))
    with pytest.raises(UserError, match="method.percdamp=nan"):
        validate(compose("method=gptq", "bits=4", f"method.percdamp={math.nan}"))


TOY = '''
"""A toy method for the plug-in test: RTN on a grid whose range is shrunk by a factor."""
from dataclasses import dataclass

from aespa.core.grid import Grid, minmax_grid
from aespa.core.method import Method, register
from aespa.core.options import option


@register("toy_shrunk_rtn")
class ShrunkRTN(Method):
    @dataclass(frozen=True)
    class Options:
        shrink: float = option(0.9, "range factor", positive=True, high=1)

    def quantize_block(self, ctx) -> None:
        for role, linear in ctx.block.linears().items():
            w = linear.weight.data.float()
            g = minmax_grid(w, self.spec.bits)
            grid = Grid(g.scale * self.options.shrink, g.zero, g.bits, g.group_size)
            ctx.set_weight(role, grid.fake_quantize(w), grid)
'''


def test_a_method_in_its_own_module_runs_end_to_end(tmp_path, monkeypatch):
    (tmp_path / "toy_method_module.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_method_module  # noqa: F401  (registers the method)

    try:
        load_methods()  # offers it to Hydra as method=toy_shrunk_rtn
        overrides = ["model=tiny-opt", "method=toy_shrunk_rtn", "bits=4", "nsamples=2", "eval.max_windows=4",
                     "progress=false", "resume=false", f"results_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache"]
        with pytest.raises(UserError, match=r"method.shrink=1.5 is not allowed; use a number > 0 and <= 1"):
            validate(compose(*overrides, "method.shrink=1.5"))
        record = run(compose(*overrides, "method.shrink=0.95"))
        assert record["method"] == "toy_shrunk_rtn" and record["config"]["method"] == {"name": "toy_shrunk_rtn",
                                                                                        "shrink": 0.95}
        assert 40 < record["metrics"]["ppl"]["wikivital"] < 200  # 4 test windows: a real language model still
        assert record["run_id"] != run(compose(*overrides, "method.shrink=0.9"))["run_id"]
    finally:
        METHODS.pop("toy_shrunk_rtn", None)
        sys.modules.pop("toy_method_module", None)
