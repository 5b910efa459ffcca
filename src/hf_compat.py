"""Builds a Hugging Face transformers GPT-2 (PyTorch) with this project's weights.

Optional: used only to compare against an independent implementation (tests, benchmark).
Hugging Face's Conv1D keeps the [in, out] layout of the released checkpoints, so the
weights map by name with the leading 1 dropped.
"""
import numpy as np


def hf_name(name):
    """Released checkpoint name -> transformers GPT2LMHeadModel state-dict name."""
    parts = name.split("/")[1:]  # drop the 'model' scope
    if parts == ["wte"] or parts == ["wpe"]:
        return f"transformer.{parts[0]}.weight"
    leaf = {"g": "weight", "b": "bias", "w": "weight"}[parts[-1]]
    if parts[0] == "ln_f":
        return f"transformer.ln_f.{leaf}"
    layer = parts[0][1:]
    return "transformer.h." + layer + "." + ".".join(parts[1:-1]) + "." + leaf


def to_hf(lm):
    """A transformers GPT2LMHeadModel (eval mode, float32) with `lm`'s weights."""
    import torch
    import transformers

    hp = lm.hparams
    config = transformers.GPT2Config(
        vocab_size=hp.n_vocab, n_positions=hp.n_ctx, n_embd=hp.n_embd, n_layer=hp.n_layer, n_head=hp.n_head,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    state = {}
    for name, weight in lm.checkpoint_weights().items():
        value = np.asarray(weight.numpy(), dtype=np.float32)
        if name.endswith("/w"):
            value = value[0]
        state[hf_name(name)] = torch.from_numpy(value)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # Attention-mask buffers are not weights; anything else missing would be a mapping bug.
    missing = [m for m in missing if not m.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"weights did not map onto transformers GPT-2: missing {missing}, unexpected {unexpected}")
    return hf
