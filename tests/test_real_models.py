"""Real-model checks on the offline SmolLM2-135M (DESIGN §5). Slow: they run in CI too."""
import copy

import pytest

import structlin as sl
from structlin import calibrate, data, targeting
from structlin.demo import pick_dtype
from structlin.eval import perplexity


@pytest.fixture(scope="module")
def smollm2():
    return data.load_model("smollm2", dtype=pick_dtype("auto"))  # bf16 where the CPU has AMX


@pytest.mark.slow
def test_whiten_beats_svd_on_heldout_perplexity(smollm2):
    dense, tok = smollm2
    calib = data.texts("austen-calib", tok, n=4, seq_len=512)
    held_out = data.token_windows(data.text("pride-and-prejudice"), tok, 1024, 512)
    stats = calibrate.collect(dense, targeting.select(dense), calib, {"gram"}, progress=False)
    ppl = {"dense": perplexity(dense, held_out).ppl}
    for variant in ("svd", "whiten"):
        model = copy.deepcopy(dense)
        report = sl.compress(model, sl.CompressConfig(keep=0.8, options={"variant": variant}), stats=stats,
                             progress=False)
        assert report.achieved_keep <= 0.8 and len(report.rows) == 210
        ppl[variant] = perplexity(model, held_out).ppl
    print(ppl)
    assert ppl["dense"] < ppl["whiten"] < ppl["svd"]
    assert ppl["whiten"] < 0.01 * ppl["svd"]  # plain SVD collapses on this small model; whitening does not
