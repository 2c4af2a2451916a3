"""`heal`: recover a compressed causal LM's quality by training its structured layers.

Loss per micro-batch (tokens where the attention mask is 1; the next-token targets shifted as usual):

    lm_weight · CE(next token) + kl_weight · T²·KL(teacher ‖ student at temperature T)
                                + hidden_weight · mean over layers of MSE(hidden states)

The optimizer is AdamW over `trainable_parameters` (structured layers and norms by default) plus the
groups the structures' hooks add; the learning rate warms up linearly for `warmup` steps then follows a
cosine to `min_lr_ratio · lr`; gradients are accumulated over `grad_accum` micro-batches and clipped.

Determinism and resume: the micro-batch order is a function of (seed, epoch) only — a permutation of
`data` drawn from a local generator per epoch — so step s always sees the same micro-batches. A
checkpoint (every `checkpoint_every` steps, atomically written into `checkpoint_dir`) holds the trainable
parameters, the optimizer, the scheduler, the hooks' state, the global RNG state (for dropout) and the
loss history; `heal(..., checkpoint_dir=D)` on a directory with a checkpoint resumes from the newest one
and ends exactly where an uninterrupted run would (fp32 on CPU bit-for-bit).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..calibrate.collect import prepare_batch
from .hooks import TrainingHook, hooks_for, run_after_backward, run_after_optimizer_step
from .losses import hidden_mse, kl_distill
from .optim import make_optimizer, trainable_parameters

CKPT_PREFIX = "heal-step-"


@dataclass
class HealResult:
    steps: int                                  # optimizer steps completed (== requested steps)
    losses: list[float] = field(default_factory=list)       # total loss per optimizer step
    parts: list[dict] = field(default_factory=list)         # {"lm":…, "kl":…, "hidden":…} per step
    resumed_from: int | None = None             # step of the checkpoint this run resumed from
    seconds: float = 0.0
    trainable: int = 0                          # number of trained parameters (elements)

    def __str__(self) -> str:
        first = self.losses[0] if self.losses else float("nan")
        last = sum(self.losses[-10:]) / max(1, len(self.losses[-10:]))
        res = f", resumed from step {self.resumed_from}" if self.resumed_from is not None else ""
        return (f"healed {self.steps} steps in {self.seconds:.0f} s ({self.trainable:,} trainable values){res}; "
                f"loss {first:.4f} -> {last:.4f} (mean of the last 10)")


def cosine_schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warm-up over `warmup` steps, then a cosine
    from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def micro_batch_order(n: int, count: int, seed: int, start: int = 0) -> list[int]:
    """Indices of micro-batches start..start+count-1 in a stream of per-epoch permutations of range(n)."""
    out, epoch_cache = [], {}
    for i in range(start, start + count):
        epoch, pos = divmod(i, n)
        if epoch not in epoch_cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            epoch_cache[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(epoch_cache[epoch][pos])
    return out


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token cross entropy over positions whose target is a real token."""
    logits, target = logits[:, :-1].float(), input_ids[:, 1:]
    valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].bool() & mask[:, :-1].bool()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (ce * valid.reshape(-1)).sum() / valid.sum().clamp_min(1)


