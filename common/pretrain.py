"""Public-data pretraining on the coordinator, before any hospital trains: the hybrid (minus its classifier) learns
tissue types and nuclear morphometry on the embedded public corpus and is written as a local weights file for
`model.pretrained-path`.

It never reads a site's data and never sees the malignancy label: its only input is
`common.datasets.public_corpus.load_public_corpus` (tissue types and morphometry of public labs and patients).
One output head does both tasks: cross-entropy on the tissue type plus the mean squared error of the
standardised morphometry (multi-task, like pretraining on a public nucleus-annotated corpus); AdamW with a
cosine learning-rate decay over all steps. The file holds
every hybrid weight but the classifier (`backbone.*`, token projections and norm, GRU, attention), so
`model.trainable` = classifier / head / last-stage fine-tunes pretrained features at the sites.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from common.config import RunConfig
from common.datasets.index_cache import default_cache_dir
from common.datasets.public_corpus import PublicCorpus, load_public_corpus
from common.datasets.splits import ArraySplit
from common.datasets.stain import HedJitter
from common.model import build_model
from common.training import OPTIMIZERS, SCHEDULES, augment, make_loader, select_device, to_input

HOLDOUT_SHARE = 0.1  # public patients kept out of pretraining to report tissue-type accuracy


@dataclass(frozen=True)
class PretrainResult:
    """What pretraining wrote and how well the features separate tissue types on held-out public patients."""

    path: Path
    patches: int
    tissues: tuple[str, ...]
    holdout_accuracy: float
    holdout_r2: float  # mean over the morphometry measures of R² on held-out public patients
    train_loss: float
    seconds: float


def split_patients(corpus: PublicCorpus, share: float = HOLDOUT_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, held out): the last `share` of the public patients are held out."""
    patients = np.unique(corpus.patients)
    held = set(patients[len(patients) - max(1, int(round(share * len(patients)))):]) if len(patients) > 1 else set()
    out = np.array([p in held for p in corpus.patients])
    return ~out, out


def pretrain(cfg: RunConfig, out: Path, *, log: Callable[[str], None] = print) -> PretrainResult:
    """Train the hybrid on the public corpus (tissue type + morphometry) and write every weight but the classifier to `out`."""
    p = cfg.pretrain
    start = time.perf_counter()
    corpus = load_public_corpus(cfg, p.corpus_size, p.seed)
    log(f"public corpus: {len(corpus)} SYNTHETIC patches labelled with tissue types ({', '.join(corpus.names)}) and "
        f"{len(corpus.measures)} nuclear measurements, {len(np.unique(corpus.patients))} public patients, "
        f"{len(np.unique(corpus.labs))} public labs ({time.perf_counter() - start:.0f} s)")
    train_mask, held_mask = split_patients(corpus)
    mean, sd = corpus.morphometry[train_mask].mean(0), corpus.morphometry[train_mask].std(0) + 1e-6
    z = torch.from_numpy((corpus.morphometry - mean) / sd).float()
    outputs = len(corpus.names) + len(corpus.measures)
    model_cfg = cfg.model.model_copy(update={"num_classes": outputs, "trainable": "all",
                                             "pretrained": False, "pretrained_path": ""})  # a multi-task head
    torch.manual_seed(p.seed)
    device = select_device(cfg.train.device)
    model = build_model(model_cfg, load_pretrained=False).to(device)
    train = ArraySplit(corpus.images[train_mask], corpus.labels[train_mask]).with_transform(
        HedJitter(p.stain_augment) if p.stain_augment > 0 else None)
    loss = _fit(model, train, z[torch.from_numpy(train_mask)], len(corpus.names), cfg, device, log)
    accuracy, r2 = _held_out(model, corpus.images[held_mask], corpus.labels[held_mask], z[torch.from_numpy(held_mask)],
                             len(corpus.names), cfg, device)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    _write(state, out, {"histofed": "public-pretraining", "task": "tissue-type+morphometry",
                        "tissues": ",".join(corpus.names), "measures": ",".join(corpus.measures),
                        "backbone": cfg.model.backbone, "image-size": str(cfg.model.image_size),
                        "corpus-size": str(len(corpus)), "seed": str(p.seed), "data": "synthetic",
                        "holdout-accuracy": f"{accuracy:.4f}", "holdout-r2": f"{r2:.4f}"})
    seconds = time.perf_counter() - start
    log(f"pretrained {p.epochs} epochs in {seconds:.0f} s: on {int(held_mask.sum())} held-out public patches "
        f"tissue-type accuracy {accuracy:.3f}, morphometry R² {r2:.3f}; wrote {out}")
    return PretrainResult(out, len(corpus), corpus.names, accuracy, r2, loss, seconds)


