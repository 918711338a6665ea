"""One validation step before anything loads: every key of a run's config, checked.

Each key of ``conf/config.yaml`` and of the ``model``, ``calib``, ``eval``, ``logger`` groups is
declared here with its type and constraint (its default and comment stay in ``conf/``); a
method's own keys are its ``Options`` (``aespa.core.options``). Beyond types and ranges:
devices that exist, directories that are writable (with the free space a checkpoint needs,
where the model's size is known), ``save_dir`` outside the model folder, model folders that
are complete (config, weights that are not truncated, tokenizer), local data files that
exist, datasets the pinned ``datasets`` can read. Every failure is one
:class:`~aespa.core.errors.UserError` line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass

import torch

from aespa.core.errors import UserError
from aespa.core.method import Method, QuantSpec, act_quant_methods, get_method
from aespa.core.options import Rule, check_value
from experiments.data import CALIBRATION_SETS, HUB_DATASETS, TEST_SETS, wikivital_file
from experiments.methods import load_methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
ACT_BITS = (4, 5, 6, 7, 8, 16)
DTYPES = ("auto", "float16", "bfloat16", "float32")

# key -> (type, rule); the defaults and comments are in conf/config.yaml and its groups
TOP = {
    "bits": (int, Rule(choices=WEIGHT_BITS)),
    "group_size": (int, Rule(low=-1, exclude=(0,))),
    "sym": (bool, None),
    "act_bits": (int, Rule(choices=ACT_BITS)),
    "nsamples": (int, Rule(low=1)),
    "seqlen": ("int | None", Rule(low=2)),
    "seed": (int, Rule(low=0)),
    "device": (str, None),
    "dtype": (str, Rule(choices=DTYPES)),
    "batch_size": (int, Rule(low=1)),
    "save": (bool, None),
    "save_dir": ("str | None", None),
    "save_format": (str, Rule(choices=("compressed-tensors", "fake"))),
    "force": (bool, None),
    "resume": (bool, None),
    "checkpoint_dir": (str, None),
    "progress": (bool, None),
    "results_dir": (str, None),
    "cache_dir": (str, None),
    "data_paths": (dict, None),
    "plan": (bool, None),
    "plan_tflops": ("float | None", Rule(positive=True)),
    "model": (dict, None), "method": (dict, None), "calib": (dict, None), "eval": (dict, None),
    "logger": (dict, None), "experiment": ("dict | None", None),
}
GROUPS = {
    "model": {"name": (str, None), "path": (str, None), "seqlen": (int, Rule(low=2)), "calib": (str, None),
              "eval": (list, None), "size_b": (float, Rule(positive=True)), "outliers": ("dict | None", None),
              "arch": ("dict | None", None), "twin": (bool, None), "twin_layers": ("int | None", Rule(low=1)),
              "twin_hidden": ("int | None", Rule(low=1))},
    "calib": {"dataset": (str, Rule(choices=CALIBRATION_SETS))},
    "eval": {"datasets": (list, None), "max_windows": ("int | None", Rule(low=1)), "zeroshot": (list, None),
             "zeroshot_batch_size": (int, Rule(low=1)), "zeroshot_limit": ("int | None", Rule(low=1)),
             "zeroshot_max_length": ("int | None", Rule(low=2))},
    "logger": {"name": (str, Rule(choices=("none", "wandb"))), "project": ("str | None", None),
               "entity": ("str | None", None), "mode": (str, Rule(choices=("auto", "online", "offline")))},
}
REQUIRED = {"model": ("name", "path", "seqlen"), "calib": ("dataset",), "eval": ("datasets",), "logger": ("name",)}

log = logging.getLogger(__name__)


def in_repo(path: str) -> str:
    """Relative paths are taken from the repo root (whatever the working directory)."""
    return path if os.path.isabs(path) else os.path.join(REPO, path)


def local_paths(cfg) -> dict[str, str]:
    """``data_paths``, each resolved against the repo root as validation checked it."""
    return {name: in_repo(path) for name, path in (cfg.data_paths or {}).items()}


@dataclass
class Checked:
    """What validation established: the method (options parsed), the device and dtype."""

    method: Method
    device: torch.device
    dtype: torch.dtype


def validate(cfg) -> Checked:
    """Check everything that needs no model weights; one clear line per mistake."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    check_keys(config)
    device = resolve_device(config["device"])
    dtype = resolve_dtype(config["dtype"], device)
    method = check_method(config)
    quantizing = method.name != "none"
    check_datasets(config, quantizing)
    check_model_source(config["model"])
    check_architecture(config, method)
    if quantizing:
        check_stream_memory(config, method, device)
    check_directories(config, quantizing, method)
    return Checked(method, device, dtype)


