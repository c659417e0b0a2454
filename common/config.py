"""Typed run configuration: one validated object, defaults in one place, flat kebab keys for Flower."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.backbones import ARCHITECTURES, BACKBONES, TRAINABLE_PARTS
from common.datasets.names import DATASET_NAMES
from common.errors import ConfigError
from common.privacy.modes import PRIVACY_MODES, PrivacyMode

FlatValue = bool | int | float | str
PrivacyModeName = Literal[tuple(PRIVACY_MODES)]  # type: ignore[valid-type]  # the mode table's names
RENAMED = {"privacy.local-norm": "federation.local-norm"}  # old key → new key: refused with the new name
PUBLIC_PRETRAINED = "public"  # model.pretrained-path: the embedded public-corpus pretraining (flower-sim resolves it)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _registered(value: str, registry: Iterable[str], what: str) -> str:
    if value not in registry:
        raise ValueError(f"unknown {what} '{value}' (choose from {', '.join(registry)})")
    return value


class _Section(BaseModel):
    """Base for every section: unknown keys rejected, kebab-case aliases, immutable."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=_kebab, populate_by_name=True, frozen=True
    )


class ModelConfig(_Section):
    """The EfficientNetV2 → multi-scale tokens → GRU → attention → classifier hybrid."""

    architecture: str = Field("hybrid", description="hybrid, or a paper baseline: alexnet, densenet121, mobilenetv3, efficientnet_b0")
    backbone: str = Field("tf_efficientnetv2_b0", description="timm backbone (see BACKBONES)")
    num_classes: Literal[2, 8] = Field(2, description="2 benign/malignant, 8 BreakHis subtypes")
    token_dim: int = Field(64, gt=0, description="width of each scale's 1x1 projection")
    hidden_size: int = Field(128, gt=0, description="GRU hidden size")
    bidirectional: bool = Field(True, description="bidirectional GRU")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout before the classifier")
    norm: Literal["batch", "group"] = Field("batch", description="hybrid's backbone normalisation: batch (BatchNorm), or group (GroupNorm: no running statistics)")
    image_size: int = Field(64, ge=32, le=1024, description="square input size in pixels")
    pretrained: bool = Field(False, description="load backbone weights from pretrained-path")
    pretrained_path: str = Field("", description="LOCAL .safetensors/.pth file; never downloaded")
    trainable: str = Field("all", description="what trains at the sites: all, classifier, head, head+norm, last-stage (see TRAINABLE_PARTS)")

    @field_validator("trainable")
    @classmethod
    def _known_trainable(cls, value: str) -> str:
        return _registered(value, TRAINABLE_PARTS, "trainable part")

    @model_validator(mode="after")
    def _parts_need_the_hybrid(self) -> ModelConfig:
        if self.trainable != "all" and self.architecture != "hybrid":
            raise ValueError(f"model.trainable={self.trainable} names parts of the hybrid; baselines train 'all'")
        return self

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return _registered(value, BACKBONES, "backbone")

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        return _registered(value, ARCHITECTURES, "architecture")

    @model_validator(mode="after")
    def _fits_architecture(self) -> ModelConfig:
        spec = ARCHITECTURES[self.architecture]
        if self.image_size < spec.min_image_size:
            raise ValueError(f"{self.architecture} needs model.image-size >= {spec.min_image_size}")
        if self.architecture != "hybrid" and (self.pretrained or self.pretrained_path):
            raise ValueError("pretrained weights are supported for the hybrid's backbone only")
        if self.architecture != "hybrid" and self.norm != "batch":
            raise ValueError("model.norm=group is supported for the hybrid only")
        return self

    @model_validator(mode="after")
    def _pretrained_needs_file(self) -> ModelConfig:
        if self.pretrained and not self.pretrained_path:
            raise ValueError(
                "pretrained=true needs model.pretrained-path, a local weights file "
                "(histofed never downloads weights)"
            )
        return self


