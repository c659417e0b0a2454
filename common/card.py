"""The model card inside `model.safetensors`: what the model is, how to rebuild it, and what it was trained on.

The card is one JSON string under the safetensors header metadata key `histofed-card`. It holds the
`model.*` configuration and the privacy mode (so the DP-compatible GroupNorm/DPGRU variant is rebuilt),
class names, image size, input normalisation, µm/px of the training images when known, the data kind
(synthetic/real), the training sites with their image counts, rounds, strategy, final global metrics,
ε per site and the histofed version, plus every tensor's shape so a card that does not match its weights
is caught before anything is built. `load_model(path)` rebuilds the model from the card alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.classes import class_names
from common.config import ModelConfig, PrivacyConfig, RunConfig
from common.datasets.tissue import FIELD_UM
from common.model import build_model_for
from common.rundir import RunDirectory
from common.training import IMAGENET_MEAN, IMAGENET_STD
from common.weights import WeightMismatchError, load_weights, save_state_dict

if TYPE_CHECKING:
    import torch
    from torch import nn

CARD_KEY = "histofed-card"
CARD_FORMAT = "histofed-model-card/1"
# µm per pixel of the images the model sees (after resizing to model.image-size), per dataset; None = not known.
# Register a dataset here when its scale is stated: a synthetic patch spans FIELD_UM micrometres at any size.
TRAINING_MPP: dict[str, Callable[[RunConfig], float | None]] = {
    "synthetic": lambda cfg: FIELD_UM / cfg.model.image_size,
    "breakhis": lambda cfg: None,
    "camelyon17": lambda cfg: None,
}


class ModelFileError(ValueError):
    """A model file that is not a usable histofed model; the message names the file and what is wrong."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True, frozen=True)


class Normalization(_Part):
    """How pixels become the model's input: RGB uint8 / 255, then (x - mean) / std per channel."""

    channel_order: Literal["RGB"] = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = tuple(float(v) for v in IMAGENET_MEAN.flatten())
    std: tuple[float, float, float] = tuple(float(v) for v in IMAGENET_STD.flatten())


class SiteRecord(_Part):
    """One training site: images it trained on and was tested on (None when never reported)."""

    train_images: int | None = None
    test_images: int | None = None
    epsilon: float | None = None  # privacy spent by this site (ε at privacy.delta), when privacy is on


class PrivacyRecord(_Part):
    """The privacy settings that shape the model (mode → DP layers) and the guarantee (δ)."""

    mode: str = "off"
    fast_depthwise: bool = True
    local_norm: bool = False  # FedBN: normalisation layers never left the sites (global ones are initial)
    delta: float | None = None


class ModelCard(_Part):
    """Everything `predict` and `export` need, and what a reader of the file should know."""

    format: Literal["histofed-model-card/1"] = CARD_FORMAT
    histofed_version: str
    created: str
    model: ModelConfig
    privacy: PrivacyRecord = PrivacyRecord()
    class_names: tuple[str, ...]
    image_size: int
    normalization: Normalization = Normalization()
    microns_per_pixel: float | None = Field(None, gt=0.0)
    data_kind: Literal["synthetic", "real"]
    dataset: str
    sites: dict[str, SiteRecord] = {}
    rounds: int = Field(0, ge=0)
    metrics_round: int | None = None  # the round whose global metrics are given
    strategy: str = ""
    metrics: dict[str, float | None] = {}
    tensors: dict[str, tuple[int, ...]] = {}  # every tensor's shape, filled in when the file is written

    def to_json(self) -> str:
        """The card as the JSON string stored in the file."""
        return self.model_dump_json(by_alias=True)

    def summary(self) -> str:
        """One line for people: data kind first, then what the model is."""
        kind = "SYNTHETIC data (not a clinical model)" if self.data_kind == "synthetic" else "real data"
        acc = self.metrics.get("accuracy")
        acc_text = f", accuracy {acc:.3f} at round {self.metrics_round}" if acc is not None else ""
        privacy = f", privacy {self.privacy.mode}" if self.privacy.mode != "off" else ""
        return (f"model trained on {kind}: {self.dataset}, {len(self.sites)} site(s), {self.rounds} round(s) of "
                f"{self.strategy or '?'}{acc_text}{privacy}; classes {', '.join(self.class_names)}")


