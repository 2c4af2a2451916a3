"""Calibration / evaluation text, labelled sets and the offline models, as tensors.

Texts (Jane Austen, from the offline assets; see ``structlin.assets``):
``"austen-calib"`` = *Emma* + *Mansfield Park*, ``"austen-eval"`` = *Pride and Prejudice* +
*Sense and Sensibility*, or any single book by short name. Token streams carry no special tokens
(no BOS/CLS/SEP): the perplexity protocol scores the first N tokens of the raw stream, cut into
non-overlapping windows of ``seq_len`` tokens.

    model, tok = load_model("smollm2")
    calib = texts("austen-calib", tok, n=64, seq_len=512)           # 64 batches of (1, 512)
    windows = token_windows(text("austen-eval"), tok, 65536, 512)   # (128, 512) LongTensor
"""
from __future__ import annotations

from types import MappingProxyType

import torch

from . import assets

TEXTS = MappingProxyType({
    "austen-calib": ("emma", "mansfield-park"),
    "austen-eval": ("pride-and-prejudice", "sense-and-sensibility"),
    **{book: (book,) for book in assets.AUSTEN_BOOKS},
})
LABELLED = ("pang-lee", "reuters-r8")
PANG_LEE_LABELS = ("negative", "positive")  # polarity -1 -> 0, 1 -> 1


