"""Model directories in Hugging Face's GPT-2 format, and the mapping between its layout and ours.

Such a directory holds `config.json`, the weights in `model.safetensors` (or shards listed by
`model.safetensors.index.json`, or a `pytorch_model.bin` that loads without unpickling code),
and the vocabulary as `vocab.json` and `merges.txt`, which are the released `encoder.json` and
`vocab.bpe` under other names. Tensors are named like `transformer.h.0.attn.c_attn.weight`;
transformers' Conv1D keeps the released [in, out] layout, so a dense weight is ours without its
leading 1, and the output projection is `wte` itself (tied), stored or not as `lm_head.weight`.
"""
import collections.abc
import json
import os
import re

import numpy as np

from encoder import HF_VOCAB_FILES, write_vocab
from encoder import TOKENIZER_FILE
from errors import UserError
from hparams import HParams

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
OUTPUT_NAME = "lm_head.weight"
EMBEDDING_NAME = "transformer.wte.weight"

# Per-layer attention-mask buffers that older transformers saved with the weights; not weights.
_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
# transformers setting -> the value GPT-2 needs; any other value changes the computation.
_REQUIRED = {"activation_function": "gelu_new", "scale_attn_by_inverse_layer_idx": False,
             "reorder_and_upcast_attn": False, "scale_attn_weights": True, "add_cross_attention": False,
             "layer_norm_epsilon": 1e-5}


def is_hf_dir(path):
    """Whether `path` is a Hugging Face model directory: it has config.json and no hparams.json
    (a directory with both is read in the released format)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and not os.path.exists(os.path.join(path, "hparams.json"))


def weights_file(path):
    """The weights file of a Hugging Face directory: model.safetensors, its shard index, or pytorch_model.bin."""
    for name in (WEIGHTS_FILE, INDEX_FILE, PICKLE_FILE):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def missing_files(path):
    """The files a Hugging Face directory needs and lacks, by name."""
    missing = [] if weights_file(path) else [WEIGHTS_FILE]
    if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):  # the vocabulary in one file, as transformers 5 saves it
        return missing
    return missing + [name for name in HF_VOCAB_FILES if not os.path.isfile(os.path.join(path, name))]


def read_hparams(path):
    """The HParams of the Hugging Face directory `path`, after checking that it is whole and that
    its config.json describes GPT-2's computation; otherwise a one-line UserError naming the file
    or the setting."""
    config_path = os.path.join(path, CONFIG_FILE)
    missing = missing_files(path)
    if missing:
        raise UserError(f"'{path}' has {CONFIG_FILE} but lacks {', '.join(missing)}: download them too "
                        f"(huggingface-cli download <model> --include '*.safetensors' '*.json' '*.txt')")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {config_path} ({e}): download it again") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object: download it again")
    return hparams_of(config, config_path)


def hparams_of(config, source=CONFIG_FILE):
    """The HParams of a transformers GPT-2 config (a dict); a UserError names the first setting
    that is not GPT-2's."""
    def refuse(setting, value, needed):
        return UserError(f"{source} is not a GPT-2 config ({setting} is {json.dumps(value)}, GPT-2 has "
                         f"{json.dumps(needed)}): this project runs GPT-2 only")

    if config.get("model_type", "gpt2") != "gpt2":
        raise refuse("model_type", config["model_type"], "gpt2")
    for key, needed in _REQUIRED.items():
        if key in config and config[key] != needed:
            raise refuse(key, config[key], needed)
    # Old configs give the context as n_ctx; transformers reads n_positions, the size of wpe.
    n_ctx = config.get("n_positions", config.get("n_ctx"))
    if "n_positions" in config and "n_ctx" in config and config["n_ctx"] != n_ctx:
        raise refuse("n_ctx", config["n_ctx"], n_ctx)
    values = dict(n_vocab=config.get("vocab_size"), n_ctx=n_ctx, n_embd=config.get("n_embd"),
                  n_head=config.get("n_head"), n_layer=config.get("n_layer"))
    missing = [key for key, value in zip(("vocab_size", "n_positions", "n_embd", "n_head", "n_layer"), values.values())
               if value is None]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}: download it again")
    hparams = HParams(**values)
    if config.get("n_inner") not in (None, 4 * hparams.n_embd):
        raise refuse("n_inner", config["n_inner"], 4 * hparams.n_embd)
    return hparams