def histofed_version() -> str:
    """The installed histofed version ('unknown' when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("histofed")
    except PackageNotFoundError:
        return "unknown"


def card_for_run(
    cfg: RunConfig, *, data_kind: str, history: Sequence[Mapping[str, Any]] = (),
    privacy_report: Mapping[str, Any] | None = None, rounds: int | None = None,
) -> ModelCard:
    """The card of a federation from its config, the recorded rounds (the metrics log) and the privacy report."""
    sites: dict[str, dict[str, Any]] = {}
    for record in history:
        for name, row in record.get("train", {}).items():
            sites.setdefault(name, {})["train_images"] = int(row.get("examples", 0))
        for name, row in record.get("sites", {}).items():
            if row.get("support") is not None:
                sites.setdefault(name, {})["test_images"] = int(row["support"])
    for name, row in (privacy_report or {}).get("sites", {}).items():
        if row.get("epsilon") is not None:
            sites.setdefault(name, {})["epsilon"] = float(row["epsilon"])
    last = history[-1] if history else {}
    metrics = {k: _finite(v) for k, v in last.get("global", {}).items()}
    done = int(last.get("round", 0)) if rounds is None else rounds
    mpp = TRAINING_MPP.get(cfg.data.dataset, lambda _: None)(cfg)
    report = privacy_report or {}
    deltas = [row["delta"] for row in report.get("sites", {}).values() if row.get("delta") is not None]
    delta = report.get("delta", deltas[0] if deltas else None)
    return ModelCard(
        histofed_version=histofed_version(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=cfg.model, privacy=PrivacyRecord(mode=cfg.privacy.mode, fast_depthwise=cfg.privacy.fast_depthwise,
                                               local_norm=cfg.federation.local_norm, delta=delta),
        class_names=class_names(cfg.model.num_classes, cfg.data.dataset), image_size=cfg.model.image_size, microns_per_pixel=mpp,
        data_kind="synthetic" if data_kind == "synthetic" else "real", dataset=cfg.data.dataset,
        sites={k: SiteRecord(**v) for k, v in sorted(sites.items())}, rounds=done,
        metrics_round=int(last["round"]) if "round" in last else None, strategy=cfg.federation.strategy,
        metrics=metrics,
    )


def metadata(card: ModelCard, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Safetensors header metadata for `state`: the card with every tensor's shape filled in."""
    shapes = {k: tuple(int(d) for d in v.shape) for k, v in state.items()}
    return {CARD_KEY: card.model_copy(update={"tensors": shapes}).to_json()}


def write_model(path: Path, state: Mapping[str, torch.Tensor], card: ModelCard) -> Path:
    """Write weights and card as one safetensors file (via a temporary file: never half-written)."""
    save_state_dict(state, path, metadata(card, state))
    return path


def resolve_model_path(path: Path | str) -> Path:
    """A model file, or a run directory (its final model); a clear error when neither exists."""
    path = Path(path)
    if path.is_dir():
        path = RunDirectory(path).model_file
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    return path


def read_card(path: Path | str) -> ModelCard:
    """The card of a model file, checked against the file's tensor names and shapes (no weights loaded)."""
    from safetensors import safe_open

    path = resolve_model_path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a foreign file
        raise ModelFileError(f"{path}: not a safetensors model file ({_first_line(err)})") from None
    if CARD_KEY not in meta:
        raise ModelFileError(f"{path}: not a histofed model: no model card in its header (metadata key '{CARD_KEY}')")
    try:
        card = ModelCard.model_validate(json.loads(meta[CARD_KEY]))
    except (ValueError, ValidationError) as err:
        raise ModelFileError(f"{path}: unreadable model card: {_first_line(err)}") from None
    problem = _mismatch(card.tensors, shapes)
    if problem:
        raise ModelFileError(f"{path}: model card does not match the tensors: {problem}")
    return card


def build_from_card(card: ModelCard) -> nn.Module:
    """The architecture the card describes (plain, or its DP-compatible variant), randomly initialised."""
    privacy = PrivacyConfig(mode=card.privacy.mode, fast_depthwise=card.privacy.fast_depthwise)
    return build_model_for(card.model, privacy, load_pretrained=False)


def load_model(path: Path | str) -> tuple[nn.Module, ModelCard]:
    """Rebuild a model from its file's card alone and load its weights strictly (eval mode, CPU)."""
    from safetensors.torch import load_file

    path = resolve_model_path(path)
    card = read_card(path)
    model = build_from_card(card)
    try:
        load_weights(model, load_file(str(path)))
    except WeightMismatchError as err:
        raise ModelFileError(f"{path}: weights do not fit the architecture in its card: {err}") from None
    return model.eval(), card


def _mismatch(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]) -> str:
    """'' when names and shapes agree, else what differs first."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing or extra:
        parts = ([f"{len(missing)} tensor(s) in the card missing from the file (first '{missing[0]}')"] if missing
                 else []) + ([f"{len(extra)} tensor(s) not in the card (first '{extra[0]}')"] if extra else [])
        return "; ".join(parts)
    for key, shape in expected.items():
        if tuple(shape) != tuple(found[key]):
            return f"'{key}' has shape {tuple(found[key])} in the file, {tuple(shape)} in the card"
    return ""


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
