"""The same inputs and seed give bit-identical compressed weights on CPU, across processes."""
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_llama, batches
import structlin as sl
for method in sl.available_methods():
    m = tiny_llama()
    sl.compress(m, sl.CompressConfig(method=method, keep=0.5, seed=3), calib=batches(n=2), progress=False)
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode()); h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    print(method, h.hexdigest())
"""


def run():
    code = SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_compression_is_bit_identical_across_runs():
    import structlin

    first, second = run(), run()
    assert [line.split()[0] for line in first] == structlin.available_methods()
    assert first == second