class DataConfig(_Section):
    """Which dataset feeds the sites, how it is split and partitioned, and stain handling."""

    dataset: str = Field("synthetic", description="dataset registry name")
    root: str = Field("", description="dataset root on disk (real datasets)")
    train_per_site: int = Field(384, gt=0, description="synthetic: training patches per site")
    test_per_site: int = Field(192, gt=0, description="synthetic: held-out test patches per site")
    seed: int = Field(0, ge=0, description="data generation / split / partition seed")
    magnifications: str = Field("200X", description="BreakHis: comma-separated subset of 40X,100X,200X,400X")
    partition: Literal["iid", "label-skew", "quantity-skew"] = Field(
        "iid", description="BreakHis: how patients are dealt to sites"
    )
    dirichlet_alpha: float = Field(0.5, gt=0.0, description="label/quantity skew strength (smaller = more skew)")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="share of patients held out for validation")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of patients held out for test")
    centers: str = Field("0,1,2,3,4", description="Camelyon17: centers used as sites, in site order")
    max_per_site: int = Field(0, ge=0, description="subsample each site's split to at most N images (0 = all)")
    strict: bool = Field(False, description="fail on an unreadable image instead of skipping and counting it")
    stain_normalize: Literal["none", "macenko"] = Field("none", description="per-image stain normalisation")
    stain_reference: str = Field("", description="reference patch for Macenko ('' = torchstain's reference)")
    stain_augment: float = Field(0.0, ge=0.0, le=1.0, description="H&E (HED) jitter strength in training (0 = off)")
    cache_dir: str = Field("", description="where dataset indexes and rendered synthetic sites are cached ('' = ~/.cache/histofed)")
    # ---- the synthetic generator (common/datasets/synthetic.py) ----
    patients_per_site: int = Field(60, gt=0, description="synthetic: patients per hospital (splits are by patient)")
    label_noise: float = Field(0.0, ge=0.0, lt=0.5, description="synthetic: share of train/val labels replaced by another class (test labels stay true)")
    subtype_mix: str = Field("uniform", description="synthetic: subtype weights: uniform, breakhis, or name=weight,... pairs")
    outlier_site: int = Field(-1, ge=-1, description="synthetic: hospital index made an outlier lab, Camelyon17-style (-1 = none)")

    @field_validator("subtype_mix")
    @classmethod
    def _known_subtype_mix(cls, value: str) -> str:
        from common.datasets.cohort import parse_mix

        parse_mix(value)
        return value.strip()

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return _registered(value, DATASET_NAMES, "dataset")

    @field_validator("magnifications")
    @classmethod
    def _known_magnifications(cls, value: str) -> str:
        mags = [m.strip().upper() for m in value.split(",") if m.strip()]
        bad = [m for m in mags if m not in ("40X", "100X", "200X", "400X")]
        if not mags or bad:
            raise ValueError(f"magnifications must be a subset of 40X,100X,200X,400X (got '{value}')")
        return ",".join(mags)

    @field_validator("centers")
    @classmethod
    def _known_centers(cls, value: str) -> str:
        parts = [c.strip() for c in value.split(",") if c.strip()]
        if not parts or any(c not in "01234" or len(c) != 1 for c in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"centers must be distinct values from 0-4, comma-separated (got '{value}')")
        return ",".join(parts)

    @model_validator(mode="after")
    def _fractions_fit(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.val-fraction + data.test-fraction must be below 1")
        return self


class TrainConfig(_Section):
    """Local training on each site."""

    local_epochs: int = Field(1, gt=0, description="local epochs per round")
    batch_size: int = Field(32, gt=0, description="mini-batch size")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="local optimizer")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd: momentum (SCAFFOLD needs 0: plain SGD steps)")
    lr: float = Field(1e-3, gt=0.0, description="learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate over one training call (a round's local epochs; pooled training: the whole budget): constant, or cosine decay to 0")
    weight_decay: float = Field(1e-4, ge=0.0, description="weight decay")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA if present")
    amp: bool = Field(True, description="mixed precision on CUDA (bf16 where supported)")
    channels_last: bool = Field(True, description="channels_last memory format (faster convs)")
    num_threads: int = Field(0, ge=0, description="torch CPU threads (0 = leave as is)")
    num_workers: int = Field(-1, ge=-1, description="DataLoader worker processes (-1 = auto, 0 = in process)")
    seed: int = Field(0, ge=0, description="training seed")
    augment_multiplicity: int = Field(1, ge=1, le=8, description="fine-tuning (model.trainable != all): flip/rotation views per image per step, gradient averaged over them (De et al. 2022)")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="fine-tuning: exponential moving average of the trainable weights within a round, sent instead of the last iterate (0 = off)")
    feature_cache: Literal["auto", "off"] = Field("auto", description="fine-tuning: cache the frozen prefix's features of the 8 flips/rotations per site (auto: when no pixel augmentation is on)")


