"""SCAFFOLD (Karimireddy et al. 2020, option II) without Flower: gradient correction, control-variate updates, the site's c_i on disk.

Client i receives the global model x and the server control variate c, takes K plain-SGD steps on
g(y) - c_i + c from y = x with learning rate eta, then sets c_i+ = c_i - c + (x - y)/(K eta) and replies
with y and dc_i = c_i+ - c_i. The server sets x <- x + eta_g * mean(y - x) and c <- c + |S|/N * mean(dc_i)
(means weighted by examples, as FedAvg's; with equal sites the paper's uniform mean).

Control variates exist for trainable parameters only; BatchNorm running statistics and counters have no
gradient and are averaged as FedAvg averages them. With FedBN (federation.local-norm) the site's own norm
layers carry no control variate either: they never join the global model. SCAFFOLD is defined for SGD,
so histofed requires train.optimizer=sgd with train.momentum=0 (eta = train.lr, K = optimizer steps).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from common.config import RunConfig
from common.datasets.splits import SiteSplit
from common.fedbn import norm_keys
from common.training import TrainResult, train_local

Tensors = dict[str, torch.Tensor]
STATE_VERSION = "1"


def control_keys(model: nn.Module, *, local_norm: bool = False) -> list[str]:
    """Names of the parameters that carry control variates (trainable ones; FedBN's local norm layers excluded)."""
    local = set(norm_keys(model)) if local_norm else set()
    return [name for name, p in model.named_parameters() if p.requires_grad and name not in local]


def check_controls(c: Mapping[str, torch.Tensor], model: nn.Module, keys: Sequence[str], what: str) -> None:
    """Raise ValueError naming the first key of c that is not a control key of the model, or has another shape."""
    params = dict(model.named_parameters())
    allowed = set(keys)
    for key, value in c.items():
        if key not in allowed:
            raise ValueError(f"{what}: '{key}' is not a trainable parameter of this model")
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"{what}: '{key}' has shape {tuple(value.shape)}, the model {tuple(params[key].shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{what}: '{key}' holds NaN/Inf")


def gradient_correction(
    model: nn.Module, c_global: Mapping[str, torch.Tensor], c_local: Mapping[str, torch.Tensor], keys: Sequence[str]
) -> Callable[[nn.Module], None]:
    """A train_local grad_correction hook: every control key's gradient g becomes g - c_i + c (missing c = 0)."""
    params = dict(model.named_parameters())
    shift = {}
    for key in keys:
        p = params[key]
        diff = torch.zeros_like(p, dtype=torch.float32)
        if key in c_global:
            diff += c_global[key].to(diff)
        if key in c_local:
            diff -= c_local[key].to(diff)
        shift[key] = diff.to(p.device, p.dtype)

    def apply(_: nn.Module) -> None:
        for key, diff in shift.items():
            p = params[key]
            if p.grad is None:  # unused in this forward pass: the corrected gradient is still c - c_i
                p.grad = diff.clone()
            else:
                p.grad.add_(diff)

    return apply


def client_control_update(
    c_local: Mapping[str, torch.Tensor], c_global: Mapping[str, torch.Tensor], x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor], *, steps: int, lr: float,
) -> tuple[Tensors, Tensors]:
    """Option II: c_i+ = c_i - c + (x - y)/(K eta) for every key of x; returns (c_i+, dc_i = c_i+ - c_i)."""
    if steps <= 0 or lr <= 0:
        raise ValueError(f"SCAFFOLD needs K > 0 local steps and a learning rate > 0 (got K={steps}, lr={lr:g})")
    new, delta = {}, {}
    for key, start in x.items():
        start = start.detach().float().cpu().contiguous()  # channels_last weights: plain layout on disk and wire
        own = c_local[key].float().cpu().contiguous() if key in c_local else torch.zeros(start.shape)
        glob = c_global[key].float().cpu().contiguous() if key in c_global else torch.zeros(start.shape)
        new[key] = own - glob + (start - y[key].detach().float().cpu().contiguous()) / (steps * lr)
        delta[key] = new[key] - own
    return new, delta