# --------------------------------------------------------------------------- keys and types


def check_keys(config: dict) -> None:
    unknown = sorted(set(config) - set(TOP))
    if unknown:
        plain = [k for k in TOP if not (k in GROUPS or k in ("method", "experiment"))]
        raise UserError(f"unknown key {unknown[0]}; allowed: {', '.join(plain)} and the groups model, method, "
                        "calib, eval, logger, experiment")
    for key, (kind, rule) in TOP.items():
        if key not in config:
            if key in ("experiment",):
                continue
            raise UserError(f"missing key {key} (conf/config.yaml sets it; was it removed with ~{key}?)")
        config[key] = check_value(key, config[key], kind, rule)
    for group, keys in GROUPS.items():
        values = config[group]
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise UserError(f"unknown key {group}.{unknown[0]}; allowed: {', '.join(keys)}")
        for key in REQUIRED.get(group, ()):
            if key not in values:
                raise UserError(f"missing key {group}.{key}")
        for key, value in values.items():
            kind, rule = keys[key]
            values[key] = check_value(f"{group}.{key}", value, kind, rule)
    for name in config["eval"]["datasets"]:
        if name not in TEST_SETS:
            raise UserError(f"eval.datasets: unknown dataset {name!r}; allowed: {', '.join(TEST_SETS)}")
    if not config["eval"]["datasets"] and not config["eval"].get("zeroshot"):
        raise UserError("eval.datasets is empty and no eval.zeroshot task is given: nothing would be evaluated")
    for name, path in config["data_paths"].items():
        if name not in HUB_DATASETS:
            raise UserError(f"data_paths.{name}: unknown dataset; allowed: {', '.join(HUB_DATASETS)}")
        check_value(f"data_paths.{name}", path, str)
        if not os.path.exists(in_repo(path)):
            raise UserError(f"data_paths.{name}={path} does not exist; point it at a local file or folder")
    outliers = config["model"].get("outliers")
    if outliers:
        for key, (kind, rule) in {"channels": (int, Rule(low=1)), "factor": (float, Rule(positive=True)),
                                  "seed": (int, Rule(low=0))}.items():
            if key in outliers:
                check_value(f"model.outliers.{key}", outliers[key], kind, rule)
    seqlen = config["seqlen"] or config["model"]["seqlen"]
    if seqlen < 2:
        raise UserError(f"seqlen={seqlen} is not allowed; use an integer >= 2")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise UserError(f"device={name} is not allowed; use auto, cpu, cuda or cuda:N")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device={name} but CUDA is not available on this machine; allowed here: auto, cpu")
        if index and int(index) >= count:
            raise UserError(f"device={name} does not exist; this machine has {count} CUDA device(s): "
                            f"{', '.join(f'cuda:{i}' for i in range(count))}")
        return torch.device(name)
    raise UserError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


# --------------------------------------------------------------------------- the method


def check_method(config: dict) -> Method:
    """The method of the run, its options parsed (``none`` when nothing is quantized)."""
    load_methods()
    options = dict(config["method"])
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise UserError("method.name is missing; choose a method with method=<name> (python run.py --methods)")
    method_cls = get_method(name)
    if config["act_bits"] < 16 and not method_cls.supports_act_quant:
        allowed = ", ".join(act_quant_methods()) or "none yet"
        raise UserError(f"method {name!r} is weight-only; act_bits < 16 needs one of: {allowed}")
    spec = QuantSpec(bits=config["bits"], group_size=config["group_size"], sym=config["sym"],
                     act_bits=config["act_bits"])
    method = method_cls(spec, options)
    if config["bits"] >= 16 and config["act_bits"] >= 16:  # nothing to quantize: the full-precision model
        return get_method("none")(spec)
    return method


# --------------------------------------------------------------------------- data


def check_datasets(config: dict, quantizing: bool) -> None:
    """The datasets the run reads exist where it will look for them: a local override laid out
    like the hub repository has the split; offline, a hub set is in the hub cache."""
    from experiments.data import HUB_SOURCES, TEST_SPLITS, cached_hub_file, hub_source, split_files

    paths = config["data_paths"]
    needed = [(name, TEST_SPLITS[name]) for name in config["eval"]["datasets"]]
    if quantizing:
        needed.append((config["calib"]["dataset"], "train"))
    for name, split in needed:
        source = hub_source(name)
        if name == "wikivital":
            wikivital_file()
        elif source in paths:
            split_files(in_repo(paths[source]), HUB_SOURCES[source], split)
        elif _offline() and cached_hub_file(name, split) is None:
            raise UserError(f"dataset {name} needs the hub, which is offline here (HF_DATASETS_OFFLINE / "
                            f"HF_HUB_OFFLINE), and its {split} file is not in the hub cache; point "
                            f"++data_paths.{source}=/path/to/files at local files or use wikivital")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE",
                                                                               "HF_DATASETS_OFFLINE"))


