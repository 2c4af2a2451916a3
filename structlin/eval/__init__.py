"""Evaluation: perplexity by a stated protocol (more to come: classification accuracy, lm-eval)."""
from .perplexity import Perplexity, perplexity

__all__ = ["Perplexity", "perplexity"]
