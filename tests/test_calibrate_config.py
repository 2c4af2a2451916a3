import pytest
import torch

import structlin as sl
from structlin import calibrate, targeting
from structlin.errors import CalibrationError, ConfigError

from conftest import batches, tiny_llama


def captured_inputs(model, data, name):
    """The rows entering `name`, captured directly, padding removed by hand."""
    rows = []
    mod = model.get_submodule(name)
    h = mod.register_forward_pre_hook(lambda m, a: rows.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in data:
            n = len(rows)
            model(**b)
            x = rows[n]
            rows[n] = x[b["attention_mask"].reshape(-1).bool()]
    h.remove()
    return torch.cat(rows).double()


def test_gram_is_token_weighted_and_excludes_padding():
    m = tiny_llama()
    data = batches(n=2, pad=True) + [{"input_ids": torch.randint(0, 96, (1, 3)),
                                      "attention_mask": torch.ones(1, 3, dtype=torch.long)}]
    targets = targeting.select(m)
    stats = calibrate.collect(m, targets, data, {"gram", "absmean"}, progress=False)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        x = captured_inputs(m, data, name)
        s = stats[name]
        assert s.tokens == x.shape[0] == 2 * 16 + 2 * 8 + 3 - 0  # one row half padded per batch
        assert torch.allclose(s.gram_mean(), x.T @ x / len(x), rtol=1e-10, atol=1e-12)
        assert torch.allclose(s.absmean(), x.abs().mean(0), rtol=1e-10)


def test_modules_reading_one_input_share_stats():
    m = tiny_llama()
    stats = calibrate.collect(m, targeting.select(m), batches(n=2), {"gram"}, progress=False)
    q, k, v = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v and q.modules[:3] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert stats["model.layers.0.mlp.gate_proj"] is stats["model.layers.0.mlp.up_proj"]
    assert stats["model.layers.0.self_attn.o_proj"] is not q


def test_calibration_errors_name_the_problem():
    m = tiny_llama()
    t = targeting.select(m)
    with pytest.raises(CalibrationError, match="empty"):
        calibrate.collect(m, t, [], {"gram"}, progress=False)
    with pytest.raises(CalibrationError, match="all padding"):
        calibrate.collect(m, t, [{"input_ids": torch.ones(1, 4, dtype=torch.long),
                                  "attention_mask": torch.zeros(1, 4, dtype=torch.long)}], {"gram"}, progress=False)
    with pytest.raises(CalibrationError, match="integer token ids"):
        calibrate.collect(m, t, [torch.ones(1, 4)], {"gram"}, progress=False)
    with pytest.raises(CalibrationError, match="is empty"):
        calibrate.collect(m, t, [torch.ones(1, 0, dtype=torch.long)], {"gram"}, progress=False)
    with pytest.raises(CalibrationError, match="float64 but the model is torch.float32"):
        calibrate.collect(m, t, [{"inputs_embeds": torch.randn(1, 4, 64, dtype=torch.float64)}], {"gram"},
                          progress=False)
    bad = torch.randn(1, 4, 64)
    bad[0, 2, 5] = float("inf")
    with pytest.raises(CalibrationError, match="'inputs_embeds' contains NaN or inf"):
        calibrate.collect(m, t, [{"inputs_embeds": bad}], {"gram"}, progress=False)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with pytest.raises(CalibrationError, match="the input tensor is torch.float16 but the model is torch.float32"):
        calibrate.collect(plain, {"0": plain[0]}, [torch.randn(3, 8).half()], {"gram"}, progress=False)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="model.layers.1.mlp.down_proj"):
        calibrate.collect(m, t, batches(n=1), {"gram"}, progress=False)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        sl.compress(tiny_llama(), sl.CompressConfig(keep=0.5, options={"variant": "whiten"}), progress=False)


def test_config_json_round_trip_and_validation():
    cfg = sl.CompressConfig(method="lowrank", keep=0.6, targets=["q_proj", "v_proj"], exclude=r".*\.0\..*",
                            layers=[3, 1], options={"variant": "asvd", "alpha": 1}, seed=7)
    back = sl.CompressConfig.from_json(cfg.to_json())
    assert back == cfg and back.layers == [1, 3] and back.method_options().alpha == 1.0
    with pytest.raises(ConfigError, match="unknown method 'svd'.*lowrank"):
        sl.CompressConfig(method="svd")
    for keep in (0, -0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ConfigError, match="keep must be a fraction in \\(0, 1\\]"):
            sl.CompressConfig(keep=keep)
    with pytest.raises(ConfigError, match="unknown option.*'rank'.*valid options: variant"):
        sl.CompressConfig(options={"rank": 4})
    with pytest.raises(ConfigError, match="variant.*one of \\['svd', 'asvd', 'whiten'\\].*'pca'"):
        sl.CompressConfig(options={"variant": "pca"})
    with pytest.raises(ConfigError, match="must be true or false"):
        sl.CompressConfig(options={"sequential": "yes"})
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        sl.CompressConfig(targets="(")
    with pytest.raises(ConfigError, match="layers must be"):
        sl.CompressConfig(layers=[-1])
    with pytest.raises(ConfigError, match="unknown CompressConfig field"):
        sl.CompressConfig.from_dict({"method": "lowrank", "ratio": 0.5})


def test_half_precision_gram_matches_float64_of_the_same_values():
    from structlin.calibrate.stats import Stats

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5000, 96, generator=g) * torch.logspace(0, -2, 96)).to(torch.bfloat16)
    s = Stats("m", 96, {"gram"})
    s.update(x)
    exact = x.double().T @ x.double()
    assert ((s.gram - exact).abs().max() / exact.abs().max()).item() < 1e-6


def test_too_few_calibration_tokens_warns_and_is_reported():
    m = tiny_llama()
    few = [{"input_ids": torch.randint(0, 96, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}]
    with pytest.warns(UserWarning, match="fewer calibration tokens .8. than input features"):
        rep = sl.compress(m, sl.CompressConfig(keep=0.5, options={"variant": "whiten"}), calib=few, progress=False)
    assert all(r.note == "few calibration tokens" for r in rep.rows if r.structure != "dense")


def test_structure_that_cannot_apply_names_the_module():
    from structlin.errors import TargetError

    with pytest.raises(TargetError, match=r"module 'model.layers.0.self_attn.q_proj' \(64×64\): ss1 r=512 is "
                                          r"larger than the layer's 64 input features.*choose r <= 64"):
        sl.compress(tiny_llama(), sl.CompressConfig(method="ss1", options={"r": 512}), calib=batches(n=1),
                    progress=False)
