"""`flower-sim`: run named local multi-center simulations through Flower's simulation engine."""

from __future__ import annotations

import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from common.config import ConfigError, RunConfig, parse_assignments
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
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(
    scenario: Annotated[str, typer.Argument(help="scenario name (see `flower-sim scenarios`)")] = DEFAULT_SCENARIO,
    rounds: Annotated[Optional[int], typer.Option(help="federated rounds")] = None,
    sites: Annotated[Optional[int], typer.Option(help="number of simulated hospitals")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="config override key=value (repeatable)")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="run directory (default runs/<scenario>-<time>)")] = None,
    cpus_per_site: Annotated[Optional[int], typer.Option(help="cores per site; default: all sites at once, cores shared")] = None,
    gpus_per_site: Annotated[Optional[float], typer.Option(help="GPU share per site (default: 1/sites if CUDA)")] = None,
    timeout: Annotated[float, typer.Option(help="wall-clock limit in seconds")] = 3600.0,
) -> None:
    """Run a scenario; prints progress and a metrics table, writes a run directory; exit 1 if the run failed."""
    try:
        plan = _plan(scenario, rounds, sites, set_ or [], run_dir, cpus_per_site, gpus_per_site, timeout)
    except (ConfigError, SimulationError) as err:
        _fail(str(err))
    sys.exit(_execute(plan, scenario))


@app.command()
def scenarios() -> None:
    """List the available scenarios."""
    for name, sc in SCENARIOS.items():
        console.print(f"[bold]{name}[/bold]{' (default)' if name == DEFAULT_SCENARIO else ''}: {sc.description}")


def _plan(
    scenario: str, rounds: int | None, sites: int | None, sets: list[str], run_dir: Path | None,
    cpus: int | None, gpus: float | None, timeout: float,
) -> SimulationPlan:
    cfg = get_scenario(scenario).config()
    overrides: dict[str, object] = {}
    if rounds is not None:
        overrides["federation.rounds"] = rounds
    if sites is not None:
        overrides["federation.num-sites"] = sites
        for key in ("min-train-sites", "min-evaluate-sites", "min-available-sites"):
            overrides[f"federation.{key}"] = min(sites, cfg.to_flat()[f"federation.{key}"]) if sites > 0 else 1
    user = parse_assignments(sets)
    cfg = cfg.override({**overrides, **user})
    cores, num_sites = os.cpu_count() or 1, cfg.federation.num_sites
    if cpus is not None and cpus <= 0:
        raise ConfigError(f"--cpus-per-site must be > 0 (got {cpus})")
    # Default: every site trains at once (Ray told there are >= num_sites CPUs), threads split the cores.
    ray_cpus = cores if cpus is not None else max(cores, num_sites)
    threads = cpus if cpus is not None else max(1, cores // num_sites)
    if "train.num-threads" not in user:
        cfg = cfg.override({"train.num-threads": threads})
    if cfg.model.pretrained_path:  # the ServerApp runs elsewhere: pass an absolute, existing path
        weights = Path(cfg.model.pretrained_path).expanduser().resolve()
        if not weights.is_file():
            raise ConfigError(f"model.pretrained-path: file not found: {weights}")
        cfg = cfg.override({"model.pretrained-path": str(weights)})
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = (run_dir or Path("runs") / f"{scenario}-{stamp}").resolve()
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"run directory {path} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    cfg = cfg.override({"output.run-dir": str(path)})
    return SimulationPlan(cfg, path, find_app_dir(), cpus or 1, ray_cpus, _gpu_share(gpus, cfg), timeout)


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
