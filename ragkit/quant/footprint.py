"""Measure what a loaded model really holds: bytes of every tensor, including bitsandbytes quant states."""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import nn

from ragkit.quant.experts import NF4Experts


@dataclass(frozen=True)
class Footprint:
    """Bytes held by a model's weights and the number of weights they stand for."""

    nbytes: int
    params: int

    @property
    def bytes_per_param(self) -> float:
        return self.nbytes / self.params


def _quant_state_tensors(state) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if state.offset is not None:
        tensors.append(state.offset)
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def measure_footprint(model: nn.Module) -> Footprint:
    """Sum the bytes of all parameters, buffers and 4-bit quant states (shared storage counted once).

    ``params`` counts the weights the tensors stand for: a 4-bit weight counts its unpacked shape,
    an :class:`NF4Experts` module counts every expert's matrices, tied weights count once.
    """
    seen: set[tuple[torch.device, int]] = set()
    nbytes = params = 0

    def add(t: torch.Tensor) -> bool:
        nonlocal nbytes
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            return False
        seen.add(key)
        nbytes += t.untyped_storage().nbytes()
        return True

    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            state = getattr(p, "quant_state", None)
            if not add(p):
                continue
            if isinstance(module, bnb.nn.Linear4bit) and name == "weight" and state is not None:
                params += torch.Size(state.shape).numel()
                for t in _quant_state_tensors(state):
                    add(t)
            else:
                params += p.numel()
        for b in module.buffers(recurse=False):
            add(b)
        if isinstance(module, NF4Experts):
            params += module.logical_params
    return Footprint(nbytes=nbytes, params=params)
