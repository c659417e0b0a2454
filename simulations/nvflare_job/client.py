"""NVFlare Client API training script of the peer benchmark: per round, load the global model, 1 local epoch, send it back.

Each site trains on 32 random 32 x 32 images (batch 16) and evaluates on 16, like histofed's
`synthetic-tiny` (SYNTHETIC data); it appends when it received and sent each round's model to
--log (JSON lines), so that the driver can separate NVFlare's overhead from the compute.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import nvflare.client as flare
from tinynet import TinyNet


def main() -> None:
    """Loop over the rounds NVFlare sends."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    flare.init()
    site = flare.get_site_name()
    gen = torch.Generator().manual_seed(sum(map(ord, site)))
    x, y = torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 2, (32,), generator=gen)
    xt, yt = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    net = TinyNet()
    while flare.is_running():
        model = flare.receive()
        received = time.time()
        net.load_state_dict(model.params)
        net.eval()
        with torch.no_grad():
            accuracy = float((net(xt).argmax(1) == yt).float().mean())
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for i in range(0, len(x), 16):
            opt.zero_grad()
            F.cross_entropy(net(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
        computed = time.time()
        flare.send(flare.FLModel(params=net.state_dict(), metrics={"accuracy": accuracy},
                                 meta={"NUM_STEPS_CURRENT_ROUND": 2}))
        with open(args.log, "a") as fh:
            fh.write(json.dumps({"site": site, "round": model.current_round, "received": received,
                                 "computed": computed, "sent": time.time()}) + "\n")


if __name__ == "__main__":
    main()
