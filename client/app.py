"""Flower ClientApp: unpack a message, call common/ to train or evaluate on this site's data, pack the reply."""

from __future__ import annotations

import functools

import torch
from torch import nn
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import protocol as P
from common.config import ModelConfig, RunConfig
from common.datasets import get_dataset
from common.model import build_model
from common.training import evaluate, prepare, select_device, train_local
from common.weights import load_weights
from client.site import Site, node_view

app = ClientApp()


@functools.lru_cache(maxsize=1)
def _architecture(cfg: ModelConfig) -> nn.Module:
    """Build once per process; every message overwrites all weights strictly by key."""
    return build_model(cfg, load_pretrained=False)


def _setup(msg: Message, context: Context) -> tuple[RunConfig, Site, nn.Module, torch.device]:
    cfg, site = node_view(RunConfig.from_flat(context.run_config), context.node_config)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = select_device(cfg.train.device)
    model = _architecture(cfg.model).cpu()
    load_weights(model, msg.content[P.ARRAYS].to_torch_state_dict())
    return cfg, site, prepare(model, device, channels_last=cfg.train.channels_last), device


def _reply(msg: Message, site: Site, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({P.METRICS: MetricRecord(metrics), P.SITE: ConfigRecord({P.SITE_NAME: site.name})})
    if arrays is not None:
        content[P.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs on the site's training split; reply with weights, loss and example count."""
    cfg, site, model, device = _setup(msg, context)
    server_round = int(msg.content[P.CONFIG].get(P.SERVER_ROUND, 0))
    data = get_dataset(cfg.data.dataset).load_split(cfg, site.index, "train")
    seed = cfg.train.seed * 1_000_003 + server_round * 1009 + site.index
    result = train_local(model, data, cfg.train, device, seed=seed)
    metrics = {P.TRAIN_LOSS: result.loss, P.NUM_EXAMPLES: result.num_examples, P.TRAIN_SECONDS: result.seconds,
               P.SKIPPED: result.skipped}
    wire = getattr(torch, cfg.federation.transfer_dtype)  # float16 halves the reply; integers keep their dtype
    state = {k: (v.detach().to(wire) if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    return _reply(msg, site, metrics, ArrayRecord(state))


@app.evaluate()
def evaluate_site(msg: Message, context: Context) -> Message:
    """Loss, confusion counts and score histograms on the site's held-out test split."""
    cfg, site, model, device = _setup(msg, context)
    data = get_dataset(cfg.data.dataset).load_split(cfg, site.index, "test")
    result = evaluate(model, data, device, amp=cfg.train.amp, num_workers=cfg.train.num_workers)
    return _reply(msg, site, P.encode_eval(result))