class FederationConfig(_Section):
    """The Flower strategy and how many sites take part."""

    strategy: Literal["fedavg", "fedprox", "fedadam", "trimmed-mean", "krum", "scaffold"] = Field(
        "fedavg", description="strategy: fedavg, fedprox, fedadam, trimmed-mean, krum (Flower's), scaffold (histofed's)"
    )
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx: weight of the proximal term")
    server_lr: float = Field(0.01, gt=0.0, description="FedAdam: server learning rate (eta)")
    scaffold_lr: float = Field(1.0, gt=0.0, description="SCAFFOLD: global step size eta_g on the averaged update (1 = the mean)")
    trim_beta: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed-mean: share cut at each end")
    krum_malicious: int = Field(0, ge=0, description="krum: number of malicious sites tolerated")
    rounds: int = Field(5, gt=0, description="federated rounds")
    num_sites: int = Field(3, gt=0, description="number of hospitals (sites)")
    fraction_train: float = Field(1.0, gt=0.0, le=1.0, description="share of sites per round")
    fraction_evaluate: float = Field(1.0, gt=0.0, le=1.0, description="share evaluated")
    min_train_sites: int = Field(2, gt=0, description="minimum sites that train in a round")
    min_evaluate_sites: int = Field(2, gt=0, description="minimum sites that evaluate")
    min_available_sites: int = Field(2, gt=0, description="sites to wait for before starting")
    round_timeout_s: float = Field(3600.0, gt=0.0, description="seconds to wait for replies")
    transfer_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of float arrays on the wire (float16 halves bytes; fp32 master weights stay on the server)")
    holdout_site: int = Field(-1, ge=-1, description="site index kept out of training (-1 = none)")
    max_update_norm: float = Field(0.0, ge=0.0, description="reject updates farther than this (L2 over every array, integer counters included) from the global model (0 = no bound)")
    local_norm: bool = Field(False, description="FedBN/SiloBN: normalization layers stay at each site, never sent or averaged")
    evaluate_with_train: bool = Field(False, description="one message per site and round: the train reply also carries the evaluation of the model it received (same metrics; needs fraction-train = fraction-evaluate = 1)")

    @property
    def training_sites(self) -> list[int]:
        """Indices of the sites that take part (all but the held-out one)."""
        return [i for i in range(self.num_sites) if i != self.holdout_site]

    @model_validator(mode="after")
    def _every_site_evaluates_with_train(self) -> FederationConfig:
        if self.evaluate_with_train and not self.fraction_train == self.fraction_evaluate == 1.0:
            raise ValueError("federation.evaluate-with-train needs federation.fraction-train = fraction-evaluate = 1 "
                             "(the sites that train are the sites that evaluate)")
        return self

    @model_validator(mode="after")
    def _minimums_fit(self) -> FederationConfig:
        if self.holdout_site >= self.num_sites:
            raise ValueError(f"federation.holdout-site ({self.holdout_site}) must be below num-sites ({self.num_sites})")
        taking_part = len(self.training_sites)
        for key in ("min_train_sites", "min_evaluate_sites", "min_available_sites"):
            if getattr(self, key) > taking_part:
                raise ValueError(
                    f"federation.{_kebab(key)} ({getattr(self, key)}) exceeds the {taking_part} "
                    "training sites (federation.num-sites minus any holdout)"
                )
        return self


class OutputConfig(_Section):
    """Where the server writes its run directory."""

    run_dir: str = Field("", description="run directory ('' = ./runs/<timestamp>)")
    resume: bool = Field(False, description="continue the run in run-dir from its last checkpoint")
    mlflow_uri: str = Field("", description="MLflow tracking URI ('' = no MLflow; pip install 'histofed[mlflow]')")
    mlflow_experiment: str = Field("histofed", description="MLflow experiment name")