def text(name: str) -> str:
    """The text ``name`` (a key of ``TEXTS``): its books, each stripped, joined by a blank line."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose one of {sorted(TEXTS)}")
    books = assets.austen_texts()
    return "\n\n".join(books[b].strip() for b in TEXTS[name])


def _chunks(text: str, chars: int = 20_000):
    """Pieces of ``text`` of about ``chars`` characters, cut at paragraph breaks ("\\n\\n").

    The cut sits before the *last* character of the whitespace run, so a piece ends in whitespace
    and the next starts with one whitespace character + a word, as the GPT-2 pre-tokenizer regex
    (SmolLM2) splits it on the whole text; WordPiece (BERT) splits at any whitespace. So piecewise
    ids equal whole-text ids for these tokenizers (tests pin it for SmolLM2 and MiniLM).
    """
    start = 0
    while start < len(text):
        cut = text.find("\n\n", start + chars)
        if cut < 0:
            yield text[start:]
            return
        end = cut + 2
        while end < len(text) and text[end].isspace():
            end += 1
        cut = end - 1  # the whitespace run up to its last character stays in this piece
        yield text[start:cut]
        start = cut


def tokenize(text: str, tokenizer, n_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens, stopping once ``n_tokens`` ids are known.

    Long texts are tokenized in paragraph-aligned pieces, a batch at a time (fast tokenizers run a
    batch in parallel), with the too-long-sequence warning off: the ids are a stream, not one input.
    """
    ids: list[int] = []
    pieces = list(_chunks(text))
    for i in range(0, len(pieces), 8):
        for row in tokenizer(pieces[i:i + 8], add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(row)
        if n_tokens is not None and len(ids) >= n_tokens:
            return ids[:n_tokens]
    return ids


def token_windows(text: str, tokenizer, n_tokens: int | None, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of the first ``n_tokens`` tokens of ``text``: LongTensor (W, seq_len).

    W = min(n_tokens, len(tokens)) // seq_len; the remainder is dropped. ``n_tokens=None`` uses the
    whole text. Raises ValueError if fewer than ``seq_len`` tokens are available.
    """
    if seq_len < 1 or (n_tokens is not None and n_tokens < 1):
        raise ValueError(f"seq_len and n_tokens must be positive, got seq_len={seq_len}, n_tokens={n_tokens}")
    ids = tokenize(text, tokenizer, n_tokens)
    if len(ids) < seq_len:
        why = f"n_tokens={n_tokens}" if n_tokens is not None and n_tokens < seq_len else "the text is too short"
        raise ValueError(f"token_windows needs at least seq_len={seq_len} tokens for one window but has "
                         f"{len(ids)} ({why}); raise n_tokens to a multiple of seq_len or lower seq_len")
    w = len(ids) // seq_len
    return torch.tensor(ids[:w * seq_len], dtype=torch.long).view(w, seq_len)


def texts(name: str, tokenizer, n: int = 64, seq_len: int = 512, batch_size: int = 1) -> list[dict]:
    """Calibration batches: the first ``n`` windows of text ``name`` as model inputs.

    Returns ``ceil(n / batch_size)`` dicts ``{"input_ids": (b, seq_len) long, "attention_mask": ones}``.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    windows = token_windows(text(name), tokenizer, n * seq_len, seq_len)
    if len(windows) < n:
        raise ValueError(f"text {name!r} holds only {len(windows)} windows of {seq_len} tokens, asked for {n}")
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


def dtype_kwarg() -> str:
    """transformers' name for the dtype argument of from_pretrained: `dtype` since 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_model(name_or_dir: str, dtype: torch.dtype = torch.float32, task: str | None = None,
               num_labels: int | None = None, seed: int = 0, **kwargs):
    """(model in eval mode, tokenizer) for ``"smollm2"``, ``"minilm"``, a local folder or a hub id.

    ``"smollm2"`` / ``"minilm"`` are the offline folders of ``structlin.assets``; anything else goes to
    ``transformers.from_pretrained`` (``kwargs`` are passed on). ``task``: ``"causal-lm"`` (default,
    except for minilm), ``"base"`` (``AutoModel``, default for minilm) or ``"classification"``
    (``AutoModelForSequenceClassification`` with ``num_labels``; a new classifier head is drawn from
    N(0, initializer_range) with a local generator seeded ``seed``, so it is reproducible).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = {"smollm2": assets.smollm2_dir, "minilm": assets.minilm_dir}.get(name_or_dir, lambda: name_or_dir)()
    task = task or ("base" if name_or_dir == "minilm" else "causal-lm")
    if task == "classification":
        if not num_labels:
            raise ValueError("load_model(task='classification') needs num_labels")
        kwargs["num_labels"] = num_labels
    elif num_labels is not None:
        raise ValueError(f"num_labels is only used with task='classification', not task={task!r}")
    auto = {"causal-lm": AutoModelForCausalLM, "base": AutoModel,
            "classification": AutoModelForSequenceClassification}.get(task)
    if auto is None:
        raise ValueError(f"unknown task {task!r}; choose 'causal-lm', 'base' or 'classification'")
    model = auto.from_pretrained(path, **{dtype_kwarg(): dtype}, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task == "classification":
        head = getattr(model, "classifier", getattr(model, "score", None))
        if isinstance(head, torch.nn.Linear):
            g = torch.Generator().manual_seed(seed)
            std = getattr(model.config, "initializer_range", 0.02)
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
                if head.bias is not None:
                    head.bias.zero_()
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def labelled(name: str, split: str) -> tuple[list[tuple[str, int]], list[str]]:
    """A labelled set: ``(rows, label_names)`` with rows ``(text, label_id)``, ``label_names[label_id]``.

    ``"pang-lee"``: 4,000 movie sentences, labels negative/positive; no official split, so a fixed
    80/20 split (3,200 / 800, shuffled) from a local generator seeded 0. ``"reuters-r8"``: the official
    train (5,485) / test (2,189) split, 8 categories, ids in sorted category order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "pang-lee":
        rows = [(t, int(y > 0)) for t, y in assets.pang_lee()]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        cut = len(rows) * 4 // 5
        return [rows[i] for i in (order[:cut] if split == "train" else order[cut:])], list(PANG_LEE_LABELS)
    if name == "reuters-r8":
        names = sorted({y for _, y in assets.reuters_r8("train")})
        ids = {y: i for i, y in enumerate(names)}
        return [(t, ids[y]) for t, y in assets.reuters_r8(split)], names
    raise ValueError(f"unknown labelled set {name!r}; choose one of {LABELLED}")
