"""The seed paper's hybrid: EfficientNetV2 multi-scale features → token sequence → GRU → additive attention → classifier.

Token layout (documented choice): the backbone's last three stages (strides 8, 16, 32) are each
average-pooled to the deepest grid (h x w = input/32), projected by a 1x1 conv to `token_dim`, and
stacked channel-wise, so each spatial position of the deepest grid is one token carrying all scales
(T = h*w tokens of width 3*token_dim, raster order). Attention weights are therefore a map over image
regions. Reference: "A hybrid deep learning model EfficientNet with GRU for breast cancer detection
from histopathology images", Sci. Rep. 2025.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import BACKBONES
from common.config import ModelConfig, PrivacyConfig
from common.errors import ConfigError
from common.weights import read_state_dict


class AdditiveAttention(nn.Module):
    """Bahdanau-style additive attention pooling: score_t = vᵀ tanh(W h_t + b)."""

    def __init__(self, dim: int, attn_dim: int = 64) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, attn_dim)
        self.score = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool B x T x D into B x D; also return the B x T weights (non-negative, sum to 1)."""
        scores = self.score(torch.tanh(self.proj(seq))).squeeze(-1)  # B x T
        weights = torch.softmax(scores.float(), dim=-1).to(seq.dtype)  # B x T
        return torch.einsum("bt,btd->bd", weights, seq), weights


class HybridEffNetGRU(nn.Module):
    """EfficientNetV2 features → multi-scale tokens → (bi)GRU → attention → linear classifier."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: list[int],
        *,
        num_classes: int,
        token_dim: int,
        hidden_size: int,
        bidirectional: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.proj = nn.ModuleList(nn.Conv2d(c, token_dim, kernel_size=1) for c in feature_channels)
        width = token_dim * len(feature_channels)
        self.token_norm = nn.LayerNorm(width)
        self.gru = nn.GRU(width, hidden_size, batch_first=True, bidirectional=bidirectional)
        out_dim = hidden_size * (2 if bidirectional else 1)
        self.attention = AdditiveAttention(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(out_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images B x 3 x H x W → tokens B x T x (S*token_dim) and the token grid (h, w)."""
        feats = self.backbone(x)  # S tensors B x C_s x H_s x W_s
        grid = (int(feats[-1].shape[-2]), int(feats[-1].shape[-1]))  # python ints: ONNX export needs constant sizes
        scales = [proj(F.adaptive_avg_pool2d(f, grid)) for f, proj in zip(feats, self.proj)]
        tokens = torch.cat(scales, dim=1).flatten(2).transpose(1, 2)  # B x T x (S*D)
        return self.token_norm(tokens), grid

    def forward_head(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens B x T x W → logits B x K and attention B x T."""
        seq, _ = self.gru(tokens)  # B x T x H'
        pooled, weights = self.attention(seq)  # B x H', B x T
        return self.classifier(self.dropout(pooled)), weights

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits B x K; with return_attention also the B x h x w attention map."""
        tokens, grid = self.forward_features(x)
        logits, weights = self.forward_head(tokens)
        if return_attention:
            return logits, weights.reshape(-1, *grid)
        return logits


def build_model(cfg: ModelConfig, *, load_pretrained: bool = True) -> nn.Module:
    """Build the configured classifier (the hybrid or a baseline); pretrained weights only from a LOCAL file."""
    if cfg.architecture != "hybrid":
        from common.paper_baselines import build_baseline  # torchvision is imported only for a baseline

        return build_baseline(cfg)
    spec = BACKBONES[cfg.backbone]
    backbone = timm.create_model(
        spec.timm_name, pretrained=False, features_only=True, out_indices=spec.out_indices
    )
    if load_pretrained and (cfg.pretrained or cfg.pretrained_path):
        _load_backbone_weights(backbone, Path(cfg.pretrained_path))
    if cfg.norm == "group":
        from common.norms import to_group_norm

        to_group_norm(backbone)
    return HybridEffNetGRU(
        backbone,
        list(backbone.feature_info.channels()),
        num_classes=cfg.num_classes,
        token_dim=cfg.token_dim,
        hidden_size=cfg.hidden_size,
        bidirectional=cfg.bidirectional,
        dropout=cfg.dropout,
    )


def build_model_for(model_cfg: ModelConfig, privacy_cfg: PrivacyConfig, *, load_pretrained: bool = True) -> nn.Module:
    """The model of this run, identical on server and clients: plain, or DP-compatible whenever privacy is on."""
    if not privacy_cfg.spec.private:
        return build_model(model_cfg, load_pretrained=load_pretrained)
    from common.privacy.dp_model import make_dp_compatible  # Opacus is imported only when privacy is on
    from common.privacy.preflight import check_dp_architecture

    check_dp_architecture(model_cfg)
    model = build_model(model_cfg, load_pretrained=load_pretrained)
    return make_dp_compatible(model, fast_depthwise=privacy_cfg.fast_depthwise, what=f"backbone '{model_cfg.backbone}'")


def _load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a timm checkpoint (safetensors or weights-only torch file) into the feature backbone."""
    state = read_state_dict(path)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(
            f"pretrained file {path} does not fit backbone: {len(missing)} missing keys "
            f"(first: '{missing[0]}')"
        )
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(f"pretrained file {path}: shape mismatch for '{bad[0]}'")
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)