class PrivacyConfig(_Section):
    """Differential privacy: local DP-SGD per site (Opacus), or central DP through Flower's strategy wrappers."""

    mode: PrivacyModeName = Field("off", description="off; local = DP-SGD at every site; central-* = Flower's clipping + noise wrappers")
    target_epsilon: float = Field(8.0, gt=0.0, description="ε budget at delta: per site (local) or per hospital over the run (central)")
    noise_multiplier: float | Literal["auto"] = Field("auto", description="σ, or 'auto' = calibrated so the planned rounds spend target-epsilon")
    delta: float = Field(0.0, ge=0.0, lt=1.0, description="δ (0 = min(1e-5, 0.1/N)); must be below 1/N")
    max_grad_norm: float = Field(1.0, gt=0.0, description="local: per-sample gradient clipping norm C")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant for ε")
    poisson_sampling: bool = Field(True, description="local: Poisson-sampled batches (what the accountant assumes)")
    fast_depthwise: bool = Field(True, description="local: per-group per-sample gradients for grouped/depthwise convs")
    on_budget_exhausted: Literal["skip-site", "stop"] = Field("skip-site", description="a site whose budget is spent declines; the server continues without it, or stops")
    ledger_dir: str = Field("", description="local: folder of the per-site privacy ledgers ('' = the run directory's ledger folder, else ~/.local/state/histofed)")
    clipping_norm: float = Field(1.0, gt=0.0, description="central: L2 clipping norm of each site's update (initial norm when adaptive)")
    target_clipped_quantile: float = Field(0.5, ge=0.0, le=1.0, description="central adaptive: share of updates to clip")
    clip_norm_lr: float = Field(0.2, gt=0.0, description="central adaptive: clipping-norm learning rate")
    physical_batch_size: int = Field(0, ge=0, description="local: largest batch held in memory (Opacus BatchMemoryManager); train.batch-size stays the logical batch (0 = no limit)")

    @property
    def spec(self) -> PrivacyMode:
        """This mode's entry in the privacy-mode table (kind, Flower wrapper and mod, mechanism)."""
        return PRIVACY_MODES[self.mode]

    @field_validator("noise_multiplier", mode="before")
    @classmethod
    def _positive_or_auto(cls, value: Any) -> float | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            sigma = float(value)
        except (TypeError, ValueError):
            raise ValueError("noise multiplier σ must be a number > 0 or 'auto'") from None
        if not sigma > 0.0 or sigma == float("inf"):
            raise ValueError("noise multiplier σ must be > 0 (or 'auto')")
        return sigma


class PretrainConfig(_Section):
    """Public-data pretraining on the coordinator, before any hospital trains (`flower-server pretrain`)."""

    corpus_size: int = Field(6000, gt=0, description="patches of the embedded public corpus (tissue types + nuclear morphometry)")
    epochs: int = Field(12, gt=0, description="pretraining epochs")
    batch_size: int = Field(64, gt=1, description="pretraining batch size")
    lr: float = Field(2e-3, gt=0.0, description="pretraining AdamW learning rate")
    seed: int = Field(0, ge=0, description="corpus and initialisation seed (public labs and patients, disjoint from every site)")
    stain_augment: float = Field(0.1, ge=0.0, le=1.0, description="HED jitter σ while pretraining (stain-robust features; 0 = off)")


