"""`flower-sim`: run named local multi-center simulations through Flower's simulation engine."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from common.datasets.fixtures import FIXTURES
from common.errors import ConfigError, DatasetLayoutError
from common.rundir import RunDirectory
from server.launch import FlowerRunError
from simulations import display
from simulations.paper import paper_table
from simulations.planning import RunOptions, make_plan
from simulations.runner import SimulationPlan, run_simulation
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
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
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
    report: Annotated[bool, typer.Option(help="write the HTML report at the end (`flower-sim report RUN_DIR` writes it later)")] = True,
    ray_address: Annotated[str, typer.Option(help="join this Ray cluster (HOST:PORT of `ray start --head`) instead of starting one; sites get --cpus-per-site / --gpus-per-site")] = "",
) -> None:
    """Run a scenario; prints progress and a metrics table, writes a run directory; exit 1 if the run failed."""
    sets = (*(set_ or ()), *(("output.resume=true",) if resume else ()))
    options = RunOptions(scenario, rounds, sites, sets, data_root, run_dir, cpus_per_site, gpus_per_site, timeout,
                         ray_address=ray_address)
    try:
        plan = make_plan(options)
    except (ConfigError, FlowerRunError, DatasetLayoutError, FileNotFoundError) as err:
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
    adabn: Annotated[bool, typer.Option(help="also score every model at the --holdout hospital after AdaBN (BatchNorm statistics from its unlabeled images)")] = False,
) -> None:
    """Pooled vs local-only vs federated, mean ± sd over seeds; writes compare.json, compare.csv and compare.html."""
    from simulations.compare import MODES, CompareOptions, run_compare

    chosen_modes = tuple(m.strip() for m in modes.split(",") if m.strip())
    chosen_models = tuple(m.strip() for m in models.split(",") if m.strip())
    if seeds < 1 or not chosen_modes or any(m not in MODES for m in chosen_modes):
        _fail(f"--seeds must be >= 1 and --modes a subset of {','.join(MODES)} (got {seeds}, '{modes}')")
    options = CompareOptions(
        RunOptions(scenario, rounds, sites, tuple(set_ or ()), data_root), tuple(range(seeds)), chosen_models,
        chosen_modes, holdout, out_dir, adabn,
    )
    try:
        summary = run_compare(options, log=lambda line: console.print(f"[dim]{line}[/dim]", highlight=False))
    except (ConfigError, DatasetLayoutError, FileNotFoundError) as err:
        _fail(str(err))
    except FlowerRunError as err:
        _fail(str(err), 1)
    console.print(display.compare_table(summary))
    if get_scenario(scenario).paper:
        measured = {f"{r['model']} {r['mode']} (mean of {r['seeds']})": {k: v["mean"] for k, v in r.items() if isinstance(v, dict)}
                    for r in summary["rows"] if r["scope"] == "global"}
        console.print(paper_table(measured, summary["data-kind"]))
    console.print(f"written: {summary['out-dir']}/compare.json, compare.csv, compare.html", highlight=False)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory (`flower-sim run`) or a comparison folder (`flower-sim compare`)")]) -> None:
    """(Re)generate a report: PNG plots and one self-contained HTML page (report.html, or compare.html for a comparison)."""
    from simulations.compare_report import COMPARE_JSON, build_compare_report  # matplotlib only for a report
    from simulations.run_report import build_report

    is_compare = (run_dir / COMPARE_JSON).is_file()
    if not is_compare and not RunDirectory(run_dir).is_run():
        _fail(f"{run_dir} is neither a histofed run directory (no {RunDirectory.CONFIG}) nor a comparison (no {COMPARE_JSON})")
    try:
        console.print(f"report: {(build_compare_report if is_compare else build_report)(run_dir)}", highlight=False)
    except (ValueError, KeyError, OSError) as err:
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
    if dataset not in FIXTURES:
        _fail(f"no on-disk layout to write for '{dataset}' (choose from {', '.join(FIXTURES)})")
    path = FIXTURES[dataset](out.expanduser().resolve(), seed=seed)
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
    if len(plan.cfg.federation.training_sites) == 1:
        err_console.print("[yellow]warning:[/yellow] ONE site: nothing is shared between hospitals, this is local "
                          "training run through Flower", highlight=False)
    console.print(
        f"histofed · scenario [bold]{scenario}[/bold] · {plan.cfg.federation.num_sites} sites · "
        f"{rounds} rounds · {plan.cfg.data.dataset} data · run dir {plan.run_dir}", highlight=False,
    )
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting Flower (SuperLink, Ray, sites)…", total=rounds)
        seen = {"n": 0}

        def poll() -> None:
            history = plan.run.history()
            for record in history[seen["n"]:]:
                progress.console.print(escape(display.round_line(record, rounds)), highlight=False)
                progress.update(task, completed=record["round"], description="training")
            seen["n"] = len(history)

        try:
            status = run_simulation(plan, on_poll=poll)
        except FlowerRunError as err:
            status = {"status": "failed", "error": str(err)}
        except KeyboardInterrupt:
            plan.run.mark_interrupted()
            err_console.print("interrupted: Flower processes stopped (status: interrupted)")
            return 130
    history = plan.run.history()
    display.print_table(console, history)
    _site_trouble(status)
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
    from simulations.run_report import build_report  # matplotlib is imported only for a report

    try:
        console.print(f"report: {build_report(run_dir)}", highlight=False)
    except Exception as err:  # noqa: BLE001 - a plotting problem must not turn a finished run into a failure
        err_console.print(f"[yellow]warning:[/yellow] report not written: {err}")
        return
    try:  # the run's MLflow run (output.mlflow-uri) gets the report too
        from server.tracking import log_report

        run = RunDirectory(run_dir)
        log_report(run_dir, [run.file(RunDirectory.REPORT_HTML), run.file(RunDirectory.REPORT_DIR)])
    except Exception as err:  # noqa: BLE001 - tracking never fails a finished run
        err_console.print(f"[yellow]warning:[/yellow] report not logged to MLflow: {err}")


def _site_trouble(status: dict) -> None:
    """Sites that failed or were rejected during the run (status.json), one line per kind."""
    for kind in ("failed", "rejected"):
        sites = status.get(f"sites-{kind}", {})
        if sites:
            listed = ", ".join(f"{site} in round(s) {', '.join(map(str, e['rounds']))} ({e['last']})" for site, e in sites.items())
            err_console.print(f"[yellow]sites {kind}:[/yellow] {escape(listed)}", highlight=False, soft_wrap=True)


def _report_failure(status: dict, run_dir: Path) -> None:
    log = RunDirectory(run_dir).file(RunDirectory.FLOWER_LOG)
    err_console.print(f"[bold red]run failed:[/bold red] {escape(str(status.get('error', 'unknown error')))} (log: {log})",
                      highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
