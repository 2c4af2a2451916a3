import pytest

import structlin as sl
from structlin import targeting
from structlin.errors import TargetError

from conftest import tiny_bert, tiny_gpt2, tiny_llama


def names(model, **kw):
    return list(targeting.select(model, **kw))


def test_all_linear_llama_excludes_head():
    got = names(tiny_llama())
    assert len(got) == 14 and "lm_head" not in got
    assert got[0] == "model.layers.0.self_attn.q_proj" and got[-1] == "model.layers.1.mlp.down_proj"


def test_all_linear_gpt2_conv1d_and_bert():
    got = names(tiny_gpt2())
    assert got == [f"transformer.h.{i}.{s}" for i in range(2)
                   for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    bert = names(tiny_bert())
    assert "encoder.layer.0.attention.self.query" in bert and "pooler.dense" in bert and len(bert) == 13


def test_list_suffix_regex_exclude_layers():
    m = tiny_llama()
    assert names(m, targets=["q_proj", "mlp.up_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(TargetError):
        names(m, targets=["proj"])
    assert names(m, targets=r".*\.mlp\..*", layers=[1]) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert names(m, exclude=["self_attn.q_proj", "k_proj", "v_proj", "o_proj"], layers=[0]) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert names(tiny_gpt2(), layers=[1], targets=["c_fc"]) == ["transformer.h.1.mlp.c_fc"]
    assert names(tiny_bert(), layers=[0], targets=["query"]) == ["encoder.layer.0.attention.self.query"]


def test_exclude_list_drops_children_of_a_listed_module():
    bert = names(tiny_bert(), exclude=["pooler"])
    assert "pooler.dense" not in bert and len(bert) == 12
    assert names(tiny_bert(), exclude=["attention", "pooler"]) == [
        f"encoder.layer.{i}.{s}" for i in range(2) for s in ("intermediate.dense", "output.dense")]
    llama = names(tiny_llama(), exclude=["layers.0", "mlp"])
    assert llama == [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    # an entry is matched on whole dotted components: "layers.1" is not a parent of "layers.10..."
    assert not any(n.startswith("model.layers.0.") for n in llama)


def test_espace_expressions():
    m = tiny_llama()
    assert names(m, targets="layers.1.__AND__mlp__OR__layers.0.__AND__q_proj__NOT__gate") == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert len(names(m, targets="__NOT__mlp")) == 8 + 1  # everything but the MLPs, lm_head included
    with pytest.raises(TargetError, match="more than one __NOT__"):
        names(m, targets="a__NOT__b__NOT__c")


def test_zero_matches_lists_module_names():
    with pytest.raises(TargetError) as e:
        names(tiny_llama(), targets=["nonexistent"])
    assert "matched no module" in str(e.value) and "model.layers.0.self_attn.q_proj" in str(e.value)


def test_dry_run_rows():
    rows = sl.dry_run(tiny_gpt2(), sl.CompressConfig(method="lowrank", keep=0.5, options={"variant": "svd"}))
    first = rows[0]
    assert (first["name"], first["type"], first["in_features"], first["out_features"]) == (
        "transformer.h.0.attn.c_attn", "Conv1D", 64, 192)
    assert "8 modules" in targeting.format_dry_run(rows)


def test_structured_layers_are_not_targets_again(calib):
    m = tiny_llama()
    sl.compress(m, sl.CompressConfig(keep=0.5, options={"variant": "svd"}), progress=False)
    assert "model.layers.0.self_attn.q_proj.down" not in targeting.linear_modules(m)
