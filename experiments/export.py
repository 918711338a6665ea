"""Write a quantized model: a standard Hugging Face folder with the fake-quantized
weights (reloads with ``from_pretrained``; ``model.path=<folder> method=none``
re-evaluates it), plus the integer codes, scales and zero points of every quantized
linear in ``quantization.safetensors`` and the grid description in ``quantization.json``.

For a linear at ``<block>.<role>``: ``weight == scale * (codes - zero)`` element-wise,
with ``scale``/``zero`` repeated over each group of ``group_size`` input columns and,
when present, ``scale`` multiplied by ``col_scale`` (Z-Fold's per-input-column factor).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from aespa.core.adapters import ModelAdapter


def save_quantized(model, tokenizer, result, cfg, folder: str) -> str:
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
                   "layers": sorted(result.grids), "note": "weights are fake-quantized: scale * (codes - zero)"},
                  f, indent=2)
    return folder
