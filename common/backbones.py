"""Registry of timm backbones the hybrid accepts, with the feature stages it taps (no timm import here)."""

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