# --------------------------------------------------------------------------- the model


def local_model_folder(path: str) -> str | None:
    """The folder a ``model.path`` names on this machine, or None for a hub id."""
    local = in_repo(path)
    if os.path.exists(local):
        return local
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise UserError(f"model.path={path} does not exist; use a local model folder or a hub id "
                        f"(e.g. facebook/opt-125m)")
    return None


def check_model_source(model: dict) -> None:
    """A local folder is complete; a hub id is reachable (or cached when the hub is offline);
    an architecture twin (``model.twin``) has the facts it is built from and a head geometry
    its width keeps (``experiments.twins``)."""
    path = model["path"]
    if model.get("twin"):
        check_twin(model)
        return
    folder = local_model_folder(path)
    if folder is None:
        if _offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(path, "config.json"), str):
                raise UserError(f"model.path={path} is not in the local hub cache and the hub is offline; "
                                f"use a local folder: model.path=/path/to/{path.split('/')[-1]}")
        return
    check_model_folder(folder, f"model.path={path}")


def check_twin(model: dict) -> None:
    """``model.twin=true`` on a hub model with architecture facts whose twin keeps its geometry."""
    from experiments.twins import twin_facts

    if local_model_folder(model["path"]) is not None:
        raise UserError(f"model.twin=true builds the model from its architecture facts (model.arch), but "
                        f"model.path={model['path']} is a local model folder, which is loaded as it is; "
                        f"drop model.twin, or use a paper model config (e.g. model=opt-125m model.twin=true)")
    twin_facts(model)


def check_model_folder(folder: str, label: str) -> None:
    """config.json, weights (every shard present, safetensors not truncated) and a tokenizer."""
    if not os.path.isdir(folder):
        raise UserError(f"{label} is not a folder; a model folder holds config.json, weights and a tokenizer")
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise UserError(f"{label} has no config.json; a model folder holds config.json, weights and a tokenizer")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        assert isinstance(config, dict)
    except (ValueError, AssertionError, OSError) as e:
        raise UserError(f"{label}: config.json is not a valid JSON object ({type(e).__name__})") from None
    weights = weight_files(folder, label)
    for file in weights:
        if file.endswith(".safetensors"):
            check_safetensors(file, label)
    tokenizer = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
    if not any(os.path.exists(os.path.join(folder, t)) for t in tokenizer):
        raise UserError(f"{label} has no tokenizer (none of {', '.join(tokenizer)}); save one with "
                        f"tokenizer.save_pretrained(folder)")


def weight_files(folder: str, label: str) -> list[str]:
    """The weight files a model folder's loader will read (every shard of an index)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(folder, index)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, OSError):
                raise UserError(f"{label}: {index} is not a valid weight index") from None
            missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
            if missing:
                raise UserError(f"{label}: weight shard {missing[0]} listed in {index} is missing "
                                f"({len(missing)} of {len(shards)} missing)")
            return [os.path.join(folder, s) for s in shards]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.bin")))
    if not files:
        raise UserError(f"{label} has no weights (model.safetensors or pytorch_model.bin)")
    return files


def check_safetensors(path: str, label: str) -> None:
    """The file holds its whole header and every tensor it declares (a copy cut short fails here)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, struct.error, OSError):
        raise UserError(f"{label}: {os.path.basename(path)} is not a readable safetensors file") from None
    if 8 + n + end > size:
        raise UserError(f"{label}: {os.path.basename(path)} is truncated ({size} of {8 + n + end} bytes)")


