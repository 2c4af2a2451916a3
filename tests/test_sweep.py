"""`structlin sweep` on a tiny Llama with a byte-level tokenizer: writes the table, the JSON and both plots."""
import json

import pytest
import torch
import transformers

from structlin.cli import main


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices: threads only contend on the shared CI cores
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_dir(tmp_path):
    pytest.importorskip("tokenizers")
    from structlin import assets

    try:
        assets.austen_texts()
    except Exception as e:  # the offline texts are part of the project's set-up
        pytest.skip(f"Austen texts unavailable: {e}")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)  # transformers initialises from the global RNG; tests only
    m = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path / "tiny"
    m.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def test_sweep_cli_writes_table_and_plots(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["sweep", str(tiny_dir), "--methods", "lowrank,espace", "--keep", "0.5",
               "--allocations", "uniform,fisher", "--option", "lowrank.variant=whiten",
               "--option", "espace.calibrator=output", "--calib-n", "4", "--seq-len", "32", "--eval-tokens", "256",
               "--dtype", "float32", "--device", "cpu", "--latency", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "latency skipped" in printed
    md = (out / "sweep.md").read_text()
    for png in ("sweep_params.png", "sweep_flops.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    # dense + 2 methods × 2 allocations + mixed × 2 allocations
    assert len(rows) == 1 + 4 + 2
    assert rows[0]["method"] == "dense" and all(r["latency_ms"] is None for r in rows)
    for r in rows[1:]:
        assert r["charged"] <= r["keep"] + 1e-12 and r["model_params"] < rows[0]["model_params"]
        assert r["linear_flops"] < rows[0]["linear_flops"] and torch.isfinite(torch.tensor(r["quality"]))
        assert f"| {r['method']} | {r['allocation']} | {r['keep']:.2f} |" in md
    assert "keep 0.50:" in md and "Mixed (" in md


def test_sweep_rejects_unknown_method(tiny_dir, tmp_path, capsys):
    rc = main(["sweep", str(tiny_dir), "--methods", "lowrank,nope", "--out", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown method(s) ['nope']" in err and "Traceback" not in err
