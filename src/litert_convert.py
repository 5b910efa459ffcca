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
    """Input specs of a converted program holding `layers` (a range, all by default), for N query
    rows: the first program's tokens [N] and positions [N], or a later one's hidden state [N, d]
    before its first layer; the attention biases over the cache [N, 1, 1, C] and over the rows
    themselves [N, N]; the last program's rows to return logits for [M]; then each layer's keys
    and values [N or 1, H, D, C]."""
    h, d = hparams.n_head, hparams.head_dim
    layers = range(hparams.n_layer) if layers is None else layers
    rows = ([tf.TensorSpec([None], tf.int32, name="tokens"), tf.TensorSpec([None], tf.int32, name="positions")]
            if layers.start == 0 else [tf.TensorSpec([None, hparams.n_embd], tf.float32, name="hidden")])
    biases = [tf.TensorSpec([None, 1, 1, None], tf.float32, name="cache_bias"),
              tf.TensorSpec([None, None], tf.float32, name="own_bias")]
    out = [tf.TensorSpec([None], tf.int32, name="out_rows")] if layers.stop == hparams.n_layer else []
    return rows + biases + out + [tf.TensorSpec([None, h, d, None], tf.float32, name=f"{kind}_{i}")
                                  for kind in ("keys", "values") for i in layers]


def step_program(lm, layers=None):
    """The function the converter takes for `layers` (all by default): (tokens and positions, or
    hidden; cache_bias, own_bias; out_rows if last; *keys, *values) -> (logits [M, V] of the
    out_rows after the last layer, or the hidden state [N, d]; new keys [L, N, H, D]; new values
    [L, N, H, D]). Every reshape has a constant shape: XNNPACK takes shape arithmetic in pieces."""
    hp = lm.hparams
    h, d, e = hp.n_head, hp.head_dim, hp.n_embd
    layers = range(hp.n_layer) if layers is None else layers
    n, first, last = len(layers), layers.start == 0, layers.stop == hp.n_layer

    def run(*inputs):
        w = lm.layers  # variables: a program reads, and so holds, only what it uses
        x = model.embed(w, inputs[0], inputs[1]) if first else inputs[0]  # [N, d]
        inputs = inputs[2:] if first else inputs[1:]
        cache_bias, own_bias = inputs[:2]
        out_rows = inputs[2] if last else None
        keys, values = inputs[-2 * n:-n], inputs[-n:]
        scale = tf.math.rsqrt(tf.constant(d, tf.float32))
        new_keys, new_values = [], []
        for i, p in enumerate(lm.read_block(w.blocks[j]) for j in layers):
            # A split, not an unstack: XNNPACK runs no UNPACK, and each one cuts its graph in two.
            q, k, v = (tf.reshape(t, [-1, h, d]) for t in tf.split(attention_input(x, p), 3, axis=-1))  # [N, H, D]
            # The cache's products as broadcast multiplies and sums over slots-last [D, C] rows,
            # which XNNPACK streams near memory speed: a batched product repacks the cache every call.
            cached = tf.reduce_sum(tf.reshape(q, [-1, h, d, 1]) * keys[i], 2, keepdims=True) * scale + cache_bias
            qh, kh, vh = (tf.transpose(t, [1, 0, 2]) for t in (q, k, v))  # [H, N, D]
            own = tf.matmul(qh, kh, transpose_b=True) * scale + own_bias  # [H, N, N]
            # One softmax over both parts' keys, without concatenating them (C and N both vary);
            # the cache's scores keep an axis of one, since XNNPACK runs no EXPAND_DIMS.
            top = tf.maximum(tf.reduce_max(cached, 3, keepdims=True),
                             tf.reshape(tf.transpose(tf.reduce_max(own, -1)), [-1, h, 1, 1]))  # [N, H, 1, 1]
            cached = tf.exp(cached - top)  # [N, H, 1, C]
            own = tf.exp(own - tf.reshape(tf.transpose(tf.reshape(top, [-1, h])), [h, -1, 1]))
            total = tf.reshape(tf.reduce_sum(cached, 3), [-1, h]) + tf.transpose(tf.reduce_sum(own, -1))  # [N, H]
            a = (tf.reduce_sum(cached * values[i], 3)
                 + tf.transpose(tf.matmul(own, vh), [1, 0, 2])) / tf.reshape(total, [-1, h, 1])  # [N, H, D]
            x = block_output(x, tf.reshape(a, [-1, e]), p)
            new_keys.append(k)
            new_values.append(v)
        if not last:
            return x, tf.stack(new_keys), tf.stack(new_values)
        return model.logits(norm(tf.gather(x, out_rows), w.ln_f), w.wte), tf.stack(new_keys), tf.stack(new_values)

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
