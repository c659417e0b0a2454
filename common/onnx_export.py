"""ONNX export of a carded model (normalisation, backbone, GRU and attention in one graph), checked with onnxruntime.

The graph takes `pixels`: float32 N x H x W x 3 RGB in 0..255 (what an image file holds) and returns
`probabilities` (N x K softmax) and, for the hybrid, `attention` (N x h x w, each map sums to 1). The model
card travels as ONNX metadata_props (`histofed-card`, plus `class-names` and `model-data` for quick reads).
Exported with torch.onnx's TorchScript-based exporter (`dynamo=False`: needs no onnxscript, works offline).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.card import CARD_KEY, ModelCard
from common.inference import has_attention
from common.training import IMAGENET_MEAN, IMAGENET_STD

INSTALL_HINT = "pip install 'histofed[onnx]'"
OPSET = 17
TOLERANCE = 1e-4


class ExportError(ValueError):
    """The export failed or its graph does not reproduce the torch model; the message names the file."""


class _Deployable(nn.Module):
    """pixels N x H x W x 3 (0..255) → probabilities N x K (and attention N x h x w for the hybrid)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.attention = has_attention(model)
        self.register_buffer("mean", IMAGENET_MEAN.clone() * 255.0)
        self.register_buffer("std", IMAGENET_STD.clone() * 255.0)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (pixels.permute(0, 3, 1, 2) - self.mean) / self.std  # N x 3 x H x W, as common.training.to_input
        if self.attention:
            logits, attn = self.model(x, return_attention=True)
            return torch.softmax(logits, dim=1), attn
        return (torch.softmax(self.model(x), dim=1),)


def _onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ExportError(f"ONNX export needs onnx and onnxruntime: {INSTALL_HINT}") from None
    return onnx, onnxruntime


def export_onnx(model: nn.Module, card: ModelCard, path: Path, *, check_batch: int = 3, seed: int = 0) -> float:
    """Write `path` (via a temporary file) and return the max |onnxruntime - torch| on random pixels (≤ 1e-4)."""
    onnx, ort = _onnx()
    wrapper = _Deployable(model.cpu().eval()).eval()
    size = card.image_size
    outputs = ["probabilities", "attention"] if wrapper.attention else ["probabilities"]
    example = torch.rand(2, size, size, 3, generator=torch.Generator().manual_seed(seed)) * 255.0
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python ints for the (constant) token grid
            torch.onnx.export(wrapper, (example,), str(tmp), input_names=["pixels"], output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in ["pixels", *outputs]},
                              opset_version=OPSET, dynamo=False)
        graph = onnx.load(str(tmp))
        for key, value in ((CARD_KEY, card.to_json()), ("class-names", json.dumps(list(card.class_names))),
                           ("model-data", card.data_kind)):
            graph.metadata_props.add(key=key, value=value)
        graph.doc_string = card.summary()
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        diff = parity(wrapper, tmp, size, batch=check_batch, seed=seed + 1)
        if not diff <= TOLERANCE:
            raise ExportError(f"{path}: the ONNX graph differs from the torch model by {diff:.2e} (> {TOLERANCE:g})")
        tmp.replace(path)
        return diff
    finally:
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def parity(wrapper: nn.Module, path: Path, size: int, *, batch: int, seed: int) -> float:
    """Max absolute difference of every output between onnxruntime and torch on random pixels."""
    _, ort = _onnx()
    pixels = torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed)) * 255.0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixels": pixels.numpy()})
    want = [t.numpy() for t in wrapper(pixels)]
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want))


def read_onnx_card(path: Path) -> ModelCard:
    """The model card stored in an exported graph's metadata."""
    onnx, _ = _onnx()
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if CARD_KEY not in props:
        raise ExportError(f"{path}: no histofed model card in the ONNX metadata")
    return ModelCard.model_validate_json(props[CARD_KEY])
