"""Quantize a causal LM and evaluate it.

    python run.py                                        # aespa on the embedded tiny-opt
    python run.py model=opt-1.3b method=gptq bits=3      # one run
    python run.py -m model=tiny-opt,tiny-llama method=rtn,gptq bits=2,3,4   # a sweep
    python run.py --help                                 # every config group and knob
    python run.py --methods [NAME ...]                   # every method's own knobs, defaults and meaning

Configuration lives in conf/ (Hydra) and, for each method's knobs, in the method's file
(its ``Options``); the run itself in experiments/runner.py.

Exit status: 0 done (or skipped: already recorded); 2 bad input (one ``error:`` line, no
record); 1 the run failed (a non-finite value: a ``status: failed`` record; or its record
could not be written: the fallback is named); for a ``-m`` sweep, the number of failed jobs.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

from aespa.core.errors import NumericalError, UserError
from experiments import sweeps
from experiments.methods import describe, load_methods

REPO = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(REPO, "conf")
GROUPS = ("model", "method", "calib", "eval", "logger", "experiment")


def group_options(group: str) -> list[str]:
    """The choices of a config group: its files in conf/, and for ``method`` the registered methods."""
    if group == "method":
        return sorted(load_methods())
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


def check_group_choices(argv: list[str]) -> None:
    """An unknown config-group option (e.g. model=opt-7b) is a one-line error."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value.startswith(("choice(", "range(", "glob(")):
            continue
        options = group_options(key)
        for v in value.split(","):
            if v and v not in options:
                raise UserError(f"unknown {key} {v!r}; allowed: {', '.join(options)}")


def check_composes(argv: list[str], multirun: bool) -> None:
    """Hydra composes the config these overrides ask for (each value of a swept key in
    turn); its complaints (a key that does not exist, a malformed override) become one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        swept = [o.input_line for o in parsed if o.is_sweep_override()]
        if swept and not multirun:
            raise UserError(f"{swept[0]} gives several values: add -m to run one job per value (a sweep), or "
                            "write one value")
        first = [o.get_key_element() + "=" + (next(o.sweep_string_iterator()) if o.is_sweep_override()
                                              else o.get_value_element_as_str())
                 if o.value() is not None and not o.is_delete() else o.input_line for o in parsed]
        variants = [first]
        for i, o in enumerate(parsed):
            if o.is_sweep_override():
                variants += [first[:i] + [f"{o.get_key_element()}={v}"] + first[i + 1:]
                             for v in list(o.sweep_string_iterator())[1:]]
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            for variant in variants:
                compose(config_name="config", overrides=variant, return_hydra_config=True)
    except (hydra.errors.HydraException, OmegaConfBaseException, ValueError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise UserError("; ".join(lines[:2]) or type(e).__name__) from None


@hydra.main(config_path=CONF, config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from experiments.runner import RecordNotWritten, run

    try:
        if cfg.plan:  # the resource plan only (experiments/plan.py)
            from experiments.plan import main as plan

            plan(cfg)
            return None
        record = run(cfg)
    except (UserError, NumericalError, RecordNotWritten) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if sweeps.in_sweep():  # the sweep goes on; its summary counts this job
            sweeps.job_status("failed", str(e))
            return None
        sys.exit(2 if isinstance(e, UserError) else 1)
    return record["metrics"]["ppl"]


def cli(argv: list[str]) -> int:
    """The command line (``argv`` without the program name); returns the exit status."""
    if argv[:1] == ["--methods"]:
        names = argv[1:] or None
        unknown = [n for n in names or [] if n not in load_methods()]
        if unknown:
            print(f"error: unknown method {unknown[0]!r}; allowed: {', '.join(sorted(load_methods()))}",
                  file=sys.stderr)
            return 2
        print(describe(names))
        return 0
    load_methods()  # the method config group: one entry per registered method
    os.environ.setdefault("AESPA_PTQ_ROOT", REPO)  # Hydra's run folders go under results/ (conf/config.yaml)
    try:
        check_group_choices(argv)
        if not any(a in ("--help", "-h", "--hydra-help", "--info") or a.startswith("--cfg") for a in argv):
            check_composes(argv, multirun=any(a in ("-m", "--multirun") for a in argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sweeps.failed_jobs = 0
    argv0, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv0
    return min(sweeps.failed_jobs, 125)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
