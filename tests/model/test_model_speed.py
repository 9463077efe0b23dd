"""nam-tiny trains at CPU speed: one forward + backward at batch 8, sequence 256."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import megacpp


@pytest.mark.all_threads
def test_nam_tiny_forward_backward_time(seed):
    spec = megacpp.load_recipe("nam-tiny").model
    model = megacpp.build_model(spec)
    ids = torch.randint(0, spec.vocab_size, (8, 256))
    doc = (torch.arange(256) >= 100).long().expand(8, 256)  # packed rows, as training sees them
    default_threads = torch.get_num_threads()
    best = float("inf")
    # One thread (twice: the first call also pays one-off allocation costs),
    # then all cores once. When another process shares the cores, one thread
    # avoids intra-op barriers that then spin, and is the faster of the two.
    for threads, calls in ((1, 2), (default_threads, 1)):
        torch.set_num_threads(threads)
        times = []
        for _ in range(calls):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = model(ids, doc_ids=doc, return_hidden_only=True)
            loss = F.cross_entropy(F.linear(out.hidden, model.head_weight).flatten(0, 1), ids.flatten())
            loss.backward()
            times.append(time.perf_counter() - t0)
        print(f"nam-tiny fwd+bwd, batch 8 x 256, {threads} thread(s): "
              + ", ".join(f"{t:.2f} s" for t in times))
        assert torch.isfinite(loss)
        best = min(best, *times)
    torch.set_num_threads(default_threads)
    assert best < 30.0