def config(hparams):
    """The config.json of a GPT-2 of `hparams`, as transformers writes it for the released sizes."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": hparams.n_vocab,
        "n_positions": hparams.n_ctx, "n_ctx": hparams.n_ctx, "n_embd": hparams.n_embd, "n_head": hparams.n_head,
        "n_layer": hparams.n_layer, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256,
    }


def hf_name(name):
    """Released checkpoint name -> transformers GPT2LMHeadModel state-dict name.

    >>> hf_name("model/h3/attn/c_attn/w"), hf_name("model/ln_f/g"), hf_name("model/wte")
    ('transformer.h.3.attn.c_attn.weight', 'transformer.ln_f.weight', 'transformer.wte.weight')
    """
    parts = name.split("/")[1:]  # drop the 'model' scope
    if parts in (["wte"], ["wpe"]):
        return f"transformer.{parts[0]}.weight"
    leaf = {"g": "weight", "b": "bias", "w": "weight"}[parts[-1]]
    if parts[0] == "ln_f":
        return f"transformer.ln_f.{leaf}"
    return ".".join(["transformer.h", parts[0][1:], *parts[1:-1], leaf])


def released_name(name):
    """transformers state-dict name (with or without `transformer.`) -> released checkpoint name,
    or None for a name that is no GPT-2 weight.

    >>> released_name("h.3.attn.c_attn.weight"), released_name("transformer.ln_f.weight")
    ('model/h3/attn/c_attn/w', 'model/ln_f/g')
    """
    parts = name.removeprefix("transformer.").split(".")
    if parts in (["wte", "weight"], ["wpe", "weight"]):
        return f"model/{parts[0]}"
    if parts[-1] not in ("weight", "bias"):
        return None
    is_norm = parts[-2].startswith("ln_")
    leaf = "b" if parts[-1] == "bias" else "g" if is_norm else "w"
    if parts[:-1] == ["ln_f"]:
        return f"model/ln_f/{leaf}"
    if len(parts) >= 4 and parts[0] == "h" and parts[1].isdigit():
        return "/".join(["model", "h" + parts[1], *parts[2:-1], leaf])
    return None


def to_hf_layout(name, value):
    """A released-layout value -> transformers': dense weights drop their leading 1 ([1, in, out] -> [in, out])."""
    return value[0] if name.endswith("/w") else value


def to_released_layout(name, value):
    """The inverse of `to_hf_layout`."""
    return value[None] if name.endswith("/w") else value


class HFWeights(collections.abc.Mapping):
    """The weights of a Hugging Face directory as a read-only mapping from released name to a
    float32 array in the released layout, each read from disk on lookup.

    `shapes` maps every tensor in the file to its released shape without reading it; a tensor
    that is no GPT-2 weight keeps its own name there, so a shape check reports it as unexpected.
    """

    def __init__(self, path):
        self.path = weights_file(path)
        if self.path is None:
            raise UserError(f"'{path}' lacks {WEIGHTS_FILE}: download it too")
        if self.path.endswith(PICKLE_FILE):
            self._source = _PickleSource(self.path)
        elif self.path.endswith(INDEX_FILE):
            self._source = _ShardedSource(self.path)
        else:
            self._source = _SafetensorsSource(self.path)
        self._names = {}  # released name -> name in the file
        self.shapes = {}
        for stored, shape in self._source.shapes().items():
            if _BUFFER.match(stored) or stored == OUTPUT_NAME:
                continue
            name = released_name(stored) or stored
            self._names[name] = stored
            self.shapes[name] = [1, *shape] if name.startswith("model/") and name.endswith("/w") else list(shape)
        self._check_output(path)

    def _check_output(self, path):
        """The released format has no output matrix of its own (logits are h @ wte^T): refuse one that differs."""
        tied = self._tie_setting(path)
        stored = self._source.shapes()
        embedding = next((n for n in (EMBEDDING_NAME, "wte.weight") if n in stored), None)
        if OUTPUT_NAME not in stored or embedding is None:
            if tied is False:
                raise UserError(f"{os.path.join(path, CONFIG_FILE)} sets tie_word_embeddings false but the weights have "
                                f"no {OUTPUT_NAME}: GPT-2 ties its output to wte; this is not a GPT-2 checkpoint")
            return
        if not np.array_equal(self._source.read(OUTPUT_NAME), self._source.read(embedding)):
            raise UserError(f"{self.path} has an {OUTPUT_NAME} that differs from {embedding}: GPT-2 ties its output to "
                            f"wte, and the released format cannot hold a separate output matrix")

    @staticmethod
    def _tie_setting(path):
        try:
            with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
                return json.load(f).get("tie_word_embeddings")
        except (OSError, ValueError, AttributeError):
            return None

    def __getitem__(self, name):
        value = self._source.read(self._names[name]).astype(np.float32, copy=False)
        return to_released_layout(name, value) if name.startswith("model/") else value

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


