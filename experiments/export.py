"""Write a quantized model to disk (``save=true``), in one of two formats (``save_format``).

``compressed-tensors`` (default): the ``pack-quantized`` format that llm-compressor writes
and transformers and vLLM read. Every quantized linear ``name`` of the blocks is stored as

- ``name.weight_packed``: int32 ``[out, ceil(in * b / 32)]``, each row the unsigned b-bit
  codes as one dense little-endian bitstream (:func:`pack_rows`);
- ``name.weight_scale``: float32 ``[out, groups]`` (one group per row for a per-channel grid);
- ``name.weight_zero_point``: the unsigned integer zero points packed the same way along the
  output dimension, int32 ``[ceil(out * b / 32), groups]`` (asymmetric grids only);
- ``name.weight_shape``: int64 ``[out, in]``;

and ``config.json`` gets a ``quantization_config`` (one config group, ``targets: [Linear]``,
every linear that is not quantized in ``ignore``; ``dequantize: true``, without which
compressed-tensors >= 0.18 refuses asymmetric checkpoints; the ``version`` pinned in
requirements.txt, because the 3-bit layout changed at 0.18). Loading dequantizes
``(codes - zero) * scale`` in the scale's dtype and casts to the model's: float32 scales
make the reloaded weights equal to the in-memory ones whatever dtype the model is loaded in.

Z-Fold's per-input-column factor ζ (``Grid.col_scale``: aespa, Z-FOLD) is not in the format;
it is folded into the op feeding the linear before packing, with the equivalent transforms of
``aespa.core.transforms``: the norm before q/k/v (and fc1 on OPT), the rows (and bias) of v
for o, the rows of up/fc1 for down (ζ > 0 through a ReLU). The stored grids are plain
grids, the folder a standard model; the folded model computes the same function up to float
rounding. Weight-activation runs write the input-activation scheme the format can express
(dynamic per-token int); Q/K/V quantization inside attention is named in the model card.

Tensors that are not packed (embeddings, norms, biases) are stored in float16 or bfloat16
where that holds them exactly (an fp16 checkpoint evaluated in fp32), else as they are; the
config keeps the dtype the run evaluated in. A full-precision run writes a dense folder.

``fake``: a dense Hugging Face folder of the fake-quantized weights, plus the integer codes,
scales and zero points in ``quantization.safetensors``, for inspection.

Refused before any model loads (:func:`check_exportable`): QLLM with channel reassembly
(it changes the architecture) and GPTQ's act-order with dynamic groups (its groups follow
the visiting order and need ``g_idx``, which compressed-tensors no longer reads since 0.19).
At save time every stored weight is checked to lie on its grid, every zero point to fit in
b bits, every ζ to be foldable and the model's parameters to be those of its architecture;
anything else is an :class:`ExportError`, never a silently different model.
"""
from __future__ import annotations

import copy
import json
import os

import torch
from safetensors.torch import save_file

from aespa.core.adapters import ModelAdapter
from aespa.core.errors import UserError
from aespa.core.grid import Grid
from aespa.core.transforms import ChannelTransform, reduce_kv, scale_norm, scale_output_rows

FORMATS = ("compressed-tensors", "fake")
COMPRESSED_TENSORS_VERSION = "0.20.0"  # the pin in requirements.txt, written into every config
NOT_IN_FORMAT = ("the per-token fake quantization of Q, K and V inside attention (compressed-tensors has no field "
                 "for it)")


class ExportError(Exception):
    """The quantized model cannot be written in the asked format without changing it."""


# --------------------------------------------------------------------------- before the run


