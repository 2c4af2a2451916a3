import json

import pytest
import torch

import structlin as sl
from structlin import io
from structlin.errors import LoadError, StructlinError

from conftest import batches, tiny_gpt2, tiny_llama


def compressed(dtype=torch.float32, model=tiny_llama):
    m = model()
    sl.compress(m, sl.CompressConfig(keep=0.5, options={"variant": "whiten"}), calib=batches(n=2), progress=False)
    return m.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", [tiny_llama, tiny_gpt2])
def test_round_trip_is_bit_identical(tmp_path, dtype, model):
    m = compressed(dtype, model)
    sl.save_pretrained(m, tmp_path / "out")
    m2 = sl.from_pretrained(tmp_path / "out")
    x = batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(m(x).logits, m2(x).logits)
    assert io.structure_of(m) == io.structure_of(m2)
    meta = json.loads((tmp_path / "out" / "structlin.json").read_text())
    assert meta["history"][0]["method"] == "lowrank" and meta["torch_dtype"] == str(dtype)[6:]


def test_task_head_model_reloads_as_its_own_class(tmp_path):
    """A classifier built on a base checkpoint whose config names the base class (MiniLM's says BertModel)
    reloads as the classifier, head included."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, num_labels=3,
                                  architectures=["BertModel"])
    torch.manual_seed(0)
    m = transformers.BertForSequenceClassification(cfg).eval()
    sl.compress(m, sl.CompressConfig(keep=0.5, exclude=["pooler", "classifier"], options={"variant": "whiten"}),
                calib=batches(n=2), progress=False)
    sl.save_pretrained(m, tmp_path / "clf")
    m2 = sl.from_pretrained(tmp_path / "clf")
    assert type(m2) is transformers.BertForSequenceClassification
    x = batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(m(x).logits, m2(x).logits)


def test_refuses_to_overwrite_and_replaces_atomically(tmp_path, monkeypatch):
    m = compressed()
    out = tmp_path / "out"
    sl.save_pretrained(m, out)
    with pytest.raises(StructlinError, match="already exists.*overwrite=True"):
        sl.save_pretrained(m, out)
    x = batches(n=1)[0]["input_ids"]
    before = sl.from_pretrained(out)(x).logits

    import safetensors.torch as st

    def dies_midway(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(st, "save_model", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        sl.save_pretrained(tiny_llama(seed=5), out, overwrite=True)
    monkeypatch.undo()
    assert torch.equal(sl.from_pretrained(out)(x).logits, before)  # the previous model still loads
    assert [p.name for p in tmp_path.iterdir()] == ["out"]           # no temporary left behind
    sl.save_pretrained(tiny_llama(seed=5), out, overwrite=True)
    assert not io.structure_of(sl.from_pretrained(out))


def test_load_errors_are_clear(tmp_path):
    m = compressed()
    good = tmp_path / "good"
    sl.save_pretrained(m, good)
    with pytest.raises(LoadError, match="not a directory saved"):
        sl.from_pretrained(tmp_path / "nothing")

    import shutil

    def variant(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    d = variant("missing")
    (d / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="missing model.safetensors"):
        sl.from_pretrained(d)

    d = variant("newer")
    meta = json.loads((d / "structlin.json").read_text())
    meta["format_version"] = 99
    (d / "structlin.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="format 99.*upgrade structlin"):
        sl.from_pretrained(d)

    d = variant("shape")
    meta = json.loads((d / "structlin.json").read_text())
    meta["modules"]["model.layers.0.mlp.up_proj"]["spec"]["rank"] += 8
    (d / "structlin.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="model.layers.0.mlp.up_proj.*shape"):
        sl.from_pretrained(d)

    d = variant("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated"):
        sl.from_pretrained(d)

    d = variant("corrupt")
    meta = json.loads((d / "structlin.json").read_text())
    del meta["weights_bytes"]
    (d / "structlin.json").write_text(json.dumps(meta))
    (d / "model.safetensors").write_bytes(b"\xff" * len(data))
    with pytest.raises(LoadError, match="corrupted or truncated"):
        sl.from_pretrained(d)

    d = variant("wrongmodule")
    meta = json.loads((d / "structlin.json").read_text())
    meta["modules"]["model.layers.7.mlp.up_proj"] = meta["modules"].pop("model.layers.0.mlp.up_proj")
    (d / "structlin.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="model.layers.7.mlp.up_proj"):
        sl.from_pretrained(d)
