"""``hydra/launcher=slurm``: hydra-submitit's SLURM launcher, with each job sized by its own config.

The stock launcher reads ``hydra.launcher`` once, from the sweep's base config, so every job
of ``-m model=opt-125m,llama-2-70b`` would get the resources of the default model. This one
resolves ``hydra.launcher`` in each job's composed config (where ``${model.size_b}`` is that
job's model), groups the jobs that ask for the same resources, and submits one job array
per group. Everything else (requeue on preemption/timeout, result collection) is submitit's.

``conf/hydra/launcher/slurm.yaml`` scales the resources with the resolver registered here:
``${by_size:SIZE_B,BASE,PER_BILLION[,MAX]}`` = ``min(MAX, int(BASE + PER_BILLION * SIZE_B))``,
where 0 means "do not ask" (e.g. no GPU for the embedded CPU models).

Hydra accepts launchers only from the ``hydra_plugins`` namespace package: this folder is a
small project of its own (``experiments/cluster/pyproject.toml``), installed into that
namespace by ``requirements.txt`` (``-e ./experiments/cluster``), so Hydra finds it in every
process of a sweep (the submitting one, submitit's and joblib's jobs) without any path edit.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def by_size(size_b: float, base: float, per_billion: float, maximum: float | None = None) -> int | None:
    """A resource that grows with the model: ``min(maximum, int(base + per_billion * size_b))``; 0 -> None."""
    value = int(base + per_billion * float(size_b))
    if maximum is not None:
        value = min(value, int(maximum))
    return value or None


def register_resolvers() -> None:
    """Resolvers used by conf/hydra/launcher/*.yaml (run at import: Hydra imports every plugin module)."""
    if not OmegaConf.has_resolver("by_size"):
        OmegaConf.register_new_resolver("by_size", by_size)
    # conf/hydra/launcher/joblib.yaml has the name of the plugin's own config, which Hydra merges as a schema
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema")


class SizedSlurmLauncher(SlurmLauncher):
    """submitit_slurm with ``hydra.launcher`` resolved per job: one job array per set of resources."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None and self.hydra_context is not None
        groups: dict[str, list[int]] = {}
        for i, overrides in enumerate(job_overrides):
            job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            params = OmegaConf.to_container(job_cfg.hydra.launcher, resolve=True)
            params.pop("_target_", None)
            groups.setdefault(json.dumps(params, sort_keys=True), []).append(i)

        log.info(f"Submitit 'slurm' sweep output dir : {self.config.hydra.sweep.dir}")
        jobs: list = [None] * len(job_overrides)
        for key, members in groups.items():
            params = json.loads(key)
            executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                             slurm_max_num_timeout=params.pop("max_num_timeout"))
            setup = list(params.pop("setup") or [])
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(slurm_setup=setup,
                                       **{k if k in base else f"slurm_{k}": v for k, v in params.items()})
            resources = ", ".join(f"{k}={params[k]}" for k in ("partition", "gpus_per_node", "cpus_per_task",
                                                               "mem_gb", "timeout_min"))
            log.info(f"\t{len(members)} job(s) with {resources}")
            args = []
            for i in members:
                idx = initial_job_idx + i
                log.info(f"\t#{idx} : {' '.join(filter_overrides(job_overrides[i]))}")
                args.append((list(job_overrides[i]), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                             Singleton.get_state()))
            for i, job in zip(members, executor.map_array(self, *zip(*args))):
                jobs[i] = job
        return [job.results()[0] for job in jobs]


# at import: Hydra imports every plugin module when it starts, and job processes to unpickle the launcher
register_resolvers()
