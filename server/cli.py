"""`flower-server`: the coordinator's command line (keys: the consortium's TLS and SuperNode-auth kit)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(help="histofed coordinator commands.", add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
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
    from server.keys import make_kit

    try:
        kit = make_kit(out, hosts=[h.strip() for h in hosts.split(",") if h.strip()],
                       sites=[s.strip() for s in sites.split(",") if s.strip()], days=days)
    except (ValueError, FileExistsError, OSError) as err:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"CA certificate (give to every site): {kit.ca_cert}", highlight=False)
    console.print(f"server certificate / key (server only): {kit.server_cert} / {kit.server_key}", highlight=False)
    for site, (private, public) in kit.site_keys.items():
        console.print(f"{site}: private key {private} (give to that site only), public key {public} (server)",
                      highlight=False)
    console.print(f"keep {out / 'ca.key'} offline: it signs server certificates", highlight=False)


@app.command()
def start(
    config: Annotated[Path, typer.Option(help="federation.toml: [server] settings and the [run.*] histofed config")],
    insecure: Annotated[bool, typer.Option(help="no TLS and no node authentication: local tests only")] = False,
    resume: Annotated[bool, typer.Option(help="continue the run in [server] run-dir from its last checkpoint")] = False,
) -> None:
    """Start the SuperLink (TLS + node authentication), register site keys, run histofed; exit 1 if the run failed."""
    import signal

    from common.errors import ConfigError
    from server.deploy import load_federation, start_federation
    from server.launch import FlowerRunError
    from server.tracking import preflight

    def _interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    say = lambda line: console.print(f"[server] {line}", highlight=False)  # noqa: E731
    try:
        fed = load_federation(config)
        preflight(fed.run)
        if insecure:
            err_console.print("[bold yellow]WARNING: --insecure: no TLS, no node authentication; "
                              "model updates travel in clear text and any machine can join[/bold yellow]")
        status = start_federation(fed, insecure=insecure, resume=resume, say=say)
    except ConfigError as err:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False)
        raise typer.Exit(2) from None
    except FlowerRunError as err:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: SuperLink and run stopped; resume with --resume")
        raise typer.Exit(130) from None
    if status.get("status") != "completed":
        err_console.print(f"[bold red]run failed:[/bold red] {status.get('error', 'unknown error')}", highlight=False)
        raise typer.Exit(1)
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
        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False)
        raise typer.Exit(2) from None
    except FlowerRunError as err:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    for line in status_lines(report):
        console.print(line, highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()
