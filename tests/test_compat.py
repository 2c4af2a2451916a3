"""structlin.compat: the released SS1 API (`SSL`, `convert_to_ss_linear`) on BERT, GPT-2 and Llama naming."""
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import structlin
from structlin.compat import SSL, convert_to_ss_linear
from structlin.methods.ss1 import SS1Linear

from conftest import batches

H, I = 256, 512  # r = 8 needs in_features >= r·bk = 256


def bert(seed=0):
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=H, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=I, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).eval()


def gpt2(seed=0):
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=H, n_layer=3, n_head=4, n_inner=I, n_positions=32)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=H, intermediate_size=I, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


BUILD = {"bert": bert, "gpt2": gpt2, "llama": llama}
BLOCK = {"bert": "layer.{}.", "gpt2": "h.{}.", "llama": "layers.{}."}
ATTN = {"bert": ".attention.", "gpt2": ".attn.", "llama": ".self_attn."}
HEAD = {"bert": None, "gpt2": "lm_head", "llama": "lm_head"}


def kinds(model):
    """name -> 'ss1' or 'dense' for every linear-like module (inner structure excluded)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SS1Linear):
            out[name] = "ss1"
        elif isinstance(m, (nn.Linear, Conv1D)):
            out[name] = "dense"
    return out


def ids(seed=0, t=10):
    return torch.randint(0, 96, (2, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


README = dict(reduction_factor=8, layer_indices=[1], skip_attention=False, init_seed=42,
              skip_pattern=["pooler", "embeddings"])


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_readme_call(arch):
    model = BUILD[arch]()
    before = kinds(model)
    rng = torch.get_rng_state()
    out = convert_to_ss_linear(model, **README)
    assert out is model
    assert torch.equal(torch.get_rng_state(), rng)  # averaging projection: no randomness, global RNG untouched
    after = kinds(model)
    assert after.keys() == before.keys()
    for name, kind in after.items():
        keep_dense = (BLOCK[arch].format(1) in name or "pooler" in name or "embeddings" in name
                      or name == HEAD[arch])
        assert kind == ("dense" if keep_dense else "ss1"), name
    converted = [n for n, k in after.items() if k == "ss1"]
    assert len(converted) == {"bert": 13, "gpt2": 8, "llama": 14}[arch]  # bert: 2 blocks × 6 + classifier
    if arch == "bert":
        assert after["classifier"] == "ss1" and after["bert.pooler.dense"] == "dense"  # as released
    if arch == "gpt2":
        assert after["transformer.h.0.attn.c_attn"] == "ss1"  # Conv1D converted
    for name in converted:
        m = model.get_submodule(name)
        assert m.spec.r == 8 and m.spec.scheme == "tied" and isinstance(m, SSL)
        assert (m.bias is None) == (arch == "llama")
    rep = model.structlin_report
    assert [r.name for r in rep.rows] == converted and all(r.structure.startswith("ss1 r=8") for r in rep.rows)
    assert rep.model_params_after < rep.model_params_before
    assert torch.isfinite(logits(model, ids())).all()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_skip_attention(arch):
    model = BUILD[arch]()
    convert_to_ss_linear(model, 8, skip_attention=True, skip_pattern=["pooler"])
    after = kinds(model)
    attn = [n for n in after if ATTN[arch] in n]
    assert attn and all(after[n] == "dense" for n in attn)
    rest = [n for n in after if ATTN[arch] not in n and "pooler" not in n and n != HEAD[arch]]
    assert rest and all(after[n] == "ss1" for n in rest)
    assert torch.isfinite(logits(model, ids())).all()


def test_forward_equals_to_dense_and_projection_is_average():
    model = llama()
    W = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    convert_to_ss_linear(model, 4)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, I, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense()), rtol=1e-5, atol=1e-5)
        # released projection: each stored value is the mean of its r tied dense entries
        bucket = layer.bucket.long()
        mean = torch.zeros(W.shape[0], layer.spec.buckets).index_add_(1, bucket, W) / 4
        torch.testing.assert_close(layer.weight, mean)


def test_conv1d_forward_equals_dense_application():
    model = gpt2()
    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(0))
    convert_to_ss_linear(model, 2)
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, SS1Linear) and (layer.in_features, layer.out_features) == (H, I)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense(), layer.bias), rtol=1e-5, atol=1e-5)
        # r = 2 averaging of a random weight keeps the output correlated with the dense layer's
        y0, y = conv(x), layer(x)
        assert F.cosine_similarity(y0.flatten(), y.flatten(), dim=0) > 0.5


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_save_load_roundtrip(arch, tmp_path):
    model = BUILD[arch]()
    convert_to_ss_linear(model, **README)
    x = ids(3)
    y = logits(model, x)
    structlin.save_pretrained(model, tmp_path / arch)
    back = structlin.from_pretrained(tmp_path / arch).eval()
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert kinds(back) == kinds(model)
    assert torch.equal(logits(back, x), y)


def test_calibration_uses_least_squares():
    data = batches(n=4, b=4, t=32)  # 512 tokens >= the widest input (512): full-rank Grams
    a, b = llama(), llama()
    convert_to_ss_linear(a, 4, calib=data, layer_indices=[1, 2])
    convert_to_ss_linear(b, 4, calib=data, layer_indices=[1, 2], options={"projection": "average"})
    ra, rb = a.structlin_report, b.structlin_report
    assert [r.name for r in ra.rows] == [r.name for r in rb.rows] and len(ra.rows) == 7
    for x, y in zip(ra.rows, rb.rows):  # least squares minimises the calibration output error
        assert x.output_error <= y.output_error + 1e-9, x.name
    assert sum(r.output_error for r in ra.rows) < 0.9 * sum(r.output_error for r in rb.rows)


def test_bf16_model_keeps_dtype():
    model = llama().to(torch.bfloat16)
    convert_to_ss_linear(model, 2, skip_pattern=["self_attn"])
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, SS1Linear) and layer.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.isfinite(logits(model, ids()).float()).all()


def test_too_narrow_layers_stay_dense_with_warning():
    from conftest import tiny_llama  # hidden 64, intermediate 176: r = 100 ties more rows than 64 inputs hold

    model = tiny_llama()
    with pytest.warns(UserWarning, match="stay dense"):
        convert_to_ss_linear(model, 100)
    after = kinds(model)
    assert after["model.layers.0.mlp.down_proj"] == "ss1"  # 176 inputs >= r
    assert after["model.layers.0.self_attn.q_proj"] == "dense"  # 64 inputs < r


def test_nothing_to_convert_returns_model_unchanged():
    model = bert()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no layer to convert"):
        assert convert_to_ss_linear(model, 8, skip_pattern=["bert", "classifier"]) is model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


# ----------------------------------------------------------------------------- SSL constructor

def test_ssl_constructor():
    rng = torch.get_rng_state()
    m = SSL(256, 96, redn_factor=4, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the released constructor reseeded the global RNG
    assert m.weight.shape == (96, 64) and m.bias is not None and not m.bias.any()
    assert m.saving == 64 / 256 and m.redn_factor == 4 and m.seed == 7
    assert isinstance(m, SS1Linear) and isinstance(m, SSL)
    assert m.weight.abs().max() <= (6 / (64 + 96)) ** 0.5  # Xavier over the stored shape
    assert torch.equal(SSL(256, 96, redn_factor=4, seed=7).weight, m.weight)  # same seed, same init
    assert not torch.equal(SSL(256, 96, redn_factor=4, seed=8).weight, m.weight)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.linear(x, m.to_dense(), m.bias))
    nb = SSL(256, 96, bias=False, redn_factor=2)
    assert nb.bias is None and nb.saving == 0.5


def test_ssl_bf16_and_device():
    m = SSL(128, 64, redn_factor=2, seed=3, dtype=torch.bfloat16, device="cpu")
    assert m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_ssl_released_kwargs_ignored_with_warning():
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match=r"BLOCK_SIZE_K.*layer_idx|layer_idx"):
        m = SSL(256, 64, True, 4, 11, BLOCK_SIZE_M=64, BLOCK_SIZE_K=64, BLOCK_SIZE_N=16, batch_size=512,
                layer_idx=3)
    assert torch.equal(torch.get_rng_state(), rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = SSL(256, 64, True, 4, 11)  # no released kwargs: no warning
    assert m.spec == ref.spec and torch.equal(m.weight, ref.weight)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))
    with pytest.raises(TypeError, match="BLOK_SIZE_K"):
        SSL(256, 64, BLOK_SIZE_K=64)


def test_ssl_isinstance_only_for_tied_ss1():
    from structlin.methods.ss1 import SS1Spec

    assert isinstance(SS1Linear(SS1Spec(64, 8, True, r=2)), SSL)
    assert not isinstance(SS1Linear(SS1Spec(64, 8, True, r=2, scheme="table")), SSL)
    assert not isinstance(nn.Linear(4, 4), SSL)


def test_model_built_with_ssl_saves(tmp_path):
    model = nn.Sequential(SSL(64, 32, redn_factor=2))
    structlin.save_pretrained(model, tmp_path / "s")
    back = structlin.from_pretrained(tmp_path / "s", model=nn.Sequential(nn.Linear(64, 32)))
    x = torch.randn(3, 64)
    assert torch.equal(back(x), model(x))
