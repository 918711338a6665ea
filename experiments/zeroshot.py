"""Zero-shot accuracy of a (quantized) model through lm-eval (``eval=zeroshot``).

The model object the pipeline quantized is wrapped as it is in lm-eval's ``HFLM``, so
fake-quantized weights and any activation quantizers a method installed
(:mod:`aespa.core.actquant`) are what lm-eval scores. Each task is scored zero-shot by the
log-likelihood of every choice's continuation given the context:

- ``acc``: the choice with the highest summed log-likelihood is the prediction;
- ``acc_norm``: the same after dividing each log-likelihood by the length of the choice
  text (lm-eval's length normalisation: characters, the same as UTF-8 bytes for ASCII text).

The OmniQuant and QLLM tables report the mean ``acc`` over PIQA, ARC-e, ARC-c, BoolQ,
HellaSwag and WinoGrande (the default task list of ``conf/eval/zeroshot.yaml``); both
numbers are recorded wherever the task defines them (BoolQ and WinoGrande have no
``acc_norm``), as fractions in [0, 1].

The built-in tasks download their data from the Hugging Face hub. Offline, the local task
``wikivital_mc`` (``experiments/tasks/``: 20 sentence completions about facts of the
embedded corpus) runs the same path.
"""
from __future__ import annotations

import logging
import os

import yaml

from aespa.core.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(REPO, "experiments", "tasks")
PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande")
METRICS = ("acc", "acc_norm")


def local_tasks() -> dict[str, str]:
    """The tasks defined in this repo: task name -> its YAML file."""
    out = {}
    for f in sorted(os.listdir(TASKS_DIR)):
        if f.endswith(".yaml"):
            path = os.path.join(TASKS_DIR, f)
            with open(path) as fh:
                out[yaml.safe_load(fh)["task"]] = path
    return out


def local_task_config(name: str) -> dict:
    """The task's YAML as a dict, with its data files made absolute (lm-eval resolves
    relative paths against the working directory, not the YAML's folder)."""
    with open(local_tasks()[name]) as f:
        config = yaml.safe_load(f)
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    for split, path in files.items():
        files[split] = path if os.path.isabs(path) else os.path.join(REPO, path)
    return config


def load_tasks(names: list[str]) -> tuple:
    """The lm-eval task manager and the Task objects by name; built-in tasks are indexed
    (and their data fetched) only when asked for. Unknown names and unreachable data are
    one-line UserErrors."""
    from lm_eval.tasks import TaskManager, get_task_dict

    local = local_tasks()
    builtin = [t for t in names if t not in local]
    manager = TaskManager(include_path=TASKS_DIR, include_defaults=bool(builtin), verbosity="ERROR")
    unknown = [t for t in builtin if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown zero-shot task(s) {', '.join(unknown)}; allowed: {', '.join(local)} (local), "
                        f"or any lm-eval task, e.g. {', '.join(PAPER_TASKS)}")
    specs = [local_task_config(t) if t in local else t for t in names]
    try:
        return manager, get_task_dict(specs, manager)
    except (OSError, ConnectionError) as e:  # datasets/hub errors on an offline machine are OSErrors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the data of zero-shot task(s) {', '.join(builtin) or ', '.join(names)} "
                        f"({reason}); offline, use the local task: eval.zeroshot=[{', '.join(local)}]") from None


def evaluate_zeroshot(model, tokenizer, eval_cfg, device, tasks=None) -> dict[str, dict[str, float]]:
    """Zero-shot ``{task: {"acc": ..., "acc_norm": ...}}`` of ``model`` on ``eval_cfg.zeroshot``.

    ``eval_cfg`` keys (``conf/eval/zeroshot.yaml``): ``zeroshot`` (task names),
    ``zeroshot_batch_size``, ``zeroshot_limit`` (documents per task; null = all),
    ``zeroshot_max_length`` (null = the model's context). ``tasks``: what :func:`load_tasks`
    returned for these names (the runner loads them before quantizing). The whole model is
    moved to ``device`` for the evaluation and back to where it was afterwards.
    """
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    names = list(eval_cfg.get("zeroshot") or [])
    if not names:
        return {}
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager, tasks = tasks or load_tasks(names)
    max_length = eval_cfg.get("zeroshot_max_length") or getattr(model.config, "max_position_embeddings", None)
    home = next(model.parameters()).device
    model.to(device)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=eval_cfg.get("zeroshot_batch_size", 8),
                  max_length=max_length)
        with torch.no_grad():
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), task_manager=manager,
                                          num_fewshot=0, bootstrap_iters=0,
                                          limit=eval_cfg.get("zeroshot_limit"), log_samples=False,
                                          verbosity="ERROR")
    finally:
        model.to(home)
    results = {}
    for task in names:
        row = out["results"][task]
        results[task] = {m: float(row[f"{m},none"]) for m in METRICS if f"{m},none" in row}
    return results
