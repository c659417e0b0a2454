"""`flower-server`: the coordinator's command line (keys: the consortium's TLS and SuperNode-auth kit)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(help="histofed coordinator commands.", add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console(soft_wrap=True)  # paths stay whole, so they can be copied
err_console = Console(stderr=True, soft_wrap=True)


@app.callback()
def _group() -> None:
    """histofed coordinator commands."""


@app.command()
def keys(
    out: Annotated[Path, typer.Option(help="folder for the kit (never overwritten)")],
    hosts: Annotated[str, typer.Option(help="comma-separated host names / IPs the server is reached at")],
    sites: Annotated[str, typer.Option(help="comma-separated site names, one key pair each")],
    days: Annotated[int, typer.Option(help="certificate validity in days")] = 825,
) -> None:
    """Create a CA, a server certificate for the hosts and one SuperNode key pair per site."""
    from server.keys import CA_DIR, make_kit

    try:
        kit = make_kit(out, hosts=[h.strip() for h in hosts.split(",") if h.strip()],
                       sites=[s.strip() for s in sites.split(",") if s.strip()], days=days)
    except (ValueError, FileExistsError, OSError) as err:
        _fail(err, 2)
    console.print(f"CA certificate (every site gets a copy): {kit.ca_cert}", highlight=False)
    console.print(f"server certificate / key (server only): {kit.server_cert} / {kit.server_key}", highlight=False)
    for site, (private, public) in kit.site_keys.items():
        console.print(f"{site}: hand over the folder {private.parent} (its private key + ca.crt, nothing else); "
                      f"public key {public} stays on the server", highlight=False)
    console.print(f"CA private key: {out / CA_DIR / 'ca.key'} — keep it offline and never hand it out "
                  "(it signs server certificates); it is not in any site's folder", highlight=False)
    if len(kit.site_keys) == 1:
        err_console.print("[yellow]warning:[/yellow] one site: a federation needs at least two hospitals", highlight=False)


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="weights file to write (.safetensors); give it to model.pretrained-path")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="config override key=value: model.*, pretrain.*, train.device (repeatable)")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Pretrain the hybrid (all but its classifier) on the embedded PUBLIC corpus (tissue types + nuclear morphometry): the coordinator's step, before any hospital trains."""
    from common.config import RunConfig, parse_assignments
    from common.errors import ConfigError

    try:
        cfg = RunConfig().override(parse_assignments(set_ or []))
        if out.suffix != ".safetensors":
            raise ConfigError(f"--out must name a .safetensors file (got {out})")
        if out.exists() and not force:
            raise ConfigError(f"--out {out} exists (pass --force to overwrite)")
        if cfg.model.architecture != "hybrid":
            raise ConfigError(f"pretraining is for the hybrid (got model.architecture={cfg.model.architecture})")
    except ConfigError as err:
        _fail(err, 2)
    from common.pretrain import pretrain as run_pretraining

    result = run_pretraining(cfg, out, log=lambda line: console.print(f"[server] {line}", highlight=False))
    console.print(f"use it with --set model.pretrained-path={result.path} (e.g. model.trainable=head)", highlight=False)


@app.command()
def start(
    config: Annotated[Path, typer.Option(help="federation.toml: [server] settings and the [run.*] histofed config")],
    insecure: Annotated[bool, typer.Option(help="no TLS and no node authentication: local tests only")] = False,
    resume: Annotated[bool, typer.Option(help="continue the run in [server] run-dir from its last checkpoint")] = False,
    report: Annotated[bool, typer.Option(help="write the HTML report at the end (as flower-sim does)")] = True,
) -> None:
    """Start the SuperLink (TLS + node authentication), register site keys, run histofed; exit 1 if the run failed."""
    import signal

    from common.errors import ConfigError
    from common.rundir import RunDirectory
    from server.deploy import load_federation, start_federation
    from server.launch import FlowerRunError
    from server.tracking import preflight

    def _interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    say = lambda line: console.print(escape(f"[server] {line}"), highlight=False, soft_wrap=True)  # noqa: E731
    fed = None
    try:
        fed = load_federation(config)
        preflight(fed.run)
        if len(fed.run.federation.training_sites) == 1:
            err_console.print("[bold yellow]WARNING: ONE site: nothing is shared between hospitals[/bold yellow]")
        if insecure:
            err_console.print("[bold yellow]WARNING: --insecure: no TLS, no node authentication; "
                              "model updates travel in clear text and any machine can join[/bold yellow]")
        status = start_federation(fed, insecure=insecure, resume=resume, say=say)
    except ConfigError as err:
        _fail(err, 2)
    except FlowerRunError as err:
        _fail(err, 1)
    except KeyboardInterrupt:
        if fed is not None:
            RunDirectory(Path(fed.server.run_dir)).mark_interrupted()
        err_console.print("interrupted: SuperLink and run stopped (status: interrupted); resume with --resume")
        raise typer.Exit(130) from None
    if status.get("status") != "completed":
        err_console.print(f"[bold red]run failed:[/bold red] {escape(str(status.get('error', 'unknown error')))}", highlight=False)
        raise typer.Exit(1)
    if report:
        _write_report(Path(fed.server.run_dir), say)
    say(f"completed · run directory {fed.server.run_dir}")


@app.command()
def status(
    config: Annotated[Path, typer.Option(help="the federation.toml the server was started with")],
) -> None:
    """Sites connected now, round and phase, last global metrics, time per round and time left; exit 1 if no server runs."""
    from common.errors import ConfigError
    from server.deploy import load_federation
    from server.launch import FlowerRunError
    from server.status import federation_status, status_lines

    try:
        report = federation_status(load_federation(config))
    except ConfigError as err:
        _fail(err, 2)
    except FlowerRunError as err:
        _fail(err, 1)
    for line in status_lines(report):
        console.print(line, highlight=False)


def _write_report(run_dir: Path, say) -> None:
    """The report flower-sim writes (simulations/run_report.build_report), through `flower-sim report`: server/ never imports simulations/."""
    import subprocess
    import sys

    from common.rundir import RunDirectory

    tool = Path(sys.executable).parent / "flower-sim"
    try:
        done = subprocess.run([str(tool), "report", str(run_dir)], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        err_console.print(f"[yellow]warning:[/yellow] report not written: {err}", highlight=False)
        return
    if done.returncode != 0:  # a plotting problem must not turn a finished run into a failure
        err_console.print(f"[yellow]warning:[/yellow] report not written: {(done.stderr or done.stdout).strip()[-300:]}",
                          highlight=False)
        return
    say(f"report: {RunDirectory(run_dir).file(RunDirectory.REPORT_HTML)}")


def main() -> None:
    """Console-script entry point."""
    app()


def _fail(err: Exception, code: int) -> NoReturn:
    """One line naming the culprit on stderr, then exit with `code` (2: bad input, 1: the run failed)."""
    err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False)
    raise typer.Exit(code) from None
