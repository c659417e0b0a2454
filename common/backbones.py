"""Registries of the hybrid's timm backbones, its trainable parts and the paper's baseline architectures (names only, no timm import)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    """A timm model name and the stage indices used as multi-scale features."""

    timm_name: str
    out_indices: tuple[int, ...]
    note: str


BACKBONES: dict[str, BackboneSpec] = {
    "tf_efficientnetv2_b0": BackboneSpec(
        "tf_efficientnetv2_b0", (2, 3, 4), "CPU default (5.6 M backbone params)"
    ),
    "tf_efficientnetv2_b1": BackboneSpec("tf_efficientnetv2_b1", (2, 3, 4), "slightly wider"),
    "efficientnetv2_rw_t": BackboneSpec("efficientnetv2_rw_t", (2, 3, 4), "timm's tiny V2"),
    "tf_efficientnetv2_s": BackboneSpec("tf_efficientnetv2_s", (2, 3, 4), "paper configuration"),
    "test_efficientnet": BackboneSpec(
        "test_efficientnet", (2, 3, 4), "tiny EfficientNet for tests and smoke runs only"
    ),
}


@dataclass(frozen=True)
class ArchitectureSpec:
    """A classifier choice: the hybrid, or one of the seed paper's baselines."""

    source: str  # "hybrid", "timm" or "torchvision"
    name: str
    min_image_size: int
    note: str


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "hybrid": ArchitectureSpec("hybrid", "", 32, "EfficientNetV2 + GRU + attention (the paper's model)"),
    "alexnet": ArchitectureSpec("torchvision", "alexnet", 64, "paper baseline (torchvision; 57 M params)"),
    "densenet121": ArchitectureSpec("timm", "densenet121", 32, "paper baseline"),
    "mobilenetv3": ArchitectureSpec("timm", "mobilenetv3_large_100", 32, "paper baseline"),
    "efficientnet_b0": ArchitectureSpec("timm", "efficientnet_b0", 32, "paper baseline"),
}


# model.trainable: which part of the hybrid trains at the sites (the rest is frozen: eval mode, requires_grad=False).
# Implemented by common/trainable.py; "all" is the from-scratch recipe, the others fine-tune pretrained weights.
TRAINABLE_PARTS: dict[str, str] = {
    "all": "every weight (training from scratch; under DP every BatchNorm becomes GroupNorm)",
    "classifier": "the final linear layer only (a linear probe on the frozen hybrid's attention-pooled features)",
    "head": "everything after the backbone: token projections, token LayerNorm, GRU, attention, classifier",
    "head+norm": "the head plus the affine weights of every backbone BatchNorm (statistics frozen)",
    "last-stage": "the head plus the backbone's deepest stage (statistics frozen)",
}
