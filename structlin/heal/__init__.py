"""Healing and fine-tuning compressed models: distillation losses, the training hooks each structure
registers (pruning, budget projection), the optimizer they imply, and the HF `Trainer` callback."""
from .hooks import TrainingHook, hooks_for, structured_layers
from .losses import hidden_mse, kl_distill
from .loop import HealResult, heal, latest_checkpoint
from .optim import make_optimizer

__all__ = ["TrainingHook", "hooks_for", "structured_layers", "kl_distill", "hidden_mse", "make_optimizer", "heal", "HealResult",
           "latest_checkpoint"]
