"""Flower ClientApp: unpack a message, call common/ to train or evaluate on this site's data, pack the reply."""

from __future__ import annotations

import functools

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp import mod as flwr_mods
from flwr.clientapp.typing import ClientAppCallable
from torch import nn

from common import protocol as P
from common.config import ModelConfig, PrivacyConfig, RunConfig
from common.datasets.registry import load_site
from common.fedbn import keep_local_norm, local_norm_path, restore_local_norm
from common.finetune import evaluate_site as evaluate_split, train_finetune
from common.model import build_model_for
from common.privacy.ledger import ledger_path
from common.privacy.modes import privacy_mode
from common.privacy.monitor import DECLINED, encode_metrics
from common.seeds import site_seed
from common.trainable import update_keys
from common.training import prepare, select_device, train_local
from common.weights import load_weights
from client.site import Site, node_view

app = ClientApp()


@functools.lru_cache(maxsize=1)
def _architecture(cfg: ModelConfig, privacy: PrivacyConfig) -> nn.Module:
    """Build once per process (the DP-compatible model when privacy is on); messages overwrite all weights by key."""
    return build_model_for(cfg, privacy, load_pretrained=False)


def _central_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping mod named by the privacy-mode table, applied only when the run's mode has one."""
    spec = privacy_mode(str(context.run_config.get("privacy.mode", "off")))
    mod = getattr(flwr_mods, spec.client_mod) if spec.client_mod else None
    if mod is None:
        return call_next(msg, context)
    frozen = msg.content.array_records.get(P.FROZEN)
    if frozen is None:
        return mod(msg, context, call_next)
    del msg.content[P.FROZEN]  # Flower's mods accept one ArrayRecord: they clip the trainable part, the frozen one waits

    def with_frozen(inner: Message, ctx: Context) -> Message:
        inner.content[P.FROZEN] = frozen
        return call_next(inner, ctx)

    return mod(msg, context, with_frozen)


def _received(msg: Message) -> dict[str, torch.Tensor]:
    """The global model as sent: its trainable part, and the frozen part in its own record (fine-tuning recipes)."""
    state = msg.content[P.ARRAYS].to_torch_state_dict()
    if P.FROZEN in msg.content.array_records:
        state.update(msg.content[P.FROZEN].to_torch_state_dict())
    return state


def _setup(msg: Message, context: Context) -> tuple[RunConfig, Site, nn.Module, torch.device]:
    cfg, site = node_view(RunConfig.from_flat(context.run_config), context.node_config)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = select_device(cfg.train.device)
    model = _architecture(cfg.model, cfg.privacy).cpu()
    load_weights(model, _received(msg))
    if cfg.federation.local_norm:  # FedBN: this site's own normalization layers over the global ones
        restore_local_norm(model, local_norm_path(cfg, site.name, context.node_config))
    return cfg, site, prepare(model, device, channels_last=cfg.train.channels_last), device


def _reply(msg: Message, site: Site, metrics: dict, arrays: ArrayRecord | None = None, declined: str = "") -> Message:
    about = {P.SITE_NAME: site.name, P.DATA_KIND: site.data_kind, **({DECLINED: declined} if declined else {})}
    content = RecordDict({P.METRICS: MetricRecord(metrics), P.SITE: ConfigRecord(about)})
    if arrays is not None:
        content[P.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


@app.train(mods=[_central_clipping])
def train(msg: Message, context: Context) -> Message:
    """Local epochs on the site's training split (DP-SGD within its budget when privacy.mode=local); reply with weights, loss, counts."""
    cfg, site, model, device = _setup(msg, context)
    config = msg.content[P.CONFIG]
    server_round = int(config.get(P.SERVER_ROUND, 0))  # the run's true round (the server numbers across resumes)
    data = load_site(cfg, site.index, "train")
    seed = site_seed(cfg.train.seed, server_round, site.index)
    if cfg.privacy.spec.local:  # a site whose budget is spent declines; the server drops it or stops
        from common.privacy.trainer import train_private  # Opacus is imported only for DP-SGD sites

        private = train_private(model, data, cfg, device, seed=seed, site=site.name,
                                ledger_file=ledger_path(cfg, site.name, context.node_config),
                                server_round=server_round, run_id=context.run_id)
        if private.declined:
            return _reply(msg, site, {P.NUM_EXAMPLES: 0, **encode_metrics(private)}, declined=private.declined)
        result, extra = private.train, encode_metrics(private)
    else:
        mu = float(config.get(P.PROXIMAL_MU, 0.0))  # sent by Flower's FedProx
        if cfg.model.trainable != "all":  # the fine-tuning recipe (frozen prefix, cached features)
            result = train_finetune(model, data, cfg, device, seed=seed, site=site.name, proximal_mu=mu)
        else:
            result = train_local(model, data, cfg.train, device, seed=seed, proximal_mu=mu)
        extra = {}
    metrics = {P.TRAIN_LOSS: result.loss, P.NUM_EXAMPLES: result.num_examples, P.TRAIN_SECONDS: result.seconds,
               P.SKIPPED: result.skipped, **extra}
    wire = getattr(torch, cfg.federation.transfer_dtype)  # float16 halves the reply; integers keep their dtype
    state = {k: (v.detach().to(wire) if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    if cfg.federation.local_norm:  # kept at the site; sent back as received, so never averaged
        state = keep_local_norm(model, local_norm_path(cfg, site.name, context.node_config), state, _received(msg))
    sent = update_keys(model, cfg.model.trainable)  # the frozen part is never sent back
    return _reply(msg, site, metrics, ArrayRecord({k: state[k] for k in sent}))


@app.evaluate()
def evaluate_site(msg: Message, context: Context) -> Message:
    """Loss, confusion counts and score histograms on the site's held-out test split."""
    cfg, site, model, device = _setup(msg, context)
    data = load_site(cfg, site.index, "test")
    result = evaluate_split(model, data, cfg, device, site=site.name)  # cached frozen features when the recipe has them
    return _reply(msg, site, P.encode_eval(result))
