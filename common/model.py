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
        self.scale_channels = list(feature_channels)
        self.frozen_eval: tuple[str, ...] = ()  # submodules kept in eval mode by train() (frozen parts)
        self.backbone = backbone
        self.proj = nn.ModuleList(nn.Conv2d(c, token_dim, kernel_size=1) for c in feature_channels)
        width = token_dim * len(feature_channels)
        self.token_norm = nn.LayerNorm(width)
        self.gru = nn.GRU(width, hidden_size, batch_first=True, bidirectional=bidirectional)
        out_dim = hidden_size * (2 if bidirectional else 1)
        self.attention = AdditiveAttention(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(out_dim, num_classes)

    def train(self, mode: bool = True) -> HybridEffNetGRU:
        """Train mode, except the frozen parts (`frozen_eval`, set by common.trainable): they stay in eval mode."""
        super().train(mode)
        for name in self.frozen_eval if mode else ():
            self.get_submodule(name).eval()
        return self

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """Images B x 3 x H x W → the backbone's S scales pooled to the deepest grid, B x (sum of C_s) x h x w."""
        return self.pool_scales(self.backbone(x))

    @staticmethod
    def pool_scales(feats: list[torch.Tensor]) -> torch.Tensor:
        """S feature maps B x C_s x H_s x W_s → one B x (sum of C_s) x h x w tensor on the deepest grid."""
        grid = (int(feats[-1].shape[-2]), int(feats[-1].shape[-1]))  # python ints: ONNX export needs constant sizes
        return torch.cat([F.adaptive_avg_pool2d(f, grid) for f in feats], dim=1)

    def tokens_from(self, pooled: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pooled scales B x (sum C_s) x h x w → tokens B x T x (S*token_dim) and the token grid (h, w)."""
        parts = torch.split(pooled, self.scale_channels, dim=1)
        scales = [proj(part) for part, proj in zip(parts, self.proj)]
        tokens = torch.cat(scales, dim=1).flatten(2).transpose(1, 2)  # B x T x (S*D)
        return self.token_norm(tokens), (int(pooled.shape[-2]), int(pooled.shape[-1]))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images B x 3 x H x W → tokens B x T x (S*token_dim) and the token grid (h, w)."""
        return self.tokens_from(self.scales(x))

    def pool_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens B x T x W → GRU → attention-pooled B x H' and the B x T attention weights."""
        seq, _ = self.gru(tokens)  # B x T x H'
        return self.attention(seq)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Attention-pooled B x H' → logits B x K."""
        return self.classifier(self.dropout(pooled))

    def forward_head(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens B x T x W → logits B x K and attention B x T."""
        pooled, weights = self.pool_tokens(tokens)
        return self.classify(pooled), weights

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
    """Build the configured classifier (the hybrid or a baseline); pretrained weights only from a LOCAL file.

    The hybrid then gets its trainable part (`model.trainable`, common.trainable): frozen weights
    requires_grad=False and kept in eval mode. Clients build with load_pretrained=False: the server sends weights.
    """
    if cfg.architecture != "hybrid":
        from common.paper_baselines import build_baseline  # torchvision is imported only for a baseline

        return build_baseline(cfg)
    from common.trainable import apply_trainable

    spec = BACKBONES[cfg.backbone]
    backbone = timm.create_model(
        spec.timm_name, pretrained=False, features_only=True, out_indices=spec.out_indices
    )
    model = HybridEffNetGRU(
        backbone,
        list(backbone.feature_info.channels()),
        num_classes=cfg.num_classes,
        token_dim=cfg.token_dim,
        hidden_size=cfg.hidden_size,
        bidirectional=cfg.bidirectional,
        dropout=cfg.dropout,
    )
    if load_pretrained and (cfg.pretrained or cfg.pretrained_path):
        load_pretrained_weights(model, Path(cfg.pretrained_path), timm_name=spec.timm_name)
    if cfg.norm == "group":
        from common.norms import to_group_norm

        to_group_norm(model.backbone)
    return apply_trainable(model, cfg.trainable)


def build_model_for(model_cfg: ModelConfig, privacy_cfg: PrivacyConfig, *, load_pretrained: bool = True) -> nn.Module:
    """The model of this run, identical on server and clients: plain, or DP-compatible whenever privacy is on."""
    if not privacy_cfg.spec.private:
        return build_model(model_cfg, load_pretrained=load_pretrained)
    from common.privacy.dp_model import make_dp_compatible  # Opacus is imported only when privacy is on
    from common.privacy.preflight import check_dp_architecture

    check_dp_architecture(model_cfg)
    model = build_model(model_cfg, load_pretrained=load_pretrained)
    return make_dp_compatible(model, fast_depthwise=privacy_cfg.fast_depthwise, what=f"backbone '{model_cfg.backbone}'",
                              trainable=model_cfg.trainable)


def load_pretrained_weights(model: HybridEffNetGRU, path: Path, *, timm_name: str) -> None:
    """Load a local weights file: the hybrid's own keys (`backbone.*`, GRU, attention, ...; the classifier optional,
    e.g. from `flower-server pretrain`) or a timm checkpoint of the backbone (ImageNet/histopathology, `conv_stem.*`).

    A file that does not fit is a ConfigError naming the file and the first missing or unexpected key.
    """
    state = read_state_dict(path)
    if any(k.startswith("backbone.") for k in state):
        own = model.state_dict()
        need = [k for k in own if not k.startswith("classifier.")]
        optional = [k for k in own if k.startswith("classifier.")]
        target: nn.Module = model
        extra = [k for k in state if k not in own]
        what = "the hybrid"
    else:
        own = model.backbone.state_dict()
        need, optional, target, what = list(own), [], model.backbone, "backbone"
        extra = [k for k in state if k not in own]
        if extra:  # a whole timm classifier checkpoint carries its head too (conv_head, bn2, classifier): allowed
            full = timm.create_model(timm_name, pretrained=False).state_dict()
            extra = [k for k in extra if k not in full]
    missing = [k for k in need if k not in state]
    if missing:
        raise ConfigError(f"pretrained file {path} does not fit {what}: {len(missing)} missing keys (first: '{missing[0]}')")
    if extra:
        raise ConfigError(f"pretrained file {path} does not fit {what}: {len(extra)} unexpected keys (first: '{extra[0]}')")
    use = need + [k for k in optional if k in state]
    bad = [k for k in use if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(f"pretrained file {path}: shape mismatch for '{bad[0]}' (file {tuple(state[bad[0]].shape)}, "
                          f"model {tuple(own[bad[0]].shape)})")
    target.load_state_dict({**own, **{k: state[k].to(own[k].dtype) for k in use}}, strict=True)