class _SafetensorsSource:
    """One safetensors file, through the safetensors library's numpy API (bfloat16 via ml_dtypes)."""

    def __init__(self, path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            self._file = safe_open(path, framework="np")
            self._shapes = {k: self._file.get_slice(k).get_shape() for k in self._file.keys()}
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e}): download it again") from None

    def shapes(self):
        return self._shapes

    def read(self, name):
        return self._file.get_tensor(name)


class _ShardedSource:
    """The shards that model.safetensors.index.json lists, read as one file."""

    def __init__(self, index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {index_path} ({e}): download it again") from None
        directory = os.path.dirname(index_path)
        missing = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(directory, s))})
        if missing:
            raise UserError(f"{index_path} lists shards that are missing: {', '.join(missing)}: download them too")
        self._shards = {s: _SafetensorsSource(os.path.join(directory, s)) for s in sorted(set(weight_map.values()))}
        self._where = {}
        for shard, source in self._shards.items():
            self._where.update((name, shard) for name in source.shapes())

    def shapes(self):
        return {name: self._shards[shard].shapes()[name] for name, shard in self._where.items()}

    def read(self, name):
        return self._shards[self._where[name]].read(name)


class _PickleSource:
    """A pytorch_model.bin, read only by torch.load(weights_only=True), which unpickles tensors and
    plain containers and refuses any other object, so a checkpoint cannot run code."""

    def __init__(self, path):
        hint = ("convert it to model.safetensors, e.g. python -c \"import torch, safetensors.torch as s; "
                f"s.save_file(torch.load('{path}', weights_only=True), 'model.safetensors', metadata={{'format': 'pt'}})\"")
        try:
            import torch
        except ImportError:
            raise UserError(f"{path} is a pickle, which is read only through torch.load(weights_only=True) and "
                            f"torch is not installed: install torch, or {hint}") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError or others for unsafe or bad files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} cannot be read without unpickling arbitrary code ({reason}): {hint}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"{path} is not a state dict of tensors: {hint}")
        self._state = state

    def shapes(self):
        return {name: list(tensor.shape) for name, tensor in self._state.items()}

    def read(self, name):
        # numpy has no bfloat16; widen on torch's side, where every dtype converts.
        return self._state[name].float().numpy()


def write_files(directory, hparams, weights, vocab_texts):
    """Writes config.json, model.safetensors, vocab.json and merges.txt into `directory`; the
    caller makes the result appear atomically (by writing into a staging directory).

    Args:
        directory: An existing directory.
        hparams: The model's HParams.
        weights: Released name -> array in the released layout (float32).
        vocab_texts: The texts of encoder.json and vocab.bpe, written as vocab.json and merges.txt.
    """
    from safetensors.numpy import save_file

    tensors = {hf_name(n): np.ascontiguousarray(to_hf_layout(n, np.asarray(w, dtype=np.float32)))
               for n, w in weights.items()}
    # transformers refuses a safetensors file without a format in its metadata.
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    # safetensors creates the file owner-only (0600); give it the mode the other files get.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(os.path.join(directory, WEIGHTS_FILE), 0o666 & ~umask)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(config(hparams), indent=2) + "\n")
    write_vocab(directory, vocab_texts, HF_VOCAB_FILES)
