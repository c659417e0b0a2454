"""`flower-client`: the hospital's command line (check-data before joining, start, predict with and export the model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.config import RunConfig, parse_assignments
from common.datasets.images import BadImageError
from common.datasets.names import DATASET_NAMES
from common.datasets.registry import data_kind, get_dataset
from common.datasets.summary import SplitSummary
from common.errors import ConfigError, DatasetLayoutError

REQUIRED_SPLITS = ("train", "test")
app = typer.Typer(help="histofed hospital-side commands.", add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
if not console.is_terminal:
    console.width = 150
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.callback()
def _group() -> None:
    """histofed hospital-side commands."""


@app.command("check-data")
def check_data(
    dataset: Annotated[str, typer.Option(help=f"one of: {', '.join(DATASET_NAMES)}")] = "synthetic",
    root: Annotated[Optional[Path], typer.Option(help="data root (BreaKHis_v1 or camelyon17_v1.0 folder)")] = None,
    site: Annotated[Optional[str], typer.Option(help="only this site")] = None,
    sites: Annotated[Optional[int], typer.Option(help="number of sites to partition into (BreakHis, synthetic)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="config override key=value")] = None,
) -> None:
    """Per site and split: images per class, patients, unreadable files; non-zero exit if the data is unusable."""
    try:
        cfg = _config(dataset, root, sites, set_ or [])
        summaries = get_dataset(cfg.data.dataset).check(cfg)
    except (ConfigError, DatasetLayoutError, BadImageError, FileNotFoundError, ValueError) as err:
        _fail(str(err), 1)
    if site is not None:
        summaries = [s for s in summaries if s.site == site]
        if not summaries:
            _fail(f"no site named '{site}' in this data", 1)
    console.print(_table(summaries, cfg))
    empty = [f"{s.site}/{s.split}" for s in summaries if s.images == 0 and s.split in REQUIRED_SPLITS]
    no_val = [s.site for s in summaries if s.images == 0 and s.split not in REQUIRED_SPLITS]
    if no_val:
        err_console.print(f"[yellow]note:[/yellow] no validation images at {', '.join(no_val)} (too few patients)")
    bad = sum(len(s.unreadable) for s in summaries)
    if bad:
        first = next(u for s in summaries for u in s.unreadable)
        message = f"{bad} unreadable image(s), first: {first}"
        if cfg.data.strict:
            _fail(message + " (data.strict=true)", 1)
        err_console.print(f"[yellow]warning:[/yellow] {message} — they will be skipped and counted", highlight=False)
    if empty:
        _fail(f"no images in {', '.join(empty)}", 1)
    console.print(f"[green]ok[/green]: {sum(s.images for s in summaries)} images in {len({s.site for s in summaries})} site(s)")


@app.command()
def start(
    site: Annotated[str, typer.Option(help="this hospital's name (as the consortium knows it)")],
    server: Annotated[str, typer.Option(help="SuperLink address HOST:PORT")],
    data_root: Annotated[Optional[Path], typer.Option(help="this hospital's data root (not needed for synthetic)")] = None,
    dataset: Annotated[str, typer.Option(help="dataset layout of the data root, checked before joining")] = "synthetic",
    root_cert: Annotated[Optional[Path], typer.Option(help="the consortium CA certificate (TLS)")] = None,
    auth_key: Annotated[Optional[Path], typer.Option(help="this site's private key (SuperNode authentication)")] = None,
    insecure: Annotated[bool, typer.Option(help="no TLS: local tests only")] = False,
    port: Annotated[Optional[int], typer.Option(help="local runtime port (default: a free one)")] = None,
    max_restarts: Annotated[int, typer.Option(help="give up after N reconnects (0 = keep trying)")] = 0,
    connect_timeout: Annotated[float, typer.Option(help="seconds one connection attempt may take before a restart")] = 60.0,
    log_file: Annotated[Optional[Path], typer.Option(help="SuperNode log (default ./<site>-supernode.log)")] = None,
    warm: Annotated[bool, typer.Option(help="keep torch, model and data loaded in a warm worker between messages")] = True,
    task_poll_interval: Annotated[float, typer.Option(help="seconds between the SuperNode's checks for a message to run")] = 0.1,
) -> None:
    """Check this hospital's data, then join the federation as a Flower SuperNode (reconnects when needed)."""
    from client.deploy import NodeOptions, run_node, validate

    options = NodeOptions(site, data_root.expanduser().resolve() if data_root else None, server, root_cert,
                          auth_key, insecure, port, max_restarts, connect_timeout, warm, task_poll_interval)
    try:
        validate(options)
        if data_root is None and get_dataset(dataset).synthetic:  # the name picks the generated hospital
            _check_generated_site(dataset, site)
        if data_root is not None or dataset != "synthetic":
            cfg = _config(dataset, data_root, 1, [])
            summaries = get_dataset(cfg.data.dataset).check(cfg)
            console.print(_table(summaries, cfg))
            if not any(s.images for s in summaries if s.split == "train"):
                raise ValueError(f"no training images under {data_root}")
    except (ConfigError, DatasetLayoutError, BadImageError, FileNotFoundError, ValueError) as err:
        _fail(str(err), 1)
    if insecure:
        err_console.print("[bold yellow]warning: --insecure: model updates travel unencrypted[/bold yellow]")
    log = (log_file or Path(f"{site}-supernode.log")).resolve()
    code = run_node(options, log, say=lambda line: console.print(escape(f"[{site}] {line}"), highlight=False,
                                                                 soft_wrap=True))  # one line, brackets kept
    raise typer.Exit(code)


