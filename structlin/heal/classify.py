"""Task fine-tuning of encoder sequence classifiers (any structure), with optional distillation.

    model, tok = structlin.data.load_model("minilm", task="classification", num_labels=2)
    rows, _ = structlin.data.labelled("pang-lee", "train")             # [(text, label_id), ...]
    structlin.compress(model, cfg)                                      # any structure, or none
    log = finetune_classifier(model, rows, tok, epochs=3, lr=5e-5,
                              teacher=dense_finetuned, kl_weight=1.0, hidden_weight=1.0,
                              hook_options={"losparse": {"final_warmup": 100}})
    acc = accuracy(model, test_rows, tok)

Loss per batch:  CE(student logits, labels)
               + kl_weight · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))        (needs `teacher`)
               + hidden_weight · mean over layers of MSE(h_s, h_t) over real tokens (needs `teacher`)

The structures' training hooks (`structlin.heal.hooks`, e.g. the LoSparse pruner) run at their points of
every optimizer step: `hooks` given, or built by `hooks_for(model, hook_options)`, where a "losparse" entry
gets `total_steps` filled in. AdamW (`make_optimizer`, `train="all"` by default so the new classifier head
trains too) with linear warm-up and linear decay. Randomness (shuffling; dropout inside a forked RNG) is
seeded by `seed`; the caller's global RNG state is left as it was.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import TrainingHook, hooks_for, run_after_backward, run_after_optimizer_step
from .losses import hidden_mse, kl_distill
from .optim import make_optimizer


class _Freeze(TrainingHook):
    """Keeps the parameters whose names contain one of `parts` out of training."""

    def __init__(self, parts):
        self.parts = [parts] if isinstance(parts, str) else list(parts)

    def frozen(self, model):
        return {n for n, _ in model.named_parameters() if any(p in n for p in self.parts)}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _encode(tokenizer, texts, max_length, device):
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def _logits(out):
    logits = getattr(out, "logits", None)
    if logits is None:
        raise TypeError(f"the model returned {type(out).__name__} without `logits`; pass a sequence-classification "
                        f"model (e.g. structlin.data.load_model(..., task='classification', num_labels=n))")
    return logits


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def finetune_classifier(model: nn.Module, train_rows, tokenizer, *, teacher: nn.Module | None = None,
                        kl_weight: float = 0.0, hidden_weight: float = 0.0, temperature: float = 2.0,
                        hooks=None, hook_options: dict | None = None, epochs: int = 1, steps: int | None = None,
                        lr: float = 5e-5, batch_size: int = 32, max_length: int = 128, seed: int = 0,
                        weight_decay: float = 0.0, warmup: float = 0.06, train: str = "all",
                        autocast_dtype=None, progress: bool = True, max_grad_norm: float | None = 1.0,
                        freeze=()) -> dict:
    """Fine-tune `model` on `train_rows` ([(text, label_id)]) in place; returns a log
    {"steps", "seconds", "loss" (per step), "hooks"}. `steps` overrides `epochs` (the data cycles).
    `freeze`: substrings of parameter names that must not train (e.g. "word_embeddings")."""
    rows = list(train_rows)
    if not rows:
        raise ValueError("finetune_classifier: train_rows is empty")
    if batch_size < 1 or epochs < 1 or (steps is not None and steps < 1):
        raise ValueError(f"finetune_classifier: batch_size, epochs and steps must be >= 1, got {batch_size}, "
                         f"{epochs}, {steps}")
    if (kl_weight or hidden_weight) and teacher is None:
        raise ValueError("finetune_classifier: kl_weight / hidden_weight need a teacher model")
    if not 0 <= warmup < 1:
        raise ValueError(f"finetune_classifier: warmup is a fraction of the steps in [0, 1), got {warmup}")
    per_epoch = math.ceil(len(rows) / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    if hooks is None:
        opts = {k: dict(v) for k, v in (hook_options or {}).items()}
        opts.setdefault("losparse", {}).setdefault("total_steps", total)
        hooks = hooks_for(model, opts)
    hooks = list(hooks) + ([_Freeze(freeze)] if freeze else [])
    opt = make_optimizer(model, hooks, lr=lr, weight_decay=weight_decay, train=train)
    for h in hooks:
        if hasattr(h, "attach_optimizer"):
            h.attach_optimizer(opt)
    n_warm = int(warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(n_warm, 1) if s < n_warm else max(0.0, (total - s) / max(total - n_warm, 1)))
    device = _device(model)
    gen = torch.Generator().manual_seed(seed)
    if teacher is not None:
        teacher.eval()
    want_hidden = bool(hidden_weight)
    log = {"loss": [], "steps": total}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="fine-tuning", leave=False)
    t0 = time.perf_counter()
    model.train()
    step = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout; the caller's RNG state is restored on exit
        while step < total:
            order = torch.randperm(len(rows), generator=gen).tolist()
            for i in range(0, len(order), batch_size):
                if step >= total:
                    break
                chunk = [rows[j] for j in order[i:i + batch_size]]
                batch = _encode(tokenizer, [t for t, _ in chunk], max_length, device)
                labels = torch.tensor([y for _, y in chunk], device=device)
                with _autocast(device, autocast_dtype):
                    out = model(**batch, output_hidden_states=want_hidden)
                    logits = _logits(out)
                    loss = F.cross_entropy(logits.float(), labels)
                    if teacher is not None and (kl_weight or hidden_weight):
                        with torch.no_grad():
                            tout = teacher(**batch, output_hidden_states=want_hidden)
                        if kl_weight:
                            loss = loss + kl_weight * kl_distill(logits, _logits(tout), temperature)
                        if hidden_weight:
                            loss = loss + hidden_weight * hidden_mse(out.hidden_states, tout.hidden_states,
                                                                     batch.get("attention_mask"))
                loss.backward()
                run_after_backward(hooks, model, step)
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                   max_grad_norm)
                opt.step()
                run_after_optimizer_step(hooks, model, step)
                sched.step()
                opt.zero_grad(set_to_none=True)
                log["loss"].append(float(loss.detach()))
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{log['loss'][-1]:.3f}")
    if bar is not None:
        bar.close()
    for h in hooks:
        if hasattr(h, "finalize"):
            h.finalize(model)
    log["seconds"] = time.perf_counter() - t0
    log["hooks"] = [type(h).__name__ for h in hooks]
    model.eval()
    return log


@torch.no_grad()
def predict(model: nn.Module, texts, tokenizer, batch_size: int = 64, max_length: int = 128,
            autocast_dtype=None) -> torch.Tensor:
    """Predicted label ids (LongTensor) for `texts`."""
    was = model.training
    model.eval()
    device = _device(model)
    preds = []
    texts = list(texts)
    for i in range(0, len(texts), batch_size):
        batch = _encode(tokenizer, texts[i:i + batch_size], max_length, device)
        with _autocast(device, autocast_dtype):
            preds.append(_logits(model(**batch)).argmax(-1).cpu())
    model.train(was)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, rows, tokenizer, batch_size: int = 64, max_length: int = 128,
             autocast_dtype=None) -> float:
    """Fraction of `rows` ([(text, label_id)]) whose predicted label is right."""
    rows = list(rows)
    if not rows:
        raise ValueError("accuracy: rows is empty")
    pred = predict(model, [t for t, _ in rows], tokenizer, batch_size, max_length, autocast_dtype)
    return float((pred == torch.tensor([y for _, y in rows])).float().mean())