def _fit(model: torch.nn.Module, train: ArraySplit, z: torch.Tensor, tissues: int, cfg: RunConfig,
         device: torch.device, log: Callable[[str], None]) -> float:
    """Multi-task training (tissue cross-entropy + morphometry MSE), AdamW with cosine decay; the last epoch's mean loss."""
    p = cfg.pretrain
    loader = make_loader(train, p.batch_size, seed=p.seed, indexed=True)
    opt = OPTIMIZERS["adamw"](model.parameters(), p.lr, cfg.train.weight_decay, 0.0)
    sched = SCHEDULES["cosine"](opt, p.epochs * len(loader))
    gen = torch.Generator().manual_seed(p.seed)
    model.train()
    mean_loss = 0.0
    for epoch in range(p.epochs):
        total, seen = 0.0, 0
        for images, y, _, idx in loader:
            if y.numel() < 2:  # a lone sample breaks BatchNorm statistics
                continue
            out = model(augment(to_input(images, device, cfg.train.channels_last), gen))
            loss = (torch.nn.functional.cross_entropy(out[:, :tissues], y.to(device))
                    + torch.nn.functional.mse_loss(out[:, tissues:], z[idx].to(device)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + float(loss.detach()) * y.numel(), seen + y.numel()
        mean_loss = total / max(seen, 1)
        log(f"  pretraining epoch {epoch + 1}/{p.epochs}: loss {mean_loss:.3f}")
    return mean_loss


@torch.no_grad()
def _held_out(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, z: torch.Tensor, tissues: int,
              cfg: RunConfig, device: torch.device) -> tuple[float, float]:
    """Tissue-type accuracy and mean morphometry R² on the held-out public patients."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    model.eval()
    out = torch.cat([model(to_input(images[i:i + 256], device, cfg.train.channels_last)).float().cpu()
                     for i in range(0, len(labels), 256)])
    accuracy = float((out[:, :tissues].argmax(1).numpy() == labels).mean())
    residual = ((out[:, tissues:] - z) ** 2).sum(0)
    spread = ((z - z.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return accuracy, float((1.0 - residual / spread).mean())


def _write(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """safetensors, written to a temporary file and renamed: never half a file at `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(out)


def public_pretrained_path(cfg: RunConfig) -> Path:
    """Where the public pretraining of this architecture and these pretrain.* settings is cached (data.cache-dir)."""
    from common.datasets import public_corpus

    m = cfg.model
    stamp = {"model": [m.backbone, m.token_dim, m.hidden_size, m.bidirectional, m.dropout, m.image_size],
             "pretrain": cfg.pretrain.model_dump(), "code": [hashlib.sha1(Path(f).read_bytes()).hexdigest()
                                                             for f in (Path(__file__), *public_corpus.source_files())]}
    key = hashlib.sha1(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir(cfg.data.cache_dir) / "pretrained" / f"public-{m.backbone}-{m.image_size}px-{key}.safetensors"


def ensure_public_pretrained(cfg: RunConfig, *, log: Callable[[str], None] = print) -> Path:
    """The cached public pretraining for this config, pretraining first when it is not there yet."""
    path = public_pretrained_path(cfg)
    if path.is_file():
        log(f"public pretraining: reusing {path}")
        return path
    log(f"public pretraining (once per machine and setting): {cfg.pretrain.corpus_size} patches × "
        f"{cfg.pretrain.epochs} epochs → {path}")
    pretrain(cfg, path, log=log)
    return path