def check_exportable(cfg) -> None:
    """Refuse, before any model loads, a ``save_format`` that does not exist and a run whose
    model the compressed-tensors format cannot express (one-line :class:`UserError`)."""
    fmt = cfg.get("save_format", "compressed-tensors")
    if fmt not in FORMATS:
        raise UserError(f"save_format={fmt!r} is not supported; allowed: {', '.join(FORMATS)}")
    if not cfg.save or fmt != "compressed-tensors" or (cfg.bits >= 16 and cfg.act_bits >= 16):
        return  # nothing to check: the fake folder, or the full-precision model (a dense folder)
    method = cfg.method
    if method.name == "qllm" and method.get("reassembly", True):
        raise UserError("qllm cannot be saved as compressed-tensors: its channel reassembly changes the model's "
                        "architecture; save_format=fake writes the fake-quantized folder (for inspection)")
    dynamic_groups = "static_groups" in method and not method.static_groups and method.get("qparam", "minmax") == \
        "minmax"  # GPTQ's groups, made as the sweep reaches them (baselines/gptq.py)
    if method.get("act_order") and dynamic_groups and cfg.group_size > 0 and cfg.bits < 16:
        raise UserError(f"{method.name} act_order=true with dynamic groups cannot be saved as compressed-tensors: "
                        f"its groups follow the visiting order (g_idx), which compressed-tensors >= 0.19 does not "
                        f"read; use method.static_groups=true (act-order, groups by column) or save_format=fake")
    if cfg.bits >= 16 and cfg.act_bits < 16:
        raise UserError("bits=16 with act_bits < 16 has no packed weights to save as compressed-tensors; "
                        "use save_format=fake")


# --------------------------------------------------------------------------- the entry point


def save_quantized(model, tokenizer, result, cfg, folder: str, record: dict | None = None) -> tuple[str, list[str]]:
    """Write the quantized model in ``cfg.save_format`` to ``folder``; returns the folder and
    the notes the run's record should carry."""
    fmt = cfg.get("save_format", "compressed-tensors")
    if fmt == "fake":
        return save_fake(model, tokenizer, result, cfg, folder, record), []
    return save_compressed(model, tokenizer, result, cfg, folder, record)


# --------------------------------------------------------------------------- bit packing


