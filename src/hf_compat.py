"""Builds a Hugging Face transformers GPT-2 (PyTorch) with this project's weights.

Optional: used only to compare against an independent implementation (tests, benchmark).
The names and layouts map as `hf_format` says, the one place for that mapping.
"""
import numpy as np

import hf_format


def to_hf(lm):
    """A transformers GPT2LMHeadModel (eval mode, float32) with `lm`'s weights."""
    import torch
    import transformers

    config = transformers.GPT2Config(**hf_format.config(lm.hparams), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    state = {}
    for name, weight in lm.checkpoint_weights().items():
        value = hf_format.to_hf_layout(name, np.asarray(weight.numpy(), dtype=np.float32))
        state[hf_format.hf_name(name)] = torch.from_numpy(np.ascontiguousarray(value))
    state[hf_format.OUTPUT_NAME] = state[hf_format.EMBEDDING_NAME]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # Attention-mask buffers are not weights; anything else missing would be a mapping bug.
    missing = [m for m in missing if not m.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"weights did not map onto transformers GPT-2: missing {missing}, unexpected {unexpected}")
    return hf