def weighted_mean(items: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Key-wise weighted mean (float64 accumulation, float32 result) over dicts with the same keys."""
    total = float(sum(weights))
    if not items or total <= 0:
        raise ValueError("a weighted mean needs at least one item with positive weight")
    return {key: sum(np.asarray(it[key], dtype=np.float64) * (w / total) for it, w in zip(items, weights)).astype(np.float32)
            for key in items[0]}


def server_update(
    x: Mapping[str, np.ndarray], mean_y: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray],
    mean_delta_c: Mapping[str, np.ndarray], *, server_lr: float, participation: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """x+ = x + eta_g (mean y - x) on control keys (other keys: mean y, as FedAvg); c+ = c + |S|/N mean dc."""
    new_x = dict(mean_y)
    if server_lr != 1.0:  # eta_g = 1 is exactly the averaged model
        for key in mean_delta_c:
            start = np.asarray(x[key], dtype=np.float64)
            new_x[key] = (start + server_lr * (np.asarray(mean_y[key], dtype=np.float64) - start)).astype(np.float32)
    new_c = {}
    for key, delta in mean_delta_c.items():
        base = np.asarray(c[key], dtype=np.float64) if key in c else 0.0
        new_c[key] = (base + participation * np.asarray(delta, dtype=np.float64)).astype(np.float32)
    return new_x, new_c


class ClientState:
    """A site's c_i on disk: written after every round it trains, read by the next process (one per message).

    The file keeps c_i from before and after its last round, with the federation's id and that round: a
    round run again (the server resumed from the checkpoint before it) starts from the c_i it used the first
    time; a file from another federation (same folder, new run) is ignored. Writes are atomic.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, *, federation: int, server_round: int) -> Tensors:
        """c_i to use in this round ({} = zeros: first round, or another federation's file)."""
        if not self.path.is_file():
            return {}
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
            saved_federation, saved_round = int(meta["federation"]), int(meta["round"])
        except Exception as err:  # noqa: BLE001 - any damage is reported the same way
            raise ValueError(f"SCAFFOLD state {self.path} is unreadable ({type(err).__name__}: {err})") from None
        if saved_federation != federation:
            return {}
        if saved_round > server_round:
            raise ValueError(f"SCAFFOLD state {self.path} is from round {saved_round}, after the server's round "
                             f"{server_round}: delete it or resume the server from a later checkpoint")
        which = "before/" if saved_round == server_round else "after/"
        return {key.removeprefix(which): t for key, t in tensors.items() if key.startswith(which)}

    def save(self, *, federation: int, server_round: int, before: Mapping[str, torch.Tensor],
             after: Mapping[str, torch.Tensor]) -> None:
        """Write c_i before and after this round (zeros where `before` lacks a key)."""
        tensors = {f"after/{k}": v.detach().float().cpu().contiguous() for k, v in after.items()}
        tensors.update({f"before/{k}": (before[k].detach().float().cpu().contiguous() if k in before
                                        else torch.zeros(v.shape)) for k, v in after.items()})
        meta = {"federation": str(federation), "round": str(server_round), "version": STATE_VERSION}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(self.path)


def train_scaffold(
    model: nn.Module, data: SiteSplit, cfg: RunConfig, device: torch.device, *, seed: int,
    c_global: Mapping[str, torch.Tensor], state: ClientState, federation: int, server_round: int,
) -> tuple[TrainResult, Tensors]:
    """One site's SCAFFOLD round: corrected local SGD from the model it holds (x), c_i updated on disk; returns dc_i."""
    keys = control_keys(model, local_norm=cfg.federation.local_norm)
    check_controls(c_global, model, keys, "server control variate")
    c_local = state.load(federation=federation, server_round=server_round)
    check_controls(c_local, model, keys, f"SCAFFOLD state {state.path}")
    params = dict(model.named_parameters())
    x = {k: params[k].detach().clone() for k in keys}
    result = train_local(model, data, cfg.train, device, seed=seed,
                         grad_correction=gradient_correction(model, c_global, c_local, keys))
    new, delta = client_control_update(c_local, c_global, x, {k: params[k] for k in keys},
                                       steps=result.steps, lr=cfg.train.lr)
    state.save(federation=federation, server_round=server_round, before=c_local, after=new)
    return result, delta