def pack_rows(codes: torch.Tensor, bits: int, chunk_rows: int = 1024) -> torch.Tensor:
    """Unsigned ``bits``-bit integers ``[rows, cols]`` -> int32 ``[rows, ceil(cols * bits / 32)]``:
    each row one dense little-endian bitstream, value k at bits ``k*bits .. k*bits + bits - 1``
    (compressed-tensors' ``pack_to_int32`` layout since 0.18)."""
    rows, cols = codes.shape
    n_words = -(-cols * bits // 32)
    n_chunks = -(-cols // 32)  # 32 values fill exactly ``bits`` words
    out = torch.empty(rows, n_words, dtype=torch.int32)
    for r in range(0, rows, chunk_rows):
        v = torch.zeros(min(chunk_rows, rows - r), n_chunks * 32, dtype=torch.int64)
        v[:, :cols] = codes[r : r + chunk_rows].to(torch.int64)
        v = v.view(v.shape[0], n_chunks, 32)
        words = torch.zeros(v.shape[0], n_chunks, bits, dtype=torch.int64)
        for i in range(32):
            word, offset = divmod(i * bits, 32)
            words[:, :, word] |= (v[:, :, i] << offset) & 0xFFFFFFFF
            if offset + bits > 32:
                words[:, :, word + 1] |= v[:, :, i] >> (32 - offset)
        words = words.reshape(v.shape[0], -1)[:, :n_words]
        out[r : r + chunk_rows] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return out


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_rows`: int64 ``[rows, cols]``."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    positions = torch.arange(cols) * bits
    word, offset = positions // 32, positions % 32
    value = words[:, word] >> offset
    spill = offset + bits > 32
    if spill.any():
        value[:, spill] |= words[:, word[spill] + 1] << (32 - offset[spill])
    return value & (2**bits - 1)


# --------------------------------------------------------------------------- compressed-tensors


def save_compressed(model, tokenizer, result, cfg, folder: str, record: dict | None) -> tuple[str, list[str]]:
    adapter = ModelAdapter(model)
    tensors = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    check_architecture(model, tensors)
    grids = {key: grid.to("cpu") for key, grid in result.grids.items()}
    names = {key: linear_name(adapter, key) for key in grids}
    bits = {g.bits for g in grids.values()}
    if len(bits) > 1:
        raise ExportError(f"the linears have different bit widths {sorted(bits)}; one config group expresses one")
    plain = fold_column_scales(adapter, grids, tensors)
    scheme = weight_scheme(plain.values(), bits.pop(), bool(cfg.sym), cfg.group_size) if grids else None
    for key, grid in plain.items():  # one linear at a time: the codes of the in-memory weight on its own grid
        name = names[key]
        codes = grid_codes(grids[key], tensors.pop(f"{name}.weight"), name)
        tensors.update(packed_tensors(name, codes, grid, scheme["symmetric"]))

    notes = []
    config = copy.deepcopy(model.config)
    config.use_cache = True  # the runner turns the cache off for evaluation; generation wants it
    if scheme is None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a dense model (e.g. re-saved from a loaded quantized folder)
    if scheme is not None:
        group = {"targets": ["Linear"], "format": "pack-quantized", "weights": scheme}
        if cfg.act_bits < 16:
            group["input_activations"] = {"num_bits": int(cfg.act_bits), "type": "int", "symmetric": False,
                                          "dynamic": True, "strategy": "token"}
            notes.append(f"saved as compressed-tensors with per-token dynamic int{cfg.act_bits} input activations; "
                         f"not expressible, so not in the folder: {NOT_IN_FORMAT}")
        quantized = {names[k] for k in grids}
        ignore = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized)
        config.quantization_config = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "version": COMPRESSED_TENSORS_VERSION, "dequantize": True, "ignore": ignore,
            "config_groups": {"group_0": group}}
    os.makedirs(folder, exist_ok=True)
    write_safetensors(folder, {n: t if n.endswith(".weight_scale") else narrowest_exact(t)
                               for n, t in drop_tied(tensors).items()})
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    folded = any(g.col_scale is not None for g in grids.values())
    write_model_card(folder, cfg, record, adapter, scheme, folded=folded)
    return folder, notes


def linear_name(adapter: ModelAdapter, key: str) -> str:
    """``"<block>.<role>"`` -> the linear's module name in the model."""
    block, role = key.split(".")
    return f"{adapter.family.blocks}.{int(block)}.{adapter.family.linears[role]}"


def grid_codes(grid: Grid, weight: torch.Tensor, name: str) -> torch.Tensor:
    """The integer codes of ``weight`` on ``grid``, checked: the weight lies on the grid (its
    codes dequantize back to it, at the precision of its dtype) and the zero points are
    integers in ``0 .. 2^b - 1``."""
    zero = grid.zero
    if not bool((zero == zero.round()).all()) or bool((zero < 0).any()) or bool((zero > grid.maxq).any()):
        bad = int(((zero != zero.round()) | (zero < 0) | (zero > grid.maxq)).sum())
        raise ExportError(f"{name}: {bad} zero points are not integers in 0..{grid.maxq} (e.g. a group whose weights "
                          f"all have one sign on a raw min-max grid); {grid.bits}-bit zero points cannot hold them")
    w = weight.float()
    codes = grid.quantize(w)
    back = grid.dequantize(codes).to(weight.dtype).float()
    scale, _ = grid.expanded(w.shape[1])
    tolerance = 1e-4 * scale.abs() + torch.finfo(weight.dtype).eps * w.abs()
    if not bool(((back - w).abs() <= tolerance).all()):
        worst = float(((back - w).abs() / scale.abs()).max())
        raise ExportError(f"{name}: the weight does not lie on its grid (off by up to {worst:.3g} steps)")
    return codes.to(torch.int64)


def fold_column_scales(adapter: ModelAdapter, grids: dict[str, Grid], tensors: dict) -> dict[str, Grid]:
    """Fold every ζ (``Grid.col_scale``) into the op that feeds its linears: ``tensors`` (the
    state dict) is updated in place; returns the plain grids (no ``col_scale``) to pack.

    The feeder's output channel j is multiplied by ζ_j, i.e. divided by ``1 / ζ_j``
    (:class:`~aespa.core.transforms.ChannelTransform`): a norm's gain and bias
    (``scale_norm``), or a linear's rows and bias (``scale_output_rows``; for a quantized
    feeder its per-row scales, its codes unchanged)."""
    plain = {k: Grid(g.scale.float().clone(), g.zero, g.bits, g.group_size) for k, g in grids.items()}
    family, geometry = adapter.family, adapter.geometry
    for i in range(len(adapter.blocks)):
        block = adapter.block(i)
        prefix = f"{family.blocks}.{i}"
        for group in block.groups:
            zetas = [grids[f"{i}.{r}"].col_scale if f"{i}.{r}" in grids else None for r in group.roles]
            if all(z is None for z in zetas):
                continue
            where = f"block {i} ({', '.join(group.roles)})"
            if any(z is None for z in zetas) or any(not torch.equal(z, zetas[0]) for z in zetas):
                raise ExportError(f"{where}: the linears read one input but do not share one per-column factor ζ, "
                                  f"so it cannot be folded into {group.feeder}")
            zeta = zetas[0].float()
            if group.feeder in family.norms:
                path = f"{prefix}.{family.norms[group.feeder]}"
                weight, bias = tensors[f"{path}.weight"], tensors.get(f"{path}.bias")
                new_weight, new_bias = scale_norm(weight.float(), None if bias is None else bias.float(),
                                                  ChannelTransform(1 / zeta))
                tensors[f"{path}.weight"] = new_weight.to(weight.dtype)
                if bias is not None:
                    tensors[f"{path}.bias"] = new_bias.to(bias.dtype)
                continue
            if group.feeder == "v" and geometry.kv_group > 1:
                per_group = zeta.view(geometry.num_kv_heads, geometry.kv_group, geometry.head_dim)
                if not bool((per_group == per_group[:, :1]).all()):
                    raise ExportError(f"{where}: ζ differs between query heads that share a key/value head, so it "
                                      f"cannot be folded into the rows of v")
                zeta = reduce_kv(zeta, geometry)
            if group.feeder == "up" and family.mlp == "relu" and not bool((zeta > 0).all()):
                raise ExportError(f"{where}: ζ has entries <= 0, which do not pass through the ReLU after fc1")
            path = f"{prefix}.{family.linears[group.feeder]}"
            bias = tensors.get(f"{path}.bias")
            key = f"{i}.{group.feeder}"
            rows = plain[key].scale if key in plain else tensors[f"{path}.weight"].float()
            rows, new_bias = scale_output_rows(rows, None if bias is None else bias.float(), ChannelTransform(1 / zeta))
            if key in plain:
                plain[key].scale = rows
            else:
                tensors[f"{path}.weight"] = rows.to(tensors[f"{path}.weight"].dtype)
            if bias is not None:
                tensors[f"{path}.bias"] = new_bias.to(bias.dtype)
    return plain


def weight_scheme(grids, bits: int, sym: bool, group_size: int) -> dict:
    """The ``weights`` entry of the config group: channel or group, symmetric when every zero
    point is the symmetric grid's ``2^(b-1)``."""
    grids = list(grids)
    sizes = {g.group_size if g.scale.shape[1] > 1 else -1 for g in grids}
    if len(sizes) > 1:
        raise ExportError(f"the linears have different group sizes {sorted(sizes)}; one config group expresses one")
    size = sizes.pop()
    if size == 1 and group_size > 1:
        raise ExportError("the grids have one scale per column (act-order with dynamic groups): that needs g_idx, "
                          "which compressed-tensors >= 0.19 does not read; use save_format=fake")
    symmetric = sym and all(bool((g.zero == 2 ** (bits - 1)).all()) for g in grids)
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
            "strategy": "channel" if size == -1 else "group", "group_size": None if size == -1 else size}


def packed_tensors(name: str, codes: torch.Tensor, grid: Grid, symmetric: bool) -> dict[str, torch.Tensor]:
    out_features, in_features = codes.shape
    tensors = {f"{name}.weight_packed": pack_rows(codes, grid.bits),
               f"{name}.weight_scale": grid.scale.float().contiguous(),
               f"{name}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}
    if not symmetric:
        zero = grid.zero.round().to(torch.int64)
        tensors[f"{name}.weight_zero_point"] = pack_rows(zero.T, grid.bits).T.contiguous()
    return tensors


def check_architecture(model, tensors: dict) -> None:
    """The model's parameters are those its config describes (same names and shapes): a
    method that changed the architecture (a new width, a new bias) cannot be reloaded from
    the config."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != actual:
        differ = sorted(set(expected) ^ set(actual)) + sorted(k for k in set(expected) & set(actual)
                                                               if expected[k] != actual[k])
        raise ExportError(f"the quantized model is not the architecture of its config ({len(differ)} parameters "
                          f"differ, e.g. {differ[0]}); save_format=fake writes it for inspection")


def narrowest_exact(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor in float16 or bfloat16 when that holds every value exactly (e.g. the
    embeddings of an fp16 checkpoint evaluated in fp32); the loader casts it back to the
    model's dtype. Scales are never narrowed (dequantization runs in their dtype)."""
    if t.dtype != torch.float32:
        return t
    for dtype in (torch.float16, torch.bfloat16):
        narrow = t.to(dtype)
        if torch.equal(narrow.to(t.dtype), t):
            return narrow
    return t


def drop_tied(tensors: dict) -> dict:
    """Keep one name per shared tensor (tied embeddings: the loader ties them again)."""
    seen, kept = set(), {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        kept[name] = t.contiguous()
    return kept


def write_safetensors(folder: str, tensors: dict, max_shard_size: str = "5GB") -> None:
    """``model.safetensors``, or shards and ``model.safetensors.index.json`` when large."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, os.path.join(folder, filename), metadata={"format": "pt"})
    if split.is_sharded:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)


# --------------------------------------------------------------------------- fake (for inspection)


def save_fake(model, tokenizer, result, cfg, folder: str, record: dict | None) -> str:
    """The dense fake-quantized folder, plus ``quantization.safetensors`` (for a linear at
    ``<block>.<role>``: ``codes``, ``scale``, ``zero`` and, with Z-Fold, ``col_scale``, with
    ``weight == scale * col_scale * (codes - zero)``) and ``quantization.json``."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    adapter = ModelAdapter(model)
    tensors = {}
    for key, grid in result.grids.items():
        block, role = key.split(".")
        weight = adapter.block(int(block)).linear(role).weight.detach().float().cpu()
        grid_cpu = grid.to("cpu")
        tensors[f"{key}.codes"] = grid_cpu.quantize(weight).to(torch.uint8)
        for name, value in grid_cpu.to_dict().items():
            if torch.is_tensor(value):
                tensors[f"{key}.{name}"] = value.contiguous().clone()  # q, k, v share one ζ tensor
    if tensors:
        save_file(tensors, os.path.join(folder, "quantization.safetensors"))
    with open(os.path.join(folder, "quantization.json"), "w") as f:
        json.dump({"method": cfg.method.name, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
                   "act_bits": cfg.act_bits, "family": adapter.family.name,
                   "layers": sorted(result.grids), "note": "weights are fake-quantized: scale * (codes - zero); "
                   "activation quantizers and architecture changes (QLLM) are not in the folder"},
                  f, indent=2)
    write_model_card(folder, cfg, record, adapter, None, fmt="fake")
    return folder


# --------------------------------------------------------------------------- the model card


def vllm_line(bits: int) -> str:
    if bits in (4, 8):
        return "vLLM serves these packed weights with its 4- and 8-bit kernels on GPU."
    return f"vLLM's packed kernels serve 4- and 8-bit weights only, not these {bits}-bit ones."


def write_model_card(folder: str, cfg, record: dict | None, adapter: ModelAdapter, scheme: dict | None,
                     fmt: str = "compressed-tensors", folded: bool = False) -> None:
    """``README.md``: base model, method and knobs, grid, calibration, the record's
    perplexities, the project's commit, how to load it, what the folder does not hold.
    ``scheme``: the weights entry of the compressed-tensors config (None: nothing packed)."""
    from omegaconf import OmegaConf

    record = record or {}
    method = OmegaConf.to_container(cfg.method, resolve=True)
    knobs = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name") or "none"
    calib = record.get("calib") or {"dataset": cfg.calib.dataset, "nsamples": cfg.nsamples,
                                    "seqlen": cfg.seqlen or cfg.model.seqlen}
    ppl = (record.get("metrics") or {}).get("ppl") or {}
    quantized = cfg.bits < 16 or cfg.act_bits < 16
    grid = "per channel" if cfg.group_size == -1 else f"groups of {cfg.group_size} input columns"
    weights = f"{cfg.bits} bits, {grid}, {'symmetric' if cfg.sym else 'asymmetric'}" if cfg.bits < 16 else "16 bits"
    activations = "not quantized" if cfg.act_bits >= 16 else f"{cfg.act_bits} bits, per token, dynamic"
    base = cfg.model.path + (" (with the planted outlier channels of its model config)" if cfg.model.get("outliers")
                             else "")
    twin = f", its architecture twin: random weights (seed {cfg.seed}), not the model" if cfg.model.get("twin") else ""
    lines = [
        "---", "library_name: transformers",
        f"tags: [{'quantized, ' if quantized else ''}{fmt if scheme or fmt == 'fake' else 'dense'}, {method['name']}]",
        "---", "",
        f"# {cfg.model.name}, {method['name']} " + (f"W{cfg.bits}A{cfg.act_bits}" if quantized else "full precision"),
        "",
        f"- base model: `{base}` ({adapter.family.name} family{twin})",
        f"- method: `{method['name']}`; knobs: {knobs}" if quantized else "- not quantized",
        f"- weights: {weights}; activations: {activations}",
        f"- calibration: {calib['dataset']}, {calib['nsamples']} windows of {calib['seqlen']} tokens, seed {cfg.seed}"
        if quantized else "- calibration: none",
        "- perplexity as the run evaluated it: " + (", ".join(f"{k} {v:.4f}" for k, v in ppl.items()) or "none"),
        f"- run {record.get('run_id', '?')}, git commit {(record.get('env') or {}).get('git_commit', '?')}",
        "",
    ]
    load = ["```python", "from transformers import AutoModelForCausalLM",
            "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")", "```"]
    if fmt == "fake":
        lines += ["Format: fake-quantized dense weights (`from_pretrained` loads them as a normal model), plus the "
                  "integer codes, scales and zero points in `quantization.safetensors`, for inspection. Activation "
                  "quantizers and architecture changes (QLLM's channel reassembly) are not in the folder.", ""] + load
    elif scheme is None:
        lines += ["Format: a standard dense folder (nothing was packed).", ""] + load
    else:
        lines += [
            f"Format: compressed-tensors `pack-quantized` (version {COMPRESSED_TENSORS_VERSION}): integer codes packed "
            "in int32, float32 scales" + ("" if scheme["symmetric"] else ", packed zero points") + ". Load it with "
            f"`pip install compressed-tensors=={COMPRESSED_TENSORS_VERSION}` and:", ""] + load + [
            "",
            "transformers dequantizes the weights at load (`dequantize: true` in config.json), on any device, and "
            "gives the weights the run evaluated. " + vllm_line(scheme["num_bits"]),
        ]
        if folded:
            lines += ["", "Z-Fold's per-input-channel factors are folded into the norms and into the rows of the "
                      "linears that feed the quantized ones (the same function, up to float rounding)."]
        if cfg.act_bits < 16:
            lines += ["", f"Activations: the config declares int{cfg.act_bits} per-token dynamic quantization of "
                      "every quantized linear's input, for runtimes that apply it (its range always contains 0; "
                      "the evaluated model used the raw per-token min/max). Not expressible, so not in this folder: "
                      f"{NOT_IN_FORMAT}. transformers' dequantizing load runs every activation in full precision."]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
