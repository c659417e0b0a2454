"""Flower ClientApp: unpack a message, call common/ to train or evaluate on this site's data, pack the reply."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp import mod as flwr_mods
from flwr.clientapp.typing import ClientAppCallable
from torch import nn

from common import protocol as P
from common.config import ModelConfig, PrivacyConfig, RunConfig
from common.datasets.images import BadImageError
from common.datasets.registry import get_dataset, load_site
from common.fedbn import keep_local_norm, local_norm_path, restore_local_norm
from common.finetune import evaluate_site as evaluate_split, train_finetune
from common.model import build_model_for
from common.privacy.ledger import ledger_path
from common.privacy.modes import privacy_mode
from common.privacy.monitor import DECLINED, encode_metrics
from common.scaffold import ClientState, train_scaffold
from common.seeds import site_seed
from common.site_state import state_path
from common.trainable import update_keys
from common.training import prepare, select_device, train_local
from common.weights import load_weights
from client import timing
from client.site import Site, SiteRefused, node_view

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


def _setup(msg: Message, context: Context, *, own_norm: bool = True) -> tuple[RunConfig, Site, nn.Module, torch.device]:
    cfg, site = node_view(RunConfig.from_flat(context.run_config), context.node_config)
    expected = msg.content.config_records.get(P.CONFIG, ConfigRecord()).get(P.EXPECTED_SITE)
    if expected is not None and expected != site.name:  # the server binds sites to keys: a mismatch is refused
        raise SiteRefused(f"{P.REFUSED} its key is registered for site '{expected}' but it calls itself "
                          f"'{site.name}' (flower-client start --site)")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = select_device(cfg.train.device)
    model = _architecture(cfg.model, cfg.privacy).cpu()
    load_weights(model, _received(msg))
    if cfg.federation.local_norm and own_norm:  # FedBN: this site's own normalization layers over the global ones
        restore_local_norm(model, local_norm_path(cfg, site.name, context.node_config))
    return cfg, site, prepare(model, device, channels_last=cfg.train.channels_last), device


@contextlib.contextmanager
def _strict(cfg: RunConfig, site: Site) -> Iterator[None]:
    """With data.strict=true an unreadable image fails the message, marked so the server fails the run."""
    try:
        yield
    except BadImageError as err:
        if cfg.data.strict:
            raise BadImageError(f"site {site.name}: {err} {P.STRICT_FAILURE}") from err
        raise


def _reply(msg: Message, site: Site, metrics: dict, arrays: ArrayRecord | None = None, declined: str = "",
           records: dict[str, ArrayRecord] | None = None, evaluation: dict | None = None) -> Message:
    about = {P.SITE_NAME: site.name, P.DATA_KIND: site.data_kind, **({DECLINED: declined} if declined else {})}
    content = RecordDict({P.METRICS: MetricRecord(metrics), P.SITE: ConfigRecord(about),
                          P.TIMING: ConfigRecord(timing.take())})
    if arrays is not None:
        content[P.ARRAYS] = arrays
    for key, record in (records or {}).items():
        content[key] = record
    if evaluation is not None:  # federation.evaluate-with-train: the received model's evaluation rides along
        content[P.EVALUATION] = MetricRecord(evaluation)
    return Message(content=content, reply_to=msg)


@app.train(mods=[_central_clipping])
def train(msg: Message, context: Context) -> Message:
    """Local epochs on the site's training split (DP-SGD within its budget when privacy.mode=local); reply with weights, loss, counts.

    With the config flag `evaluate-received` (federation.evaluate-with-train) the site first evaluates
    the model it received exactly as `evaluate_site` would, and the reply carries that evaluation too.
    """
    config = msg.content[P.CONFIG]
    evaluation = _evaluation(msg, context)[1] if config.get(P.EVALUATE_RECEIVED, False) else None
    cfg, site, model, device = _setup(msg, context)
    with _strict(cfg, site):
        return _train(msg, context, cfg, site, model, device, evaluation)


def _train(msg: Message, context: Context, cfg: RunConfig, site: Site, model: nn.Module, device: torch.device,
           evaluation: dict | None) -> Message:
    config = msg.content[P.CONFIG]
    server_round = int(config.get(P.SERVER_ROUND, 0))  # the run's true round (the server numbers across resumes)
    data = load_site(cfg, site.index, "train")
    seed = site_seed(cfg.train.seed, server_round, site.index)
    records: dict[str, ArrayRecord] = {}
    timing.stamp(timing.READY)
    if cfg.privacy.spec.local:  # a site whose budget is spent declines; the server drops it or stops
        from common.privacy.trainer import train_private  # Opacus is imported only for DP-SGD sites

        private = train_private(model, data, cfg, device, seed=seed, site=site.name,
                                ledger_file=ledger_path(cfg, site.name, context.node_config),
                                server_round=server_round, run_id=context.run_id)
        if private.declined:
            return _reply(msg, site, {P.NUM_EXAMPLES: 0, **encode_metrics(private)}, declined=private.declined,
                          evaluation=evaluation)
        result, extra = private.train, encode_metrics(private)
    elif P.SCAFFOLD_C in msg.content.array_records:  # SCAFFOLD: corrected SGD; c_i stays on this site's disk
        c_i = ClientState(state_path(cfg, site.name, "scaffold", context.node_config))
        result, delta = train_scaffold(model, data, cfg, device, seed=seed, state=c_i, server_round=server_round,
                                       c_global=msg.content[P.SCAFFOLD_C].to_torch_state_dict(),
                                       federation=int(config[P.SCAFFOLD_FEDERATION]))
        extra, records = {}, {P.SCAFFOLD_DELTA: ArrayRecord(delta)}
    else:
        mu = float(config.get(P.PROXIMAL_MU, 0.0))  # sent by Flower's FedProx
        if cfg.model.trainable != "all":  # the fine-tuning recipe (frozen prefix, cached features)
            result = train_finetune(model, data, cfg, device, seed=seed, site=site.name, proximal_mu=mu)
        else:
            result = train_local(model, data, cfg.train, device, seed=seed, proximal_mu=mu)
        extra = {}
    timing.stamp(timing.COMPUTED)
    metrics = {P.TRAIN_LOSS: result.loss, P.NUM_EXAMPLES: result.num_examples, P.TRAIN_SECONDS: result.seconds,
               P.SKIPPED: result.skipped, **extra}
    wire = getattr(torch, cfg.federation.transfer_dtype)  # float16 halves the reply; integers keep their dtype
    state = {k: (v.detach().to(wire) if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    if cfg.federation.local_norm:  # kept at the site; sent back as received, so never averaged
        state = keep_local_norm(model, local_norm_path(cfg, site.name, context.node_config), state, _received(msg))
    sent = update_keys(model, cfg.model.trainable)  # the frozen part is never sent back
    return _reply(msg, site, metrics, ArrayRecord({k: state[k] for k in sent}), records=records, evaluation=evaluation)


@app.evaluate()
def evaluate_site(msg: Message, context: Context) -> Message:
    """Loss, confusion counts and logit histograms on the site's test split: global model (+ personalised with FedBN)."""
    site, metrics = _evaluation(msg, context)
    timing.stamp(timing.COMPUTED)
    return _reply(msg, site, metrics)


