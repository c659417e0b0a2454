"""`flower-sim`: run named local multi-center simulations through Flower's simulation engine."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from common.config import ConfigError
from common.datasets import get_dataset
from common.datasets.report import DatasetLayoutError
from simulations import display
from simulations.planning import RunOptions, make_plan
from simulations.runner import SimulationError, SimulationPlan, read_history, run_simulation
from simulations.paper import paper_table
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
    resume: Annotated[bool, typer.Option(help="continue --run-dir from its last checkpoint (--rounds may raise the total)")] = False,
    report: Annotated[bool, typer.Option(help="write report.html at the end (`flower-sim report RUN_DIR` writes it later)")] = True,
) -> None:
    """Run a scenario; prints progress and a metrics table, writes a run directory; exit 1 if the run failed."""
    sets = (*(set_ or ()), *(("output.resume=true",) if resume else ()))
    options = RunOptions(scenario, rounds, sites, sets, data_root, run_dir, cpus_per_site, gpus_per_site, timeout)
    try:
        plan = make_plan(options)
    except (ConfigError, SimulationError, DatasetLayoutError, FileNotFoundError) as err:
        _fail(str(err))
    sys.exit(_execute(plan, scenario, report=report))


@app.command()
def compare(
    scenario: Annotated[str, typer.Argument(help="scenario name")] = DEFAULT_SCENARIO,
    seeds: Annotated[int, typer.Option(help="number of seeds (0..N-1: model init and shuffling)")] = 3,
    models: Annotated[str, typer.Option(help="comma-separated: hybrid, alexnet, densenet121, mobilenetv3, efficientnet_b0")] = "hybrid",
    modes: Annotated[str, typer.Option(help="comma-separated: pooled, local, federated")] = "pooled,local,federated",
    holdout: Annotated[Optional[int], typer.Option(help="site index kept out of training and evaluated as an unseen hospital")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="federated rounds (= the budget of every regime)")] = None,
    sites: Annotated[Optional[int], typer.Option(help="number of hospitals")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="config override key=value (repeatable)")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="dataset root on disk")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="output folder (default runs/compare-<scenario>-<time>)")] = None,
) -> None:
    """Pooled vs local-only vs federated, mean ± sd over seeds; writes compare.json and compare.csv."""
    from simulations.compare import MODES, CompareOptions, run_compare

    chosen_modes = tuple(m.strip() for m in modes.split(",") if m.strip())
    chosen_models = tuple(m.strip() for m in models.split(",") if m.strip())
    if seeds < 1 or not chosen_modes or any(m not in MODES for m in chosen_modes):
        _fail(f"--seeds must be >= 1 and --modes a subset of {','.join(MODES)} (got {seeds}, '{modes}')")
    options = CompareOptions(
        RunOptions(scenario, rounds, sites, tuple(set_ or ()), data_root), tuple(range(seeds)), chosen_models,
        chosen_modes, holdout, out_dir,
    )
    try:
        summary = run_compare(options, log=lambda line: console.print(f"[dim]{line}[/dim]", highlight=False))
    except (ConfigError, DatasetLayoutError, FileNotFoundError) as err:
        _fail(str(err))
    except SimulationError as err:
        _fail(str(err), 1)
    console.print(display.compare_table(summary))
    if get_scenario(scenario).paper:
        measured = {f"{r['model']} {r['mode']} (mean of {r['seeds']})": {k: v["mean"] for k, v in r.items() if isinstance(v, dict)}
                    for r in summary["rows"] if r["scope"] == "global"}
        console.print(paper_table(measured, summary["data-kind"]))
    console.print(f"written: {summary['out-dir']}/compare.json, compare.csv", highlight=False)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory written by `flower-sim run`")]) -> None:
    """(Re)generate a run directory's report: PNG plots and one self-contained report.html."""
    from simulations.report import build_report

    if not (run_dir / "config.json").is_file():
        _fail(f"{run_dir} is not a histofed run directory (no config.json)")
    try:
        console.print(f"report: {build_report(run_dir)}", highlight=False)
    except (ValueError, OSError) as err:
        _fail(str(err), 1)


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


@app.command("export-data")
def export_data(
    out: Annotated[Path, typer.Option("--out", help="new or empty folder to write the ImageFolder tree into")],
    scenario: Annotated[str, typer.Argument(help="a synthetic scenario (see `flower-sim scenarios`)")] = DEFAULT_SCENARIO,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="config override key=value (repeatable)")] = None,
) -> None:
    """Write a scenario's SYNTHETIC hospitals as PNGs (<site>/<split>/<class>/<patient>-<n>.png) plus labels.csv."""
    from common.config import parse_assignments
    from simulations.export_data import ExportError, check_target, export

    try:
        check_target(out)
        cfg = get_scenario(scenario).config().override(parse_assignments(set_ or ()))
        counts = export(cfg, out)
    except (ConfigError, ExportError) as err:
        _fail(str(err))
    console.print(f"wrote {sum(counts.values())} synthetic images ({', '.join(f'{k} {v}' for k, v in counts.items())}) "
                  f"and labels.csv to {out}", highlight=False)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _execute(plan: SimulationPlan, scenario: str, *, report: bool = True) -> int:
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
    history = read_history(plan.run_dir)
    display.print_table(console, history)
    if status.get("status") != "completed":
        _report_failure(status, plan.run_dir)
        return 1
    if get_scenario(scenario).paper and history:
        console.print(paper_table({"federated, global (pooled test)": history[-1]["global"]},
                                  history[-1].get("data-kind", "unknown")))
    if report:
        _write_report(plan.run_dir)
    console.print(f"[green]completed[/green] in {status.get('elapsed-s', '?')} s · run directory: {plan.run_dir}")
    return 0


def _write_report(run_dir: Path) -> None:
    from simulations.report import build_report

    try:
        console.print(f"report: {build_report(run_dir)}", highlight=False)
    except Exception as err:  # noqa: BLE001 - a plotting problem must not turn a finished run into a failure
        err_console.print(f"[yellow]warning:[/yellow] report not written: {err}")


def _report_failure(status: dict, run_dir: Path) -> None:
    err_console.print(f"[bold red]run failed:[/bold red] {status.get('error', 'unknown error')} (log: {run_dir / 'flower.log'})", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
