"""Run the Flower app through Flower's simulation engine (`flwr run` on a local simulation connection) and clean up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.rundir import RunDirectory
from server.launch import flwr_executable, submit_and_wait, write_connection, write_run_config

CONNECTION = "histofed-sim"


@dataclass(frozen=True)
class SimulationPlan:
    """Everything one `flwr run` needs: validated config, where to write, resources per site."""

    cfg: RunConfig
    run_dir: Path
    app_dir: Path
    cpus_per_site: int = 1
    ray_cpus: int = 1
    gpus_per_site: float = 0.0
    timeout_s: float = 3600.0
    ray_address: str = ""  # an existing Ray cluster to join ('' = Flower starts a local one)

    @property
    def run(self) -> RunDirectory:
        """The run directory the ServerApp writes."""
        return RunDirectory(self.run_dir)


def run_simulation(plan: SimulationPlan, on_poll: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Submit the run to a local simulation SuperLink, wait, stop every Flower process started; return the status."""
    run = plan.run
    write_connection(run.flwr_home, CONNECTION, {"address": ":local:"})
    config_path = write_run_config(plan.cfg, run)
    # Flower's Ray backend calls ray.init() with these init args; ray.init joins the cluster named by
    # RAY_ADDRESS (Flower 1.42's federation config has no address key), which refuses num-cpus.
    init_args = "" if plan.ray_address else f" init-args-num-cpus={plan.ray_cpus}"
    cmd = [
        flwr_executable(), "run", str(plan.app_dir), CONNECTION, "--stream", "--run-config", str(config_path),
        "--federation-config",
        f"num-supernodes={len(plan.cfg.federation.training_sites)} "
        f"client-resources-num-cpus={plan.cpus_per_site} client-resources-num-gpus={plan.gpus_per_site:g}"
        + init_args,
    ]
    env = {"RAY_ADDRESS": plan.ray_address} if plan.ray_address else {}
    return submit_and_wait(cmd, run, timeout_s=plan.timeout_s, on_poll=on_poll, env=env)