def _evaluation(msg: Message, context: Context) -> tuple[Site, dict]:
    """The evaluation of the message's model on this site's test split (evaluate_site's and evaluate-with-train's).

    With FedBN the same weights are also scored under this site's own norm layers (none yet: the global).
    Fine-tuning recipes evaluate through their cached frozen-prefix features when they have them.
    """
    cfg, site, model, device = _setup(msg, context, own_norm=False)
    with _strict(cfg, site):
        data = load_site(cfg, site.index, "test")
        timing.stamp(timing.READY)
        run = functools.partial(evaluate_split, data=data, cfg=cfg, device=device, site=site.name)
        result = run(model)
        metrics = P.encode_eval(result)
        if cfg.federation.local_norm:
            own = restore_local_norm(model, local_norm_path(cfg, site.name, context.node_config))
            metrics.update(P.encode_eval(run(model) if own else result, prefix=P.PERSONALISED))
        config = msg.content.config_records.get(P.CONFIG, ConfigRecord())
        if int(config.get(P.SERVER_ROUND, 0)) <= 1:  # joining (round 0, or 1 after a resume): declare the train size
            metrics[P.TRAIN_EXAMPLES] = len(get_dataset(cfg.data.dataset).load_split(cfg, site.index, "train"))
    timing.stamp(timing.EVALUATED)
    return site, metrics
