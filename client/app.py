"""Flower ClientApp: unpack a message, call common/ to train or evaluate on this site's data, pack the reply."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from common import protocol as P
from common.config import ModelConfig, PrivacyConfig, RunConfig
from common.datasets import get_dataset
from common.datasets.images import BadImageError
from common.privacy import DECLINED, build_model_for, encode_metrics, ledger_path, train_private
from common.privacy.local_norm import keep_local_norm, local_norm_path, restore_local_norm
from common.training import evaluate, prepare, select_device, train_local
from common.weights import load_weights
from client.site import Site, SiteRefused, node_view

app = ClientApp()


@functools.lru_cache(maxsize=1)
def _architecture(cfg: ModelConfig, privacy: PrivacyConfig) -> nn.Module:
    """Build once per process (the DP-compatible model when privacy is on); messages overwrite all weights by key."""
    return build_model_for(cfg, privacy, load_pretrained=False)


def _central_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping mod, applied only when the run uses a client-side central-DP wrapper."""
    mode = str(context.run_config.get("privacy.mode", "off"))
    mod = {"central-fixed-client": fixedclipping_mod, "central-adaptive-client": adaptiveclipping_mod}.get(mode)
    return mod(msg, context, call_next) if mod else call_next(msg, context)


def _setup(msg: Message, context: Context) -> tuple[RunConfig, Site, nn.Module, torch.device]:
    cfg, site = node_view(RunConfig.from_flat(context.run_config), context.node_config)
    expected = msg.content.config_records.get(P.CONFIG, ConfigRecord()).get(P.EXPECTED_SITE)
    if expected is not None and expected != site.name:  # the server binds sites to keys: a mismatch is refused
        raise SiteRefused(f"{P.REFUSED} its key is registered for site '{expected}' but it calls itself "
                          f"'{site.name}' (flower-client start --site)")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = select_device(cfg.train.device)
    model = _architecture(cfg.model, cfg.privacy).cpu()
    load_weights(model, msg.content[P.ARRAYS].to_torch_state_dict())
    if cfg.privacy.local_norm:  # FedBN: this site's own normalization layers over the global ones
        restore_local_norm(model, local_norm_path(cfg, site.name, context.node_config))
    return cfg, site, prepare(model, device, channels_last=cfg.train.channels_last), device


def _reply(msg: Message, site: Site, metrics: dict, arrays: ArrayRecord | None = None, declined: str = "") -> Message:
    about = {P.SITE_NAME: site.name, P.DATA_KIND: site.data_kind, **({DECLINED: declined} if declined else {})}
    content = RecordDict({P.METRICS: MetricRecord(metrics), P.SITE: ConfigRecord(about)})
    if arrays is not None:
        content[P.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


@contextlib.contextmanager
def _strict(cfg: RunConfig, site: Site) -> Iterator[None]:
    """With data.strict=true an unreadable image fails the message, marked so the server fails the run."""
    try:
        yield
    except BadImageError as err:
        if cfg.data.strict:
            raise BadImageError(f"site {site.name}: {err} {P.STRICT_FAILURE}") from err
        raise


@app.train(mods=[_central_clipping])
def train(msg: Message, context: Context) -> Message:
    """Local epochs on the site's training split (DP-SGD within its budget when privacy.mode=local); reply with weights, loss, counts."""
    cfg, site, model, device = _setup(msg, context)
    with _strict(cfg, site):
        return _train(msg, context, cfg, site, model, device)


def _train(msg: Message, context: Context, cfg: RunConfig, site: Site, model: nn.Module, device: torch.device) -> Message:
    config = msg.content[P.CONFIG]
    server_round = int(config.get(P.SERVER_ROUND, 0)) + int(config.get(P.ROUND_OFFSET, 0))
    data = get_dataset(cfg.data.dataset).load_split(cfg, site.index, "train")
    seed = cfg.train.seed * 1_000_003 + server_round * 1009 + site.index
    if cfg.privacy.mode == "local":  # a site whose budget is spent declines; the server drops it or stops
        private = train_private(model=model, data=data, cfg=cfg, device=device, seed=seed, site=site.name,
                                ledger_file=ledger_path(cfg, site.name, context.node_config),
                                server_round=server_round, run_id=context.run_id)
        if private.declined:
            return _reply(msg, site, {P.NUM_EXAMPLES: 0, **encode_metrics(private)}, declined=private.declined)
        result, extra = private.train, encode_metrics(private)
    else:
        mu = float(config.get(P.PROXIMAL_MU, 0.0))  # sent by Flower's FedProx
        result, extra = train_local(model, data, cfg.train, device, seed=seed, proximal_mu=mu), {}
    metrics = {P.TRAIN_LOSS: result.loss, P.NUM_EXAMPLES: result.num_examples, P.TRAIN_SECONDS: result.seconds,
               P.SKIPPED: result.skipped, **extra}
    wire = getattr(torch, cfg.federation.transfer_dtype)  # float16 halves the reply; integers keep their dtype
    state = {k: (v.detach().to(wire) if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    if cfg.privacy.local_norm:  # kept at the site; sent back as received, so never averaged
        state = keep_local_norm(model, local_norm_path(cfg, site.name, context.node_config), state,
                                msg.content[P.ARRAYS].to_torch_state_dict())
    return _reply(msg, site, metrics, ArrayRecord(state))


@app.evaluate()
def evaluate_site(msg: Message, context: Context) -> Message:
    """Loss, confusion counts and score histograms on the site's held-out test split."""
    cfg, site, model, device = _setup(msg, context)
    dataset = get_dataset(cfg.data.dataset)
    with _strict(cfg, site):
        data = dataset.load_split(cfg, site.index, "test")
        result = evaluate(model, data, device, amp=cfg.train.amp, num_workers=cfg.train.num_workers,
                          channels_last=cfg.train.channels_last)
        metrics = P.encode_eval(result)
        config = msg.content.config_records.get(P.CONFIG, ConfigRecord())
        if int(config.get(P.SERVER_ROUND, 0)) <= 1:  # joining (round 0, or 1 after a resume): declare the train size
            metrics[P.TRAIN_EXAMPLES] = len(dataset.load_split(cfg, site.index, "train"))
    return _reply(msg, site, metrics)
