"""Quantize a causal LM and evaluate it.

    python run.py                                        # aespa on the embedded tiny-opt
    python run.py model=opt-1.3b method=gptq bits=3      # one run
    python run.py -m model=tiny-opt,tiny-llama method=rtn,gptq bits=2,3,4   # a sweep
    python run.py --help                                 # every config group and knob
    python run.py --methods [NAME ...]                   # every method's own knobs, defaults and meaning

Configuration lives in conf/ (Hydra) and, for each method's knobs, in the method's file
(its ``Options``); the run itself in experiments/runner.py.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

from aespa.core.errors import UserError
from experiments.methods import describe, load_methods

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
GROUPS = ("model", "method", "calib", "eval", "logger", "experiment")


def group_options(group: str) -> list[str]:
    """The choices of a config group: its files in conf/, and for ``method`` the registered methods."""
    if group == "method":
        return sorted(load_methods())
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


def check_group_choices(argv: list[str]) -> None:
    """Fail with one line on an unknown config-group option (e.g. model=opt-7b)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value.startswith(("choice(", "range(", "glob(")):
            continue
        options = group_options(key)
        for v in value.split(","):
            if v and v not in options:
                print(f"error: unknown {key} {v!r}; allowed: {', '.join(options)}", file=sys.stderr)
                sys.exit(2)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from experiments.runner import run

    try:
        record = run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return record["metrics"]["ppl"] if record else None


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--methods":
        try:
            print(describe(sys.argv[2:] or None))
        except KeyError as e:
            print(f"error: unknown method {e}; allowed: {', '.join(sorted(load_methods()))}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    load_methods()  # the method config group: one entry per registered method
    check_group_choices(sys.argv[1:])
    main()
