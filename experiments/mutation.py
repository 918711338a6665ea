"""Mutation testing of the core with mutmut 3 (configured in ``pyproject.toml``, ``[tool.mutmut]``).

    python -m experiments.mutation                      # every mutant not yet checked (resumes where it stopped)
    python -m experiments.mutation --module grid qparams   # only these modules (a substring of the module name)
    python -m experiments.mutation --survivors          # re-run the survivors only (after adding tests)
    python -m experiments.mutation --survivors --unchecked --module qparams   # both, in one run
    python -m experiments.mutation --report             # the per-module table, no run

mutmut copies ``source_paths`` into ``mutants/`` (git-ignored), writes every mutant of the files in
``only_mutate`` into the copy, records once which of the selected fast tests reach which function
(``mutants/mutmut-stats.json``) and then runs, per mutant, only the tests that reach the mutated
function, in a forked child (one at a time here: ``--max-children 1``, one thread). Its state is
kept in ``mutants/*.meta`` after every mutant, so a killed job resumes with the mutants not yet
checked; ``rm -rf mutants`` starts over (needed after a change of the tests selected in
``pyproject.toml``, or stats go stale).

The score counts killed (and timed-out) mutants over all mutants that a test reaches; a survivor
is either killed by a test or listed, with its reason, in ``tests/mutation/equivalent.md``
(``--report`` subtracts the listed equivalent ones; the "out of scope" ones, survivors covered by
tests outside the selection, are subtracted only from the "in scope" score). Not part of CI.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
EQUIVALENT = ROOT / "tests" / "mutation" / "equivalent.md"
# the mutants a run covers: every function of the core files, and of experiments/data.py and
# experiments/records.py only the cache and run keys (the rest of those files reads datasets and files)
SCOPE = ("aespa.core.grid.*", "aespa.core.hessian.*", "aespa.core.checkpoint.*", "aespa.qparams.*", "aespa.method.*",
         "baselines.gptq.*", "experiments.records.x_run_id_*", "experiments.records.x_is_quantized_*",
         "experiments.data.xǁDataCacheǁkey_*", "experiments.data.x_calibration_windows_*",
         "experiments.data.x_evaluation_windows_*", "experiments.data.x__origin_*",
         "experiments.data.x_files_fingerprint_*", "experiments.data.x_tokenizer_fingerprint_*",
         "aespa.core.rounding.*", "aespa.core.kronecker.*", "aespa.statistics.*")
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault",
          None: "not checked"}


def results() -> dict[str, tuple[str, str]]:
    """mutant name -> (module file, status) from mutmut's state files."""
    out = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        source = str(meta.relative_to(MUTANTS))[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatchcase(name, p) for p in SCOPE):
                out[name] = (source, STATUS.get(code, "suspicious"))
    return out


def module_of(name: str) -> str:
    """The module of a mutant name (``aespa.method`` of ``aespa.method.xǁAespaǁstep__mutmut_3``): ``--module``
    matches it, not the function's name (``statistics`` picks ``aespa.statistics``, not a method's
    ``collect_statistics``)."""
    match = re.match(r"(.*?)\.x[_ǁ]", name)
    return match.group(1) if match else name


def listed(section: str) -> set[str]:
    """Mutant names listed in one section (``## <section>...``) of the reviewed list: the first
    column of its table rows."""
    if not EQUIVALENT.exists():
        return set()
    text = EQUIVALENT.read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    body = "".join(p for p in parts if p.lower().startswith(section.lower()))
    return set(re.findall(r"^\|\s*`([^`]+__mutmut_\d+)`", body, flags=re.M))


def equivalent() -> set[str]:
    """Mutants listed as equivalent (no test can tell them from the code)."""
    return listed("Equivalent")


def out_of_scope() -> set[str]:
    """Survivors left to the tests of another part (listed with the test file that covers them)."""
    return listed("Out of scope")


def report() -> None:
    rows, eq, deferred = Counter(), equivalent(), out_of_scope()
    for name, (source, status) in results().items():
        rows[source, status] += 1
        if status == "survived" and name in eq:
            rows[source, "equivalent"] += 1
        if status == "survived" and name in deferred:
            rows[source, "out of scope"] += 1
    sources = sorted({s for s, _ in rows})
    print(f"{'module':<28} {'mutants':>7} {'no test':>7} {'killed':>7} {'timeout':>7} {'survived':>8} "
          f"{'equiv.':>6} {'o.o.s.':>6} {'unchecked':>9} {'score':>6} {'in scope':>8}")
    total = Counter()
    for s in sources + ["all"]:
        c = total if s == "all" else Counter({k: v for (src, k), v in rows.items() if src == s})
        if s != "all":
            total.update(c)
        n = sum(v for k, v in c.items() if k not in ("equivalent", "out of scope"))
        reached = n - c["no tests"] - c["not checked"]
        dead = c["killed"] + c["timeout"] + c["segfault"]
        score = f"{100 * dead / (reached - c['equivalent']):.1f}" if reached > c["equivalent"] else "-"
        rest = reached - c["equivalent"] - c["out of scope"]
        scoped = f"{100 * dead / rest:.1f}" if rest > 0 else "-"
        print(f"{s:<28} {n:>7} {c['no tests']:>7} {c['killed']:>7} {c['timeout']:>7} {c['survived']:>8} "
              f"{c['equivalent']:>6} {c['out of scope']:>6} {c['not checked']:>9} {score:>6} {scoped:>8}")
    print("score: (killed + timeout) / (mutants a test reaches - listed equivalent ones); in scope: also without "
          "the survivors listed as out of scope (o.o.s.: covered by tests outside the mutation selection)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", nargs="*", default=[], help="only mutants of modules containing these strings")
    parser.add_argument("--survivors", action="store_true",
                        help="re-run the mutants that survived (but those of the reviewed list)")
    parser.add_argument("--unchecked", action="store_true",
                        help="with --survivors: the mutants not checked yet too, in the same run")
    parser.add_argument("--report", action="store_true", help="print the table of the last run and exit")
    args = parser.parse_args(argv)
    if args.report:
        report()
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if not (MUTANTS / "mutmut-stats.json").exists():  # first run: mutmut generates the mutants, then runs SCOPE
        names = [p for p in SCOPE if not args.module or any(m in p for m in args.module)]
    else:  # resume: the mutants not checked yet (or the survivors), by name
        want = {"survived", "timeout", "suspicious", "no tests"} if args.survivors else {"not checked"}
        if args.unchecked:
            want.add("not checked")
        reviewed = equivalent() | out_of_scope() if args.survivors else set()  # their verdict stands: not re-run
        names = sorted(n for n, (s, status) in results().items() if status in want and n not in reviewed
                       and (not args.module or any(m in module_of(n) for m in args.module)))
        if not names:
            print("nothing to run")
            report()
            return 0
    rc = subprocess.call(["mutmut", "run", "--max-children", "1", *names], cwd=ROOT, env=env)
    report()
    return rc


if __name__ == "__main__":
    sys.exit(main())
