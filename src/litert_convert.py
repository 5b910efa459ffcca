"""Converts the model to LiteRT programs (the TensorFlow side of `litert_engine`) and caches
them beside the model, keyed by what they depend on.
"""
import glob
import os

import model
import model_files
from errors import UserError
from litert_engine import CACHE_DIR, DTYPES, cached_paths, program_names, split, write_program
from model import attention_input, block_output, norm
from runtime import tf


def step_signature(hparams, layers=None):
    """Input specs of a converted program holding `layers` (a range, all by default): tokens
    [B, T] for the first program or the hidden state [B, T, d] before its first layer for a
    later one, pos, pad, then each layer's keys and values [B, H, 1, capacity, D]."""
    h, d = hparams.n_head, hparams.head_dim
    layers = range(hparams.n_layer) if layers is None else layers
    first = (tf.TensorSpec([None, None], tf.int32, name="tokens") if layers.start == 0
             else tf.TensorSpec([None, None, hparams.n_embd], tf.float32, name="hidden"))
    return ([first, tf.TensorSpec([], tf.int32, name="pos"), tf.TensorSpec([None], tf.int32, name="pad")]
            + [tf.TensorSpec([None, h, 1, None, d], tf.float32, name=f"{kind}_{i}")
               for kind in ("keys", "values") for i in layers])


def step_program(lm, layers=None):
    """The function the converter takes for `layers` (all by default): (tokens or hidden, pos,
    pad, *keys, *values) -> (logits [B, V] after the last layer or the hidden state [B, T, d],
    new keys [L, B, H, T, D], new values [L, B, H, T, D])."""
    hp = lm.hparams
    layers = range(hp.n_layer) if layers is None else layers
    n = len(layers)

    def run(inputs, pos, pad, *cache):
        keys, values = cache[:n], cache[n:]
        b, t = tf.shape(inputs)[0], tf.shape(inputs)[1]
        capacity = tf.shape(keys[0])[3]
        query_pos = pos + tf.range(t)  # [T]
        w = lm.layers  # variables: a program reads, and so holds, only what it uses
        x = model.embed(w, inputs, tf.maximum(query_pos[None, :] - pad[:, None], 0)) if layers.start == 0 else inputs
        x = tf.reshape(x, [b * t, hp.n_embd])  # rows, so each dense layer is one 2-D product
        # Keys before pos come from the cache, the rest are the new tokens' own.
        cached_pos = tf.range(capacity)
        keep_cached = tf.logical_and(cached_pos[None, None, :] < pos, cached_pos[None, None, :] >= pad[:, None, None])
        keep_cached = tf.broadcast_to(keep_cached, tf.stack([b, t, capacity]))  # [B, T, C]
        keep_new = tf.logical_and(query_pos[None, None, :] <= query_pos[None, :, None],
                                  query_pos[None, None, :] >= pad[:, None, None])  # [B, T, T]
        mask = model.Mask.of(tf.cast(tf.concat([keep_cached, keep_new], -1), tf.float32)[:, None])
        scale = tf.math.rsqrt(tf.constant(hp.head_dim, tf.float32))
        new_keys, new_values = [], []
        for i, p in enumerate(lm.read_block(w.blocks[j]) for j in layers):
            qkv = tf.reshape(attention_input(x, p), [b, t, 3, hp.n_head, hp.head_dim])
            q, k, v = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))  # [B, H, T, D] each
            # The cache's products as broadcast multiplies and sums over its 5-D layout, which
            # XNNPACK streams near memory speed: a batched product repacks the cache every call.
            cached_scores = tf.reduce_sum(tf.expand_dims(q, 3) * keys[i], -1)  # [B, H, T, C]
            scores = tf.concat([cached_scores, tf.matmul(q, k, transpose_b=True)], -1)
            weights = model.softmax(scores * scale * mask.keep + mask.bias)  # [B, H, T, C + T]
            old, new = weights[..., :capacity], weights[..., capacity:]
            a = tf.reduce_sum(tf.expand_dims(old, -1) * values[i], 3) + tf.matmul(new, v)  # [B, H, T, D]
            x = block_output(x, tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [b * t, hp.n_embd]), p)
            new_keys.append(k)
            new_values.append(v)
        x = tf.reshape(x, [b, t, hp.n_embd])
        if layers.stop < hp.n_layer:
            return x, tf.stack(new_keys), tf.stack(new_values)
        return model.logits(norm(x[:, -1], w.ln_f), w.wte), tf.stack(new_keys), tf.stack(new_values)

    return run


def cached_program(model_dir, hparams, dtype, load_lm, progress=True):
    """The paths of `model_dir`'s conversion to `dtype` (one program, or several when it does not
    fit one flatbuffer), converting it first if there is none for the current weights
    (`load_lm()` gives the float32 `model.GPT2`; `hparams` are its `HParams`); stale ones are removed."""
    from tqdm import tqdm

    folder = os.path.join(model_dir, CACHE_DIR)
    pieces = split(hparams, dtype)
    targets = cached_paths(model_dir, hparams, dtype)
    if all(map(os.path.exists, targets)):
        return targets
    with tqdm(total=1 + len(pieces), desc=f"converting to LiteRT {dtype} (once)", unit="stage",
              disable=None if progress else True) as bar:  # None: shown on a terminal only
        lm = load_lm()
        bar.update()
        for layers, target in zip(pieces, targets):
            program = convert(lm, int8=dtype == "int8", layers=layers)
            try:
                write_program(program, target)
            except OSError as e:
                raise UserError(f"cannot cache the LiteRT conversion in {folder} ({e.strerror}): make it writable, "
                                "or use engine tf") from None
            del program
            bar.update()
        for stale in glob.glob(os.path.join(glob.escape(folder), f"{dtype}-*.tflite")):
            if stale not in targets:
                os.remove(stale)
    return targets


def convert(lm, int8=False, layers=None):
    """The converted program of `layers` (all by default) as flatbuffer bytes; int8 quantizes
    the weights (dynamic range)."""
    fn = tf.function(step_program(lm, layers), autograph=False, input_signature=step_signature(lm.hparams, layers))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], lm)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def export_tflite(model_dir, out_dir, dtype="float32"):
    """Writes `model_dir`'s converted program as `out_dir/gpt2-<dtype>.tflite` (or, when it does
    not fit one flatbuffer, `gpt2-<dtype>-1of<n>.tflite`... to run in turn), with hparams.json,
    encoder.json and vocab.bpe beside it, for LiteRT users; returns the programs' paths."""
    import encoder

    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)} for tflite, got {dtype!r}")
    models_dir, name = os.path.split(os.path.normpath(model_dir))
    lm = model.load_model(name, models_dir or ".")
    pieces = split(lm.hparams, dtype)
    targets = [os.path.join(out_dir, f) for f in program_names(f"gpt2-{dtype}", len(pieces))]
    for layers, target in zip(pieces, targets):
        write_program(convert(lm, int8=dtype == "int8", layers=layers), target)
    has_vocab = any(map(os.path.exists, encoder.vocab_files(model_dir))) or os.path.exists(
        os.path.join(model_dir, encoder.TOKENIZER_FILE))
    texts = encoder.vocab_texts(model_dir if has_vocab else encoder.default_vocab_dir())
    # Released or Hugging Face directory alike, the export holds the released hparams and vocabulary.
    files = dict(zip(encoder.VOCAB_FILES, texts), **{"hparams.json": model_files.load_hparams(model_dir).to_json()})
    for name, text in files.items():
        write_program(text.encode("utf-8"), os.path.join(out_dir, name))
    return targets