class RunConfig(_Section):
    """The whole run: read once at each entry point."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    output: OutputConfig = OutputConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    pretrain: PretrainConfig = PretrainConfig()

    @model_validator(mode="after")
    def _strategy_fits(self) -> RunConfig:
        if self.federation.strategy != "scaffold":
            return self
        if self.privacy.spec.private:  # clipping and noise break the control-variate algebra
            raise ValueError(f"federation.strategy=scaffold cannot be combined with privacy.mode='{self.privacy.mode}' "
                             "(use fedavg or fedprox with differential privacy)")
        if self.train.optimizer != "sgd" or self.train.momentum != 0.0:  # its c_i update assumes plain SGD steps
            raise ValueError("federation.strategy=scaffold needs plain SGD: train.optimizer=sgd and train.momentum=0 "
                             f"(got train.optimizer='{self.train.optimizer}', train.momentum={self.train.momentum:g})")
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> RunConfig:
        if self.train.lr_schedule == "constant":
            return self
        ignored_by = {"privacy.mode": self.privacy.spec.local, "model.trainable": self.model.trainable != "all",
                  "federation.strategy=scaffold": self.federation.strategy == "scaffold"}  # SCAFFOLD's c_i assumes one rate
        clash = [key for key, on in ignored_by.items() if on]
        if clash:
            raise ValueError(f"train.lr-schedule={self.train.lr_schedule} is for full-model training without DP-SGD or "
                             f"SCAFFOLD; it cannot be combined with {', '.join(clash)} (use train.lr-schedule=constant)")
        return self

    @model_validator(mode="after")
    def _outlier_site_exists(self) -> RunConfig:
        if self.data.outlier_site >= self.federation.num_sites:
            raise ValueError(f"data.outlier-site ({self.data.outlier_site}) must be below federation.num-sites "
                             f"({self.federation.num_sites})")
        return self

    def to_flat(self) -> dict[str, FlatValue]:
        """Flatten to Flower run-config keys such as 'model.hidden-size'."""
        nested = self.model_dump(by_alias=True)
        return {f"{sec}.{key}": val for sec, body in nested.items() for key, val in body.items()}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Validate flat 'section.key' values (Flower run config, CLI overrides)."""
        nested: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            section, sep, name = str(key).partition(".")
            if not sep or not name or section not in cls.model_fields:
                raise ConfigError(unknown_key(str(key)))
            nested.setdefault(section, {})[name] = value
        return cls.validate_nested(nested)

    @classmethod
    def validate_nested(cls, nested: Mapping[str, Any]) -> RunConfig:
        """Validate a nested mapping, turning pydantic errors into one ConfigError line."""
        try:
            return cls.model_validate(nested)
        except ValidationError as err:
            raise ConfigError(_one_line(err, nested)) from None

    def with_sites(self, num_sites: int, holdout: int | None = None) -> RunConfig:
        """Set federation.num-sites (and holdout-site), capping the minimum-site settings to fit."""
        fed = self.federation
        holdout = fed.holdout_site if holdout is None else holdout
        pairs: dict[str, Any] = {"federation.num-sites": num_sites, "federation.holdout-site": holdout}
        if num_sites > 0:
            taking_part = num_sites - (1 if 0 <= holdout < num_sites else 0)
            for key in ("min_train_sites", "min_evaluate_sites", "min_available_sites"):
                pairs[f"federation.{_kebab(key)}"] = max(1, min(getattr(fed, key), taking_part))
        return self.override(pairs)

    def override(self, pairs: Mapping[str, Any]) -> RunConfig:
        """Return a new config with flat 'section.key' overrides applied and validated."""
        flat: dict[str, Any] = dict(self.to_flat())
        for key in pairs:
            if key not in flat:
                raise ConfigError(unknown_key(key))
        flat.update(pairs)
        return RunConfig.from_flat(flat)


def unknown_key(key: str) -> str:
    """The message for a key the configuration does not have (naming its new name when it was renamed)."""
    if key in RENAMED:
        return f"configuration key '{key}' was renamed: use '{RENAMED[key]}'"
    return f"unknown configuration key '{key}'"


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """Parse CLI 'key=value' strings; values stay strings for pydantic to coerce."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad --set '{item}': expected key=value, e.g. train.lr=0.001")
        out[key.strip()] = value.strip()
    return out


def _one_line(err: ValidationError, nested: Mapping[str, Any]) -> str:
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc) if loc else "config"
    if first["type"] == "extra_forbidden":
        return unknown_key(key)
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections: its message names the keys
        return msg
    if len(loc) == 2:
        given = nested.get(loc[0], {}).get(loc[1], None)
        return f"invalid value for '{key}': {msg} (got {given!r})"
    return f"invalid configuration in '{key}': {msg}"
