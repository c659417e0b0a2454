"""Weights by key: safe reading/writing (safetensors, weights-only torch) and strict key/shape/dtype checks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class WeightMismatchError(ValueError):
    """Incoming weights do not match the model by key, shape or dtype."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors, or a weights-only torch file; never unpickles objects."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unreadable file the same way
        raise ValueError(f"cannot read weights file {path}: {str(err).splitlines()[0]}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} does not hold a flat state_dict of tensors")
    return dict(obj)


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors as safetensors (contiguous CPU copies; header metadata such as the model card), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(_unshared(state), str(tmp), metadata=dict(metadata) if metadata else None)
    tmp.replace(path)


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, aliased ones copied (Opacus's DPGRU exposes each weight under two names)."""
    out, seen = {}, set()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise WeightMismatchError naming the first offending key, shape or dtype."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first '{missing[0]}')")
        if extra:
            parts.append(f"{len(extra)} unexpected (first '{extra[0]}')")
        raise WeightMismatchError("weights do not match the model by key: " + ", ".join(parts))
    for key, tensor in own.items():
        got = state[key]
        if tuple(got.shape) != tuple(tensor.shape):
            raise WeightMismatchError(
                f"shape mismatch for '{key}': model {tuple(tensor.shape)}, got {tuple(got.shape)}"
            )
        if got.is_floating_point() != tensor.is_floating_point():
            raise WeightMismatchError(f"dtype mismatch for '{key}': model {tensor.dtype}, got {got.dtype}")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Strictly load weights by key after checking keys, shapes and dtype kinds."""
    check_state_dict(model, state)
    model.load_state_dict(dict(state), strict=True)
