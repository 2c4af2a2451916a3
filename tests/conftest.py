"""Tiny models built from configs (no downloads) and calibration batches for them."""
import os

import pytest
import torch
import transformers

if not torch.cuda.is_available():
    # Triton reads this when first imported: set it before any test imports triton, so the kernel tests
    # run under the interpreter on CPU tensors wherever there is no GPU (CI).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama(seed: int = 0, **kw):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    torch.manual_seed(seed)  # transformers initialises from the global RNG; tests only
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def batches(n=4, b=2, t=16, vocab=96, seed=1, pad=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        if pad:
            mask[0, t // 2:] = 0  # right padding on the first row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def calib():
    return batches()
