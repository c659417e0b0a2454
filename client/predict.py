"""The hospital's use of the federated model: predict patches and whole slides, export ONNX (`flower-client predict|export`).

Every command writes into a temporary sibling of its output directory and renames it at the end, so an
interrupted or failed run leaves nothing half-written; the output directory must be new or empty.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from common.adabn import adapt_batchnorm
from common.attention import panel, upsample
from common.card import ModelCard, load_model
from common.datasets.splits import FileSplit
from common.inference import Adapter, has_attention, loader_for, predict
from common.slide_outputs import TileCsv, detections, heatmap, positive_probability, regions, write_geojson
from common.slides import SlideError, SlideTiles, open_slide, plan_tiles, thumbnail, tissue_mask, tissue_tiles

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
ADAPT_TILES = 2048  # tiles (at most) the label-free normalisation adaptation sees on a slide


class BadInput(ValueError):
    """Bad command-line input found before anything is computed (exit 2); the message names the path."""


@dataclass(frozen=True)
class SlideOptions:
    """How a slide is tiled and reported (see `flower-client predict --help`)."""

    level: int | None = None
    mpp: float | None = None
    slide_mpp: float | None = None
    threshold: float = 0.5
    min_tissue: float = 0.5
    thumbnail: int = 2048
    batch_size: int = 64
    workers: int = -1


def check_output_dir(out: Path) -> None:
    """The output directory must not exist yet or be empty."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out}: output directory is not empty (choose a new one)")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` only when the block succeeds (removed otherwise)."""
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def collect_images(items: Sequence[Path]) -> list[Path]:
    """Image files under the given directories (recursively, by suffix) and the files given, in order."""
    found: list[Path] = []
    for item in items:
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            raise BadInput(f"{item}: no such file or directory")
    if not found:
        raise BadInput(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(map(str, items))}")
    return found


def _kind(card: ModelCard) -> str:
    return "model trained on SYNTHETIC data" if card.data_kind == "synthetic" else "model trained on real data"


@contextlib.contextmanager
def _progress(console: Console | None, label: str, total: int) -> Iterator[Callable[[int], None]]:
    if console is None:
        yield lambda n: None
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _png_info(card: ModelCard) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("model-data", card.data_kind)
    info.add_text("model", card.summary())
    return info


def predict_patches(
    model: torch.nn.Module, card: ModelCard, images: Sequence[Path], out: Path, *, device: torch.device,
    batch_size: int = 64, attention: bool = False, workers: int = -1, adapt: Adapter | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """OUT/predictions.csv (path, predicted, p_<class>..., model-data), attention panels, skipped.txt; a summary."""
    data = FileSplit(Path(), [str(p) for p in images], list(range(len(images))), card.image_size)
    loader = loader_for(data, batch_size, device, workers)
    counts = dict.fromkeys(card.class_names, 0)
    seen: set[int] = set()
    with staged(out) as tmp, (tmp / "predictions.csv").open("w", newline="") as fh, \
            _progress(console, "patches", len(images)) as advance:
        writer = csv.writer(fh)
        writer.writerow(["path", "predicted", *[f"p_{c}" for c in card.class_names], "model-data"])
        names: set[str] = set()
        for batch in predict(model, loader, device, attention=attention, keep_images=attention, adapt=adapt):
            for row, i in enumerate(batch.index):
                predicted = card.class_names[int(np.argmax(batch.probs[row]))]
                counts[predicted] += 1
                seen.add(int(i))
                writer.writerow([str(images[i]), predicted, *[f"{v:.6f}" for v in batch.probs[row]], card.data_kind])
                if batch.attention is not None and batch.images is not None:
                    name = _unique(images[i].stem, names)
                    heat = upsample(torch.from_numpy(batch.attention[row : row + 1]), batch.images.shape[1:3])[0]
                    (tmp / "attention").mkdir(exist_ok=True)
                    Image.fromarray(panel(batch.images[row], heat)).save(tmp / "attention" / f"{name}.png",
                                                                         pnginfo=_png_info(card))
            advance(len(batch.index) + batch.skipped)
        skipped = [str(p) for i, p in enumerate(images) if i not in seen]
        if skipped:
            (tmp / "skipped.txt").write_text("\n".join(skipped) + "\n")
        summary = {"images": len(images), "predicted": len(seen), "skipped": skipped, "per-class": counts,
                   "model-data": card.data_kind, "model": card.summary()}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    per_class = ", ".join(f"{k} {v}" for k, v in counts.items())
    note = f"; {len(skipped)} unreadable skipped (listed in skipped.txt)" if skipped else ""
    summary["line"] = f"predicted {len(seen)} image(s): {per_class}{note} — {_kind(card)}"
    return summary


def _unique(stem: str, taken: set[str]) -> str:
    name, k = stem, 1
    while name in taken:
        name, k = f"{stem}-{k}", k + 1
    taken.add(name)
    return name


def predict_slide(
    model: torch.nn.Module, card: ModelCard, slide_path: Path, out: Path, options: SlideOptions = SlideOptions(), *,
    device: torch.device, adapt: Adapter | None = None, console: Console | None = None,
) -> dict[str, Any]:
    """OUT/tiles.csv, heatmap.png, tiles.geojson and summary.json for one slide; returns the summary."""
    check_output_dir(out)
    slide = open_slide(slide_path)
    plan = plan_tiles(slide, slide_path, image_size=card.image_size, model_mpp=card.microns_per_pixel,
                      mpp=options.mpp, level=options.level, base_mpp=options.slide_mpp)
    thumb, scale = thumbnail(slide, options.thumbnail)
    grid = tissue_tiles(tissue_mask(thumb), scale, slide.dimensions, plan.tile, options.min_tissue)
    if len(grid.xy) == 0:
        raise SlideError(f"{slide_path}: no tissue found (no {plan.tile} px tile is {options.min_tissue:.0%} tissue "
                         "on the thumbnail)")
    data = SlideTiles(slide_path, grid.xy, plan)
    loader = loader_for(data, options.batch_size, device, options.workers)
    adapt_loader = None
    if adapt is not None:
        pick = np.random.default_rng(0).permutation(len(grid.xy))[:ADAPT_TILES]
        adapt_loader = loader_for(SlideTiles(slide_path, grid.xy[np.sort(pick)], plan), options.batch_size, device,
                                  options.workers)
    positive = np.full(grid.shape, np.nan, np.float32)
    features: list[dict[str, Any]] = []
    by_class: dict[str, list[np.ndarray]] = {}
    with staged(out) as tmp, (tmp / "tiles.csv").open("w", newline="") as fh, \
            _progress(console, "tiles", len(grid.xy)) as advance:
        table = TileCsv(fh, card.class_names, card.data_kind)
        skipped = 0
        for batch in predict(model, loader, device, adapt=adapt, adapt_loader=adapt_loader):
            xy, cells = grid.xy[batch.index], grid.cells[batch.index]
            table.add(xy, plan.tile, batch.probs)
            p = positive_probability(batch.probs, card.class_names)
            positive[cells[:, 0], cells[:, 1]] = p
            found = detections(xy, plan.tile, batch.probs, card.class_names, options.threshold, card.data_kind)
            features += found
            for feature, k in zip(found, np.nonzero(p >= options.threshold)[0]):
                by_class.setdefault(feature["properties"]["classification"]["name"], []).append(cells[k])
            skipped += batch.skipped
            advance(len(batch.index) + batch.skipped)
        cells_by_class = {k: np.stack(v) for k, v in by_class.items()}
        merged = regions(cells_by_class, grid.shape, plan.tile, card.data_kind)
        write_geojson(tmp / "tiles.geojson", merged + features, data_kind=card.data_kind, model=card.summary())
        title = f"{slide_path.name}: P(malignant) per tile (0 black .. 1 yellow) - {_kind(card).upper()}"
        heatmap(thumb, positive, plan.tile, scale, tmp / "heatmap.png", title=title)
        summary = _slide_summary(slide_path, card, plan, positive, table.rows, skipped, options.threshold)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _slide_summary(path: Path, card: ModelCard, plan: Any, positive: np.ndarray, rows: int, skipped: int,
                   threshold: float) -> dict[str, Any]:
    values = positive[np.isfinite(positive)]
    above = int((values >= threshold).sum())
    where = f"{plan.mpp:.3g} µm/px" if plan.mpp else "unknown µm/px"
    line = (f"{path.name}: {rows} tissue tile(s) at {where} (level {plan.level}); P(malignant) mean "
            f"{values.mean() if rows else float('nan'):.3f}, ≥ {threshold:g} in {above} tile(s) "
            f"({above / max(rows, 1):.1%} of tissue), max {values.max() if rows else float('nan'):.3f}"
            f"{f'; {skipped} unreadable tile(s) skipped' if skipped else ''} — {_kind(card)}")
    return {"slide": str(path), "tiles": rows, "skipped-tiles": skipped, "above-threshold": above,
            "threshold": threshold, "mean-p-malignant": float(values.mean()) if rows else None,
            "max-p-malignant": float(values.max()) if rows else None, "plan": asdict(plan),
            "model-data": card.data_kind, "model": card.summary(), "line": line}


def export(model_path: Path, onnx_path: Path) -> str:
    """Write the ONNX graph of a carded model (parity-checked with onnxruntime); returns the summary line."""
    from common.onnx_export import export_onnx

    if onnx_path.exists():
        raise BadInput(f"{onnx_path}: already exists (choose a new file)")
    model, card = load_model(model_path)
    diff = export_onnx(model, card, onnx_path)
    outputs = "'probabilities', 'attention'" if has_attention(model) else "'probabilities'"
    return (f"wrote {onnx_path}: input 'pixels' N x {card.image_size} x {card.image_size} x 3 RGB 0..255, outputs "
            f"{outputs}; max |onnxruntime - torch| = {diff:.1e} on random inputs — {_kind(card)}")


def run_predict(
    *, model_path: Path, out: Path, images: Sequence[Path], slide: Path | None, attention: bool, options: SlideOptions,
    device: str, adapt_norm: bool, console: Console, err_console: Console,
) -> str:
    """`flower-client predict`: check every input, load the model from its card, predict; the summary line."""
    from common.training import select_device

    if bool(images) == (slide is not None):
        raise BadInput("give either --images (files or directories) or --slide, not both or neither")
    check_output_dir(out)
    files = collect_images(images) if images else []
    model, card = load_model(model_path)
    console.print(card.summary(), highlight=False)
    adapt: Adapter | None = adapt_batchnorm if adapt_norm else None  # AdaBN on the new hospital's own images
    if card.privacy.local_norm and adapt is None:
        err_console.print("[yellow]warning:[/yellow] normalisation layers stayed at the sites (FedBN): the global "
                          "model's statistics are its initial ones; consider --adapt-norm", highlight=False)
    dev = select_device(device)
    if slide is not None:
        return predict_slide(model, card, slide, out, options, device=dev, adapt=adapt, console=console)["line"]
    return predict_patches(model, card, files, out, device=dev, batch_size=options.batch_size, attention=attention,
                           workers=options.workers, adapt=adapt, console=console)["line"]
