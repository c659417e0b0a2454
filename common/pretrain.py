"""Public-data pretraining on the coordinator, before any hospital trains: the hybrid (minus its classifier) learns
tissue types on the embedded public corpus and is written as a local weights file for `model.pretrained-path`.

It never reads a site's data and never sees the malignancy label: its only input is
`common.datasets.public_corpus.load_public_corpus` (tissue types, public labs and patients). The file holds
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
from common.training import evaluate, select_device, train_local

HOLDOUT_SHARE = 0.1  # public patients kept out of pretraining to report tissue-type accuracy


@dataclass(frozen=True)
class PretrainResult:
    """What pretraining wrote and how well the features separate tissue types on held-out public patients."""

    path: Path
    patches: int
    tissues: tuple[str, ...]
    holdout_accuracy: float
    train_loss: float
    seconds: float


def split_patients(corpus: PublicCorpus, share: float = HOLDOUT_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, held out): the last `share` of the public patients are held out."""
    patients = np.unique(corpus.patients)
    held = set(patients[len(patients) - max(1, int(round(share * len(patients)))):]) if len(patients) > 1 else set()
    out = np.array([p in held for p in corpus.patients])
    return ~out, out


def pretrain(cfg: RunConfig, out: Path, *, log: Callable[[str], None] = print) -> PretrainResult:
    """Train the hybrid on the public tissue-type corpus and write every weight but the classifier to `out`."""
    p = cfg.pretrain
    start = time.perf_counter()
    corpus = load_public_corpus(cfg, p.corpus_size, p.seed)
    log(f"public corpus: {len(corpus)} SYNTHETIC tissue-type patches ({', '.join(corpus.names)}), "
        f"{len(np.unique(corpus.patients))} public patients, {len(np.unique(corpus.labs))} public labs "
        f"({time.perf_counter() - start:.0f} s)")
    train_mask, held_mask = split_patients(corpus)
    model_cfg = cfg.model.model_copy(update={"num_classes": len(corpus.names), "trainable": "all",
                                             "pretrained": False, "pretrained_path": ""})  # a tissue-type head
    torch.manual_seed(p.seed)
    model = build_model(model_cfg, load_pretrained=False)
    device = select_device(cfg.train.device)
    model = model.to(device)
    train = ArraySplit(corpus.images[train_mask], corpus.labels[train_mask]).with_transform(
        HedJitter(p.stain_augment) if p.stain_augment > 0 else None)
    train_cfg = cfg.train.model_copy(update={"local_epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr,
                                             "optimizer": "adamw"})
    result = train_local(model, train, train_cfg, device, seed=p.seed)
    held = evaluate(model, ArraySplit(corpus.images[held_mask], corpus.labels[held_mask]), device,
                    amp=cfg.train.amp, num_workers=0, channels_last=cfg.train.channels_last)
    accuracy = float(np.trace(held.confusion) / max(held.confusion.sum(), 1))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    _write(state, out, {"histofed": "public-pretraining", "task": "tissue-type", "tissues": ",".join(corpus.names),
                        "backbone": cfg.model.backbone, "image-size": str(cfg.model.image_size),
                        "corpus-size": str(len(corpus)), "seed": str(p.seed), "data": "synthetic",
                        "holdout-accuracy": f"{accuracy:.4f}"})
    seconds = time.perf_counter() - start
    log(f"pretrained {p.epochs} epochs in {seconds:.0f} s: tissue-type accuracy {accuracy:.3f} on "
        f"{held.num_examples} held-out public patches; wrote {out}")
    return PretrainResult(out, len(corpus), corpus.names, accuracy, result.loss, seconds)


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
