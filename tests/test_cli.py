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
