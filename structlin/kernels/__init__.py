"""Kernels: torch.library custom ops with torch reference implementations (the CPU path) and Triton
kernels (the CUDA path, optional). Kernels know nothing of models."""
