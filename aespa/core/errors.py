"""The two exceptions a run reports without a traceback.

- :class:`UserError`: a user's mistake. The runner prints its message as one line and exits
  with status 2; no record is written (in a ``-m`` sweep, the job is recorded as failed
  and the sweep goes on).
- :class:`NumericalError`: a NaN or an Inf where a number must be finite (weights,
  statistics, Hessians, a block's output, the evaluated loss). The run stops, its record
  says ``status: failed`` with the message, which names where it first appeared.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


class UserError(Exception):
    """Bad input: the message says what is wrong and what is allowed."""


class NumericalError(Exception):
    """A non-finite value; the message names the block and the layer or tensor."""


def check_finite(where: str, tensors: Mapping[str, torch.Tensor | None]) -> None:
    """Raise :class:`NumericalError` naming the first tensor (in order) with a NaN or an Inf."""
    for name, t in tensors.items():
        if t is None or not t.is_floating_point():
            continue
        # in slices of 2^22 values: isfinite's temporaries stay small next to a calibration stream
        flat = t.detach().reshape(-1)
        for part in flat.split(1 << 22):
            if not bool(torch.isfinite(part).all()):
                kind = "NaN" if bool(torch.isnan(flat).any()) else "Inf"
                raise NumericalError(f"{kind} in {where}: {name}")
