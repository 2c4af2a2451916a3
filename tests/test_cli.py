import pytest
import torch

import structlin as sl
from structlin.cli import main

from conftest import tiny_llama


def errors(capsys):
    """Lines of stderr that are not transformers' own progress bars; no traceback allowed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.strip().splitlines() if "Loading weights" not in line]


@pytest.fixture
def model_dir(tmp_path):
    m = tiny_llama()
    m.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def test_compress_dry_run_and_save(model_dir, tmp_path, capsys):
    assert main(["compress", str(model_dir), "--dry-run", "--targets", "q_proj", "--no-calib"]) == 0
    assert "2 modules" in capsys.readouterr().out
    out = tmp_path / "small"
    assert main(["compress", str(model_dir), "--variant", "svd", "--keep", "0.5", "--no-calib",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "keep 0.5 of targeted linear params; achieved 0.49" in text and (out / "report.md").is_file()
    m = sl.from_pretrained(out)
    assert type(m.model.layers[0].mlp.up_proj).__name__ == "LowRankLinear"
    assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()
    # refuses to overwrite, with one line
    assert main(["compress", str(model_dir), "--variant", "svd", "--no-calib", "--out", str(out)]) == 2
    err = errors(capsys)
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]


@pytest.mark.parametrize("args,needle", [
    (["--keep", "0"], "keep must be a fraction"),
    (["--variant", "pca"], "must be one of ['svd', 'asvd', 'whiten']"),
    (["--option", "rank=3"], "unknown option(s) ['rank']"),
    (["--targets", "nothing_here"], "matched no module"),
    (["--variant", "whiten"], "needs calibration data"),
])
def test_bad_arguments_give_one_line(model_dir, tmp_path, capsys, args, needle):
    rc = main(["compress", str(model_dir), "--no-calib", "--out", str(tmp_path / "o"), *args])
    err = errors(capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("structlin: error:") and needle in err[0]


def test_heal_command_trains_saves_and_resumes(tmp_path, capsys):
    import transformers

    from structlin import assets

    tok = transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir())
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    small = tmp_path / "small"
    assert main(["compress", str(tmp_path / "dense"), "--variant", "svd", "--keep", "0.5", "--no-calib",
                 "--out", str(small)]) == 0
    healed = tmp_path / "healed"
    args = ["heal", str(small), "--steps", "3", "--windows", "4", "--seq-len", "32", "--lr", "1e-2",
            "--teacher", str(tmp_path / "dense"), "--checkpoint-every", "1", "--autocast", "none", "--out", str(healed)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "healed 3 steps" in out and (tmp_path / "healed.checkpoints").is_dir()
    before, after = sl.from_pretrained(small), sl.from_pretrained(healed)
    w0 = before.model.layers[0].mlp.up_proj.up.weight
    w1 = after.model.layers[0].mlp.up_proj.up.weight
    assert type(after.model.layers[0].mlp.up_proj).__name__ == "LowRankLinear" and not torch.equal(w0, w1)
    assert after.structlin_history[-1]["heal"]["steps"] == 3
    # a second run finds the finished checkpoint and resumes from it (nothing left to train)
    assert main(args + ["--overwrite"]) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    # not a structlin directory: one line
    assert main(["heal", str(tmp_path / "dense"), "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    err = errors(capsys)
    assert len(err) == 1 and "not a structlin directory" in err[0]
