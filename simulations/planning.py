"""Turn command-line choices into a validated simulation plan (shared by `flower-sim run` and `compare`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from common.config import PUBLIC_PRETRAINED, RunConfig, parse_assignments
from common.datasets.registry import get_dataset
from common.errors import ConfigError
from common.privacy.preflight import preflight
from common.rundir import RunDirectory
from server.launch import find_app_dir
from server.tracking import preflight as tracking_preflight
from simulations.runner import SimulationPlan
from simulations.scenarios import get_scenario


@dataclass(frozen=True)
class RunOptions:
    """The command-line choices of `flower-sim run`, before validation."""

    scenario: str
    rounds: int | None = None
    sites: int | None = None
    sets: tuple[str, ...] = ()
    data_root: Path | None = None
    run_dir: Path | None = None
    cpus_per_site: int | None = None
    gpus_per_site: float | None = None
    timeout: float = 3600.0
    ray_address: str = ""  # join this Ray cluster (HOST:PORT of `ray start --head`) instead of starting one


def resolve_config(opt: RunOptions) -> RunConfig:
    """Scenario + shortcuts + --set overrides, validated; raises ConfigError naming the key."""
    cfg = get_scenario(opt.scenario).config()
    if opt.sites is not None:
        cfg = cfg.with_sites(opt.sites)
    if opt.rounds is not None:
        cfg = cfg.override({"federation.rounds": opt.rounds})
    if opt.data_root is not None:
        cfg = cfg.override({"data.root": str(opt.data_root.expanduser().resolve())})
    user = parse_assignments(opt.sets)
    cfg = cfg.override(user)
    entry = get_dataset(cfg.data.dataset)
    if not entry.synthetic and not cfg.data.root:
        raise ConfigError(f"scenario '{opt.scenario}' reads {cfg.data.dataset} from disk: pass --data-root PATH")
    cores, num_sites = os.cpu_count() or 1, len(cfg.federation.training_sites)
    if opt.cpus_per_site is not None and opt.cpus_per_site <= 0:
        raise ConfigError(f"--cpus-per-site must be > 0 (got {opt.cpus_per_site})")
    if opt.ray_address and not re.fullmatch(r"[^:\s]+:\d{1,5}", opt.ray_address):
        raise ConfigError(f"--ray-address must be HOST:PORT of a Ray head (got '{opt.ray_address}')")
    threads = opt.cpus_per_site or max(1, cores // num_sites)  # by default all sites train at once
    if "train.num-threads" not in user:
        cfg = cfg.override({"train.num-threads": threads})
    cfg = _public_pretraining(cfg)
    cfg = _absolute_paths(cfg)
    _privacy_preflight(cfg, entry.synthetic)
    tracking_preflight(cfg)  # MLflow asked for but not installed: exit 2 with how to install it
    _model_preflight(cfg)
    return cfg


def _public_pretraining(cfg: RunConfig) -> RunConfig:
    """model.pretrained-path=public: the embedded public-corpus pretraining, run once per machine and setting (cached)."""
    if cfg.model.pretrained_path != PUBLIC_PRETRAINED:
        return cfg
    from common.pretrain import ensure_public_pretrained  # the coordinator's step, before any site trains

    return cfg.override({"model.pretrained-path": str(ensure_public_pretrained(cfg))})


def _model_preflight(cfg: RunConfig) -> None:
    """A pretrained file that does not fit, or a trainable part the model cannot have, is refused before Flower starts."""
    if cfg.model.pretrained_path or cfg.model.trainable != "all":
        from common.model import build_model_for

        build_model_for(cfg.model, cfg.privacy)  # raises ConfigError naming the file and key, or the part


def _privacy_preflight(cfg: RunConfig, synthetic: bool) -> None:
    """Bad differential-privacy settings are refused here, before Flower starts (exit 2, one line)."""
    try:
        preflight(cfg, num_examples=cfg.data.train_per_site if synthetic else None)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from None


def make_plan(opt: RunOptions, cfg: RunConfig | None = None) -> SimulationPlan:
    """Validate everything (or take a resolved config) and create the run directory."""
    cfg = cfg or resolve_config(opt)
    cores, num_sites = os.cpu_count() or 1, len(cfg.federation.training_sites)
    # Default: every site trains at once (Ray is told there are >= num_sites CPUs); threads split the cores.
    ray_cpus = cores if opt.cpus_per_site is not None else max(cores, num_sites)
    partition = get_dataset(cfg.data.dataset).partition(cfg)  # also validates the data root before anything starts
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = (opt.run_dir or Path("runs") / f"{opt.scenario}-{stamp}").resolve()
    _writable_dir(path)
    run = RunDirectory(path)
    if cfg.output.resume and not run.has_checkpoint():
        raise ConfigError(f"nothing to resume: {run.file(RunDirectory.CHECKPOINT)} does not exist")
    if not cfg.output.resume and path.exists() and any(path.iterdir()):
        raise ConfigError(f"run directory {path} exists and is not empty (use --resume to continue it)")
    path.mkdir(parents=True, exist_ok=True)
    if not cfg.output.resume:  # a resumed run keeps the partition it started with
        run.write_partition(partition)
    cfg = cfg.override({"output.run-dir": str(path)})
    return SimulationPlan(cfg, path, find_app_dir(), opt.cpus_per_site or 1, ray_cpus,
                          _gpu_share(opt.gpus_per_site, cfg), opt.timeout, opt.ray_address)


def _writable_dir(path: Path) -> None:
    """The run directory is a folder this process can write (created if missing), else a one-line ConfigError."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--run-dir {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--run-dir {path} cannot be written ({err.strerror or err})") from None


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """The ServerApp and ClientApps run in other folders: pass absolute, existing file paths."""
    out: dict[str, str] = {}
    for key in ("model.pretrained-path", "data.stain-reference"):
        value = cfg.to_flat()[key]
        if value:
            path = Path(str(value)).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"{key}: file not found: {path}")
            out[key] = str(path)
    return cfg.override(out) if out else cfg


def _gpu_share(requested: float | None, cfg: RunConfig) -> float:
    if requested is not None:
        if requested < 0:
            raise ConfigError(f"--gpus-per-site must be >= 0 (got {requested:g})")
        return requested
    import torch

    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return 0.0
    return 1.0 / cfg.federation.num_sites