def _as_batches(data, model) -> list[dict]:
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"heal data as a tensor must be (n_windows, seq_len) token ids, got "
                             f"{tuple(data.shape)} {data.dtype}")
        return [{"input_ids": row[None]} for row in data]
    batches = [prepare_batch(b, model, i)[0] for i, b in enumerate(data)]
    if not batches:
        raise ValueError("heal needs at least one training batch; `data` is empty")
    for i, b in enumerate(batches):
        if "input_ids" not in b:
            raise ValueError(f"heal batch {i} has no 'input_ids' (keys: {sorted(b)}); causal-LM healing "
                             "needs token ids")
    return batches


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _checkpoints(directory) -> list[Path]:
    """The checkpoint files in `directory`, oldest step first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = sorted((int(p.name[len(CKPT_PREFIX):-3]), p) for p in d.glob(f"{CKPT_PREFIX}*.pt")
                   if p.name[len(CKPT_PREFIX):-3].isdigit())
    return [p for _, p in found]


def latest_checkpoint(directory) -> Path | None:
    found = _checkpoints(directory)
    return found[-1] if found else None


def heal(model: nn.Module, data, *, steps: int, teacher: nn.Module | None = None, lr: float = 1e-4,
         lm_weight: float = 1.0, kl_weight: float | None = None, hidden_weight: float = 0.0,
         temperature: float = 1.0, train: str = "structured", hook_options: dict | None = None,
         hooks: list[TrainingHook] | None = None, grad_accum: int = 1, warmup: int | None = None,
         min_lr_ratio: float = 0.1, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
         autocast_dtype: torch.dtype | None = None, checkpoint_dir=None, checkpoint_every: int | None = None,
         keep_checkpoints: int = 2, progress: bool = True, seed: int = 0, stop_after: int | None = None,
         accelerator=None) -> HealResult:
    """Train `model` (a compressed causal LM) for `steps` optimizer steps on `data`.

    data:          a list of batches ({"input_ids", "attention_mask"} or token-id tensors), or an
                   (n_windows × seq_len) tensor of token ids (one window per micro-batch).
    teacher:       the dense model to distil from (frozen, eval mode); `kl_weight` defaults to 1 with a
                   teacher and must be 0 without one; `hidden_weight` adds hidden-state MSE.
    train:         "structured" (structured layers + norms), "all", or "none" (only hook groups).
    hooks:         training hooks; default: those the structures in `model` register (`hooks_for`),
                   configured by `hook_options` ({method name: {option: value}}).
    autocast_dtype: e.g. torch.bfloat16 to compute in bf16 while parameters and optimizer stay in
                   their own dtype (fp32 master weights).
    stop_after:    stop (as if killed) after this many steps of this call; for testing resume.
    accelerator:   an `accelerate.Accelerator` (DDP); without one, a torch.distributed process group
                   (torchrun) is used if initialised. Each optimizer step then reads `grad_accum × world`
                   micro-batches, rank r taking its own `grad_accum`; gradients are averaged across ranks,
                   so the run equals a single process with `grad_accum × world` accumulation (to
                   rounding). Losses are averaged across ranks; only rank 0 writes checkpoints.
    """
    if steps < 1:
        raise ValueError(f"heal: steps must be ≥ 1, got {steps}")
    if grad_accum < 1:
        raise ValueError(f"heal: grad_accum must be ≥ 1, got {grad_accum}")
    if kl_weight is None:
        kl_weight = 1.0 if teacher is not None else 0.0
    if (kl_weight > 0 or hidden_weight > 0) and teacher is None:
        raise ValueError("heal: kl_weight/hidden_weight > 0 need a `teacher` (the dense model)")
    if lm_weight == 0 and kl_weight == 0 and hidden_weight == 0:
        raise ValueError("heal: all loss weights are 0; set lm_weight, kl_weight or hidden_weight")
    batches = _as_batches(data, model)
    hooks = hooks_for(model, hook_options) if hooks is None else list(hooks)
    warmup = max(1, steps // 20) if warmup is None else warmup
    device = next(model.parameters()).device

    if accelerator is not None:
        world, rank = accelerator.num_processes, accelerator.process_index
    else:
        world, rank = distributed.world(), distributed.rank()

    opt = make_optimizer(model, hooks, lr=lr, weight_decay=weight_decay, train=train)
    for h in hooks:  # hooks that reshape parameters (LoSparse row-gating) keep the optimizer in step
        if hasattr(h, "attach_optimizer"):
            h.attach_optimizer(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, steps, warmup, min_lr_ratio))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    result = HealResult(steps=0, trainable=sum(p.numel() for p in trained.values()))

    start = 0
    if checkpoint_dir is not None:
        ckpt = latest_checkpoint(checkpoint_dir)
        if ckpt is not None:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if state["steps"] != steps or state["names"] != sorted(trained):
                raise ValueError(f"heal: checkpoint {ckpt} belongs to a different run ({state['steps']} steps, "
                                 f"{len(state['names'])} trained tensors) than this one ({steps} steps, "
                                 f"{len(trained)} tensors); use another checkpoint_dir")
            with torch.no_grad():
                for n, p in trained.items():
                    p.copy_(state["params"][n])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            for h, hs in zip(hooks, state["hooks"]):
                h.load_state_dict(hs)
            torch.set_rng_state(state["rng"])
            start = result.resumed_from = state["step"]
            result.losses, result.parts = list(state["losses"]), list(state["parts"])
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)

    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    was_training = model.training
    model.train()
    runner = model
    if world > 1:
        if accelerator is not None:
            runner = accelerator.prepare_model(model)
        else:
            runner = torch.nn.parallel.DistributedDataParallel(model)
    need_hidden = hidden_weight > 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc="heal", unit="step")
    t0 = time.perf_counter()
    end = steps if stop_after is None else min(steps, start + stop_after)
    per_step = grad_accum * world
    order = micro_batch_order(len(batches), (end - start) * per_step, seed, start * per_step)
    try:
        for step in range(start, end):
            acc = torch.zeros(4, dtype=torch.float64, device=device)   # total, lm, kl, hidden: one sync per step
            for j in range(grad_accum):
                idx = order[(step - start) * per_step + rank * grad_accum + j]
                b = {k: v.to(device) for k, v in batches[idx].items()}
                mask = b.get("attention_mask")
                ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
                sync = j == grad_accum - 1 or runner is model
                with ctx, (contextlib.nullcontext() if sync else runner.no_sync()):
                    out = runner(**b, use_cache=False, output_hidden_states=need_hidden)
                    t_out = None
                    if teacher is not None:
                        with torch.no_grad():
                            t_out = teacher(**b, use_cache=False, output_hidden_states=need_hidden)
                zero = torch.zeros((), device=device)
                lm = lm_loss(out.logits, b["input_ids"], mask) if lm_weight else zero
                kl = kl_distill(out.logits, t_out.logits, temperature, mask) if kl_weight else zero
                hid = hidden_mse(out.hidden_states[1:], t_out.hidden_states[1:], mask) if hidden_weight else zero
                loss = lm_weight * lm + kl_weight * kl + hidden_weight * hid
                acc += torch.stack([loss, lm, kl, hid]).detach().double() / grad_accum
                (loss / grad_accum).backward()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(acc)
                acc /= world
            total, lm_v, kl_v, hid_v = acc.tolist()
            parts = {"lm": lm_v, "kl": kl_v, "hidden": hid_v}
            if not math.isfinite(total):   # before the optimizer touches the weights
                raise FloatingPointError(f"heal: the loss became {total} at step {step}; lower the "
                                         f"learning rate (now {lr:g}) or use fp32")
            run_after_backward(hooks, model, step)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_grad_norm)
            opt.step()
            run_after_optimizer_step(hooks, model, step)
            opt.zero_grad(set_to_none=True)
            sched.step()
            result.losses.append(total)
            result.parts.append(parts)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}")
            done = step + 1
            if checkpoint_dir is not None and checkpoint_every and (done % checkpoint_every == 0 or done == steps):
                if rank == 0:
                    current = {n: p for n, p in model.named_parameters() if n in trained}  # hooks may swap them
                    _save_checkpoint(checkpoint_dir, done, steps, current, opt, sched, hooks, result,
                                     keep_checkpoints)
                distributed.barrier()
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    result.steps = end
    result.seconds = time.perf_counter() - t0
    return result


def _save_checkpoint(directory, done, steps, trained, opt, sched, hooks, result, keep) -> None:
    d = Path(directory)
    state = {"step": done, "steps": steps, "names": sorted(trained),
             "params": {n: p.detach().cpu().clone() for n, p in trained.items()},
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "hooks": [h.state_dict() for h in hooks], "rng": torch.get_rng_state(),
             "losses": list(result.losses), "parts": list(result.parts)}
    _atomic_save(state, d / f"{CKPT_PREFIX}{done}.pt")
    for p in _checkpoints(d)[:-keep]:
        p.unlink()


__all__ = ["heal", "HealResult", "cosine_schedule", "lm_loss", "latest_checkpoint", "trainable_parameters"]
