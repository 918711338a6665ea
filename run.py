"""Quantize a causal LM and evaluate it.

    python run.py                                        # aespa on the embedded tiny-opt
    python run.py model=opt-1.3b method=gptq bits=3      # one run
    python run.py -m model=tiny-opt,tiny-llama method=rtn,gptq bits=2,3,4   # a sweep
    python run.py --help                                 # every config group and knob

Configuration lives in conf/ (Hydra); the run itself in experiments/runner.py.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

from aespa.errors import UserError

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
# hydra/launcher=slurm is a Hydra plugin; importing it registers the resolvers of conf/hydra/launcher/
sys.path.insert(1, os.path.join(os.path.dirname(CONF), "experiments", "cluster"))
import hydra_plugins.sized_slurm_launcher  # noqa: E402,F401
GROUPS = ("model", "method", "calib", "eval", "logger", "experiment")


def check_group_choices(argv: list[str]) -> None:
    """Fail with one line on an unknown config-group option (e.g. model=opt-7b)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value.startswith(("choice(", "range(", "glob(")):
            continue
        options = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, key)) if f.endswith(".yaml"))
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
    check_group_choices(sys.argv[1:])
    main()
