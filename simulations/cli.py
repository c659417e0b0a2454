"""`flower-sim`: run named local multi-center simulations through Flower's simulation engine."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from common.config import ConfigError, RunConfig, parse_assignments
from common.datasets import get_dataset
from common.datasets.report import DatasetLayoutError
from simulations import display
from simulations.runner import (
    SimulationError, SimulationPlan, find_app_dir, read_history, run_simulation,
)
from simulations.scenarios import DEFAULT_SCENARIO, SCENARIOS, get_scenario

app = typer.Typer(
    help="histofed local multi-center simulations (Flower simulation engine).",
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
)
console = Console()
if not console.is_terminal:  # logs and CI: wide enough for the metrics table
    console.width = 150
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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


@app.command()
def run(
    scenario: Annotated[str, typer.Argument(help="scenario name (see `flower-sim scenarios`)")] = DEFAULT_SCENARIO,
    rounds: Annotated[Optional[int], typer.Option(help="federated rounds")] = None,
    sites: Annotated[Optional[int], typer.Option(help="number of simulated hospitals")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="config override key=value (repeatable)")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="dataset root on disk (BreakHis / Camelyon17 scenarios)")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="run directory (default runs/<scenario>-<time>)")] = None,
    cpus_per_site: Annotated[Optional[int], typer.Option(help="cores per site; default: all sites at once, cores shared")] = None,
    gpus_per_site: Annotated[Optional[float], typer.Option(help="GPU share per site (default: 1/sites if CUDA)")] = None,
    timeout: Annotated[float, typer.Option(help="wall-clock limit in seconds")] = 3600.0,
) -> None:
    """Run a scenario; prints progress and a metrics table, writes a run directory; exit 1 if the run failed."""
    options = RunOptions(scenario, rounds, sites, tuple(set_ or ()), data_root, run_dir, cpus_per_site, gpus_per_site, timeout)
    try:
        plan = _plan(options)
    except (ConfigError, SimulationError, DatasetLayoutError, FileNotFoundError) as err:
        _fail(str(err))
    sys.exit(_execute(plan, scenario))


@app.command()
def scenarios() -> None:
    """List the available scenarios."""
    for name, sc in SCENARIOS.items():
        console.print(f"[bold]{name}[/bold]{' (default)' if name == DEFAULT_SCENARIO else ''}: {sc.description}")


@app.command()
def fixture(
    dataset: Annotated[str, typer.Argument(help="breakhis or camelyon17")],
    out: Annotated[Path, typer.Argument(help="folder to write the tree into")],
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
) -> None:
    """Write a small SYNTHETIC tree in a real dataset's on-disk layout, to try the readers without the data."""
    try:
        writer = get_dataset(dataset).write_fixture
    except KeyError as err:
        _fail(str(err.args[0]))
    if writer is None:
        _fail(f"dataset '{dataset}' has no on-disk layout to write")
    path = writer(out.expanduser().resolve(), seed=seed)
    console.print(f"wrote a synthetic {dataset} tree (real layout, synthetic images) to {path}", highlight=False)


def _plan(opt: RunOptions) -> SimulationPlan:
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
    cores, num_sites = os.cpu_count() or 1, cfg.federation.num_sites
    if opt.cpus_per_site is not None and opt.cpus_per_site <= 0:
        raise ConfigError(f"--cpus-per-site must be > 0 (got {opt.cpus_per_site})")
    # Default: every site trains at once (Ray told there are >= num_sites CPUs), threads split the cores.
    ray_cpus = cores if opt.cpus_per_site is not None else max(cores, num_sites)
    threads = opt.cpus_per_site or max(1, cores // num_sites)
    if "train.num-threads" not in user:
        cfg = cfg.override({"train.num-threads": threads})
    cfg = _absolute_paths(cfg)
    partition = entry.partition(cfg)  # also validates the data root before anything starts
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = (opt.run_dir or Path("runs") / f"{opt.scenario}-{stamp}").resolve()
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"run directory {path} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    (path / "partition.json").write_text(json.dumps(partition, indent=1))
    cfg = cfg.override({"output.run-dir": str(path)})
    return SimulationPlan(cfg, path, find_app_dir(), opt.cpus_per_site or 1, ray_cpus,
                          _gpu_share(opt.gpus_per_site, cfg), opt.timeout)


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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _execute(plan: SimulationPlan, scenario: str) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C
    rounds = plan.cfg.federation.rounds
    console.print(
        f"histofed · scenario [bold]{scenario}[/bold] · {plan.cfg.federation.num_sites} sites · "
        f"{rounds} rounds · {plan.cfg.data.dataset} data · run dir {plan.run_dir}", highlight=False,
    )
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting Flower (SuperLink, Ray, sites)…", total=rounds)
        seen = {"n": 0}

        def poll() -> None:
            history = read_history(plan.run_dir)
            for record in history[seen["n"]:]:
                progress.console.print(display.round_line(record, rounds), highlight=False)
                progress.update(task, completed=record["round"], description="training")
            seen["n"] = len(history)

        try:
            status = run_simulation(plan, on_poll=poll)
        except SimulationError as err:
            status = {"status": "failed", "error": str(err)}
        except KeyboardInterrupt:
            err_console.print("interrupted: Flower processes stopped")
            return 130
    display.print_table(console, read_history(plan.run_dir))
    if status.get("status") != "completed":
        _report_failure(status, plan.run_dir)
        return 1
    console.print(f"[green]completed[/green] in {status.get('elapsed-s', '?')} s · run directory: {plan.run_dir}")
    return 0


def _report_failure(status: dict, run_dir: Path) -> None:
    err_console.print(f"[bold red]run failed:[/bold red] {status.get('error', 'unknown error')} (log: {run_dir / 'flower.log'})", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()
