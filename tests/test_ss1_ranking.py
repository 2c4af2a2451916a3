"""Layer selection by measured sensitivity (structlin.ranking) and the `structlin sensitivity` CLI."""
import json

import pytest
import torch

import structlin
import structlin.methods.ss1 as ss1
from structlin import ranking
from structlin.sensitivity import TailRunner

from conftest import batches, tiny_llama


def test_rank_matches_direct_measurement_and_choose_respects_keep():
    model = tiny_llama()
    calib, val = batches(n=3, seed=1), batches(n=2, seed=7)
    r = ranking.rank(model, "ss1", {"r": 4}, calib, val, unit="block", progress=False)
    assert [u["unit"] for u in r["units"]] and len(r["units"]) == 2
    assert all(a["delta"] <= b["delta"] for a, b in zip(r["units"], r["units"][1:]))
    # the model is restored, and the measured delta equals compressing that block alone and evaluating
    assert not any(isinstance(m, ss1.SS1Linear) for m in model.modules())
    u = r["units"][-1]
    base = TailRunner(model, val, u["names"]).base
    m2 = tiny_llama()
    cfg = structlin.CompressConfig(method="ss1", keep=u["params"] / u["dense_params"] + 1e-6, targets=u["names"],
                                   options={"r": 4})
    structlin.compress(m2, cfg, calib=calib, progress=False)
    loss2 = TailRunner(m2, val, u["names"]).base
    assert abs((loss2 - base) - u["delta"]) < 1e-4 * max(1.0, abs(u["delta"]))
    # choose: least sensitive first, within the keep budget
    assert ranking.choose(r, 1.0) == []
    one = ranking.choose(r, 0.9)
    assert one == r["units"][0]["names"]
    assert set(ranking.choose(r, 0.01)) == {n for x in r["units"] for n in x["names"]}
    rep = ranking.compress_ranked(model, r, keep=0.9, calib=calib, progress=False)
    done = {n for n, m in model.named_modules() if isinstance(m, ss1.SS1Linear)}
    assert done == set(one) and all(m.spec.r == 4 for m in model.modules() if isinstance(m, ss1.SS1Linear))
    assert rep.achieved_keep <= 0.9


def test_rank_per_layer_and_cli(tmp_path, monkeypatch, capsys):
    model = tiny_llama()
    r = ranking.rank(model, "ss1", {"r": 2, "scheme": "table"}, batches(n=2), batches(n=1, seed=3),
                     unit="layer", progress=False)
    assert len(r["units"]) == 14 and all(len(u["names"]) == 1 for u in r["units"])
    out = ranking.save(r, tmp_path / "rk", title="tiny")
    assert (out / "sensitivity.png").stat().st_size > 0 and "| 1 |" in (out / "sensitivity.md").read_text()
    assert ranking.load(out)["units"] == json.loads(json.dumps(r))["units"]
    with pytest.raises(structlin.ConfigError, match="not a structlin sensitivity ranking"):
        (tmp_path / "bad.json").write_text("{}")
        ranking.load(tmp_path / "bad.json")


def test_cli_sensitivity_then_compress_with_ranking(tmp_path, monkeypatch, capsys):
    from structlin import cli, data

    class Tok:
        def save_pretrained(self, path):
            pass

    def fake_load(name, dtype="float32"):
        return tiny_llama(), Tok()

    monkeypatch.setattr(cli, "_load", fake_load)
    monkeypatch.setattr(data, "texts", lambda name, tok, n=64, seq_len=512, batch_size=1: batches(n=n, t=seq_len))
    monkeypatch.setattr(data, "text", lambda name: "")
    monkeypatch.setattr(data, "token_windows", lambda text, tok, n_tokens, seq_len: torch.randint(
        0, 96, (n_tokens // seq_len, seq_len), generator=torch.Generator().manual_seed(4)))
    out = tmp_path / "sens"
    assert cli.main(["sensitivity", "tiny", "--method", "ss1", "--r", "4", "--option", "bk=8", "--calib-n", "2", "--val-n", "2",
                     "--seq-len", "16", "--out", str(out)]) == 0
    r = ranking.load(out)
    assert r["options"] == {"r": 4, "bk": 8} and len(r["units"]) == 2 and (out / "sensitivity.png").is_file()
    assert "Sensitivity ranking" in capsys.readouterr().out
    saved = tmp_path / "c"
    assert cli.main(["compress", "tiny", "--ranking", str(out), "--keep", "0.7", "--calib-n", "2", "--seq-len", "16",
                     "--out", str(saved)]) == 0
    back = structlin.from_pretrained(saved)
    layers = [n for n, m in back.named_modules() if isinstance(m, ss1.SS1Linear)]
    assert set(layers) == set(r["units"][0]["names"])