def model_fingerprint(path: str) -> str:
    """What identifies the weights a run read: for a local folder a hash of its config, of
    its weight files' names and sizes and of the first and last MiB of each; for a hub id,
    the id. Records of two different models that share a name never pass for seeds of one."""
    import hashlib

    folder = local_model_folder(path)
    if folder is None:
        return f"hub:{path}"
    h = hashlib.sha256()
    with open(os.path.join(folder, "config.json"), "rb") as f:
        h.update(f.read())
    for file in weight_files(folder, f"model.path={path}"):
        size = os.path.getsize(file)
        h.update(f"{os.path.basename(file)}:{size}".encode())
        with open(file, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def model_config_file(path: str) -> str | None:
    """The model's config.json on this machine (a local folder, or the hub cache), or None."""
    folder = local_model_folder(path)
    if folder is not None:
        return os.path.join(folder, "config.json")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    return cached if isinstance(cached, str) else None


def check_architecture(config: dict, method: Method) -> None:
    """The checks that need the model's shapes but not its weights, on the architecture built
    from config.json on the meta device (no memory, no weights read): the context holds
    ``seqlen``; the family is supported; the method accepts the widths (``Method.check``:
    group size, BoA's row count per head). Skipped when config.json is not on this machine.
    An architecture twin is built from its own configuration (``experiments.twins``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aespa.core.adapters import ModelAdapter
    from aespa.core.attention import register_attention

    twin = config["model"].get("twin")
    file = None if twin else model_config_file(config["model"]["path"])
    if file is None and not twin:
        return
    try:
        if twin:
            from experiments.twins import twin_config

            model_config = twin_config(config["model"])
        else:
            model_config = AutoConfig.from_pretrained(os.path.dirname(file))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, attn_implementation=register_attention())
    except (OSError, ValueError, KeyError) as e:  # the loader reports an unreadable model in its own words
        log.debug("architecture check skipped: %s", e)
        return
    seqlen = config["seqlen"] or config["model"]["seqlen"]
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        raise UserError(f"seqlen={seqlen} exceeds the model's context of {context} positions; allowed: 2..{context}")
    if method.name != "none":
        method.check(ModelAdapter(model))


def model_bytes(model: dict) -> int | None:
    """Bytes of the model's weights in fp32, from a local folder's files (None for a hub id)."""
    folder = local_model_folder(model["path"])
    if folder is None:
        return None
    total = 0
    for file in weight_files(folder, f"model.path={model['path']}"):
        if file.endswith(".safetensors"):
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    count = 1
                    for d in info["shape"]:
                        count *= d
                    total += 4 * count
        else:
            total += 2 * os.path.getsize(file)  # fp16 .bin files as fp32
    return total


def check_stream_memory(config: dict, method: Method, device: torch.device) -> None:
    """The calibration stream(s) fit in the memory of the device that holds them
    (``nsamples x seqlen x hidden`` fp32 values each, two with a full-precision stream)."""
    hidden = _hidden_size(config["model"])
    if hidden is None:
        return
    seqlen = config["seqlen"] or config["model"]["seqlen"]
    need = (2 if method.needs_fp_stream else 1) * config["nsamples"] * seqlen * hidden * 4
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise UserError(f"nsamples={config['nsamples']} needs about {need / 2**30:.1f} GiB for the calibration "
                        f"stream(s) of {seqlen}-token windows on {device.type}; {free / 2**30:.1f} GiB are free "
                        "(lower nsamples or seqlen)")


# --------------------------------------------------------------------------- directories


def check_directories(config: dict, quantizing: bool, method: Method) -> None:
    """Every directory the run writes is writable; the checkpoint has the room it needs."""
    check_writable("results_dir", config["results_dir"])
    check_writable("cache_dir", config["cache_dir"])
    if quantizing and config["resume"]:
        folder = check_writable("checkpoint_dir", config["checkpoint_dir"])
        weights = model_bytes(config["model"])
        if weights is not None:
            hidden = _hidden_size(config["model"])
            seqlen = config["seqlen"] or config["model"]["seqlen"]
            streams = (2 if method.needs_fp_stream else 1) * config["nsamples"] * seqlen * (hidden or 0) * 4
            need, free = weights + streams, shutil.disk_usage(folder).free
            if need > free:
                raise UserError(f"checkpoint_dir={config['checkpoint_dir']} has {free / 2**30:.2f} GiB free; a "
                                f"checkpoint of this run needs about {need / 2**30:.2f} GiB (or resume=false)")
    if config["save"]:
        save_dir = config["save_dir"]
        if save_dir is not None:
            folder = local_model_folder(config["model"]["path"])
            target = os.path.realpath(in_repo(save_dir))
            if folder is not None and (target == os.path.realpath(folder)
                                       or target.startswith(os.path.realpath(folder) + os.sep)):
                raise UserError(f"save_dir={save_dir} is inside the model folder {config['model']['path']}; "
                                "saving there would overwrite the source model; choose another folder")
            check_writable("save_dir", save_dir)
        else:
            check_writable("results_dir", os.path.join(os.path.dirname(in_repo(config["results_dir"])), "models"))


def check_writable(key: str, path: str) -> str:
    """Create ``path`` if needed and write a probe file in it; the absolute folder."""
    folder = in_repo(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise UserError(f"{key}={path} is not writable ({e.strerror or type(e).__name__}); "
                        f"choose a folder this user can write to") from None
    return folder


def _hidden_size(model: dict) -> int | None:
    if model.get("twin"):
        from experiments.twins import twin_facts

        return twin_facts(model, vocab_size=0)["hidden_size"]  # (the vocabulary does not matter here)
    folder = local_model_folder(model["path"])
    if folder is None:
        return None
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f).get("hidden_size")
