"""nam-tiny trains at CPU speed: one forward + backward at batch 8, sequence 256."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import megacpp


def test_nam_tiny_forward_backward_time(seed):
    spec = megacpp.load_recipe("nam-tiny").model
    model = megacpp.build_model(spec)
    ids = torch.randint(0, spec.vocab_size, (8, 256))
    doc = (torch.arange(256) >= 100).long().expand(8, 256)  # packed rows, as training sees them
    times = []
    for _ in range(2):   # the first call also pays one-off allocation costs
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(ids, doc_ids=doc, return_hidden_only=True)
        loss = F.cross_entropy(F.linear(out.hidden, model.head_weight).flatten(0, 1), ids.flatten())
        loss.backward()
        times.append(time.perf_counter() - t0)
    print(f"nam-tiny fwd+bwd, batch 8 x 256, {torch.get_num_threads()} threads: "
          f"first {times[0]:.2f} s, second {times[1]:.2f} s")
    assert torch.isfinite(loss)
    assert min(times) < 30.0
