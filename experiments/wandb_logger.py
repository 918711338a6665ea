"""Optional Weights & Biases logging of a run record (``logger=wandb``).

Offline mode unless an API key is configured (``WANDB_API_KEY`` or a netrc login), so
runs on offline machines still leave a syncable ``offline-run-*`` folder, under
``results/wandb/`` of this repo (``WANDB_DIR`` chooses another place).
"""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def log_wandb(record: dict, logger_cfg) -> None:
    import wandb

    mode = logger_cfg.get("mode", "auto")
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    folder = os.environ.get("WANDB_DIR") or os.path.join(REPO, "results", "wandb")
    os.makedirs(folder, exist_ok=True)
    run = wandb.init(project=logger_cfg.get("project"), entity=logger_cfg.get("entity"), mode=mode, dir=folder,
                     name=f"{record['model']}-{record['method']}-w{record['w_bits']}a{record['a_bits']}-s{record['seed']}",
                     id=record["run_id"], config=record["config"], reinit=True)
    run.log(_flatten({"metrics": record["metrics"], "time": record["time"], "memory": record["memory"]}))
    run.summary.update({"run_id": record["run_id"], "status": record["status"]})
    run.finish()
