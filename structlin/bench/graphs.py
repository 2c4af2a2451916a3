"""CUDA-graph capture shared by `structlin bench` and the benchmark scripts."""
from __future__ import annotations

import torch


def capture(fn, warm: int = 3):
    """Run `fn` `warm` times on a side stream (kernels compile, the caching allocator settles), then capture
    one call in a CUDA graph. Returns (graph, the captured call's output); replaying the graph reruns `fn` on
    the same buffers."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out