@app.command("predict")
def predict_command(
    model: Annotated[Path, typer.Option(help="model.safetensors (with its model card) or a run directory")],
    out: Annotated[Path, typer.Option(help="output directory (new or empty)")],
    images: Annotated[Optional[list[Path]], typer.Option(help="image file or directory of images (repeatable)")] = None,
    slide: Annotated[Optional[Path], typer.Option(help="whole-slide image (.svs, .ndpi, .mrxs, tiled TIFF, ...)")] = None,
    attention: Annotated[bool, typer.Option(help="patches: write OUT/attention/<name>.png (tissue | contours)")] = False,
    level: Annotated[Optional[int], typer.Option(help="slide: tile this pyramid level (instead of --mpp)")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="slide: µm/px to tile at (default: the model card's)")] = None,
    slide_mpp: Annotated[Optional[float], typer.Option(help="slide: its level-0 µm/px when the file does not say")] = None,
    threshold: Annotated[float, typer.Option(help="slide: P(malignant) from which tiles go into the GeoJSON")] = 0.5,
    min_tissue: Annotated[float, typer.Option(help="slide: share of a tile that must be tissue")] = 0.5,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda")] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader workers (-1 = auto: 0 on CPU)")] = -1,
    adapt_norm: Annotated[bool, typer.Option(help="adapt normalisation statistics to these images (AdaBN, label-free)")] = False,
) -> None:
    """Classify patches (--images) or a whole slide (--slide): predictions.csv, or tiles.csv + heatmap + GeoJSON."""
    from client.predict import SlideOptions, run_predict

    options = SlideOptions(level=level, mpp=mpp, slide_mpp=slide_mpp, threshold=threshold, min_tissue=min_tissue,
                           batch_size=batch_size, workers=workers)
    _guarded(lambda: run_predict(model_path=model, out=out, images=images or [], slide=slide, attention=attention,
                                 options=options, device=device, adapt_norm=adapt_norm, console=console,
                                 err_console=err_console))


@app.command("export")
def export_command(
    model: Annotated[Path, typer.Option(help="model.safetensors (with its model card) or a run directory")],
    onnx: Annotated[Path, typer.Option(help="the ONNX file to write (the model card goes into its metadata)")],
) -> None:
    """Export the model (backbone, GRU, attention, input normalisation) to ONNX, checked against torch."""
    from client.predict import export

    _guarded(lambda: export(model, onnx))


def _guarded(action: Callable[[], str]) -> None:
    """Run a command: its summary line on stdout; bad input → one line, exit 2; a failure → one line, exit 1."""
    from client.predict import BadInput
    from common.card import ModelFileError
    from common.onnx_export import ExportError
    from common.slides import SlideError

    try:
        line = action()
    except (BadInput, ModelFileError, SlideError, ConfigError) as err:
        _fail(str(err), 2)
    except (ExportError, OSError, RuntimeError) as err:
        _fail(f"{type(err).__name__}: {err}".splitlines()[0], 1)
    console.print(line, highlight=False, soft_wrap=True)


MAX_GENERATED_SITES = 1000  # the server's federation.num-sites decides how many exist; the name's form is checked here


def _check_generated_site(dataset: str, site: str) -> None:
    """A generated dataset knows its site names: refuse any other --site before connecting."""
    names = get_dataset(dataset).site_names(RunConfig().override({"data.dataset": dataset}).with_sites(MAX_GENERATED_SITES))
    if site not in names:
        raise ValueError(f"--site '{site}' is not a {dataset} site: they are named {names[0]}, {names[1]}, ... "
                         "(federation.num-sites of the server's run decides how many)")


def _config(dataset: str, root: Path | None, sites: int | None, sets: list[str]) -> RunConfig:
    pairs: dict[str, str] = {"data.dataset": dataset}
    if root is not None:
        pairs["data.root"] = str(root.expanduser().resolve())
    cfg = RunConfig().override({**pairs, **parse_assignments(sets)})
    if not get_dataset(cfg.data.dataset).synthetic and not cfg.data.root:
        raise ConfigError(f"--root is required for {cfg.data.dataset}")
    fixed = get_dataset(cfg.data.dataset).default_num_sites
    if sites is None:  # as many sites as the data defines (e.g. Camelyon17 centers), else the config's
        sites = fixed(cfg) if fixed else cfg.federation.num_sites
    return cfg.with_sites(sites)


def _table(summaries: list[SplitSummary], cfg: RunConfig) -> Table:
    kind = f"{cfg.data.dataset} ({data_kind(cfg.data.dataset, cfg.data.root).upper()} images)"
    table = Table(title=f"data check — {kind}", title_justify="left")
    for name in ("site", "split", "images", "per class", "patients", "unreadable"):
        table.add_column(name, justify="left" if name in ("site", "split", "per class") else "right")
    for s in summaries:
        per_class = " ".join(f"{k}:{v}" for k, v in s.images_per_class.items())
        table.add_row(s.site, s.split, str(s.images), per_class, str(s.patients or "—"), str(len(s.unreadable)))
    return table


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
