"""The LiteRT engine against the TensorFlow engine, its conversion cache and the engine choice."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import SRC_DIR, TINY_HPARAMS, run_script

pytest.importorskip("ai_edge_litert")

# A second shape: odd head count, three layers, a window the prompts fill.
OTHER_HPARAMS = dict(n_vocab=50257, n_ctx=24, n_embd=48, n_head=3, n_layer=3)


@pytest.fixture(scope="module", params=[TINY_HPARAMS, OTHER_HPARAMS], ids=["tiny", "other"])
def engines(request, tmp_path_factory):
    """(TensorFlow decoder, LiteRT float32 engine, LiteRT int8 engine) of one random model."""
    import checkpoint
    import decode
    import litert_convert
    import litert_engine
    import model
    from hparams import HParams

    models = tmp_path_factory.mktemp("models")
    checkpoint.write_random_model(str(models / "m"), HParams(**request.param), seed=3, std=0.2)
    lm = model.load_model("m", str(models))
    return (decode.Decoder(lm), litert_engine.Engine(litert_convert.convert(lm), lm.hparams),
            litert_engine.Engine(litert_convert.convert(lm, int8=True), lm.hparams))


def padded_prompts(n_vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    longest = max(lengths)
    tokens = rng.integers(0, n_vocab, (len(lengths), longest)).astype(np.int32)
    return tokens, np.array([longest - n for n in lengths], np.int32)


def test_prefill_and_steps_match_the_tensorflow_engine(engines):
    from runtime import tf

    tf_engine, lite, _ = engines
    n_ctx = tf_engine.hparams.n_ctx
    tokens, pad = padded_prompts(tf_engine.hparams.n_vocab, [7, 4, 1])
    capacity = n_ctx
    want, tf_state = tf_engine.prefill(tf.constant(tokens), tf.constant(pad), tf.constant(capacity))
    got, state = lite.prefill(tokens, pad, capacity)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    rng = np.random.default_rng(1)
    for pos in range(tokens.shape[1], n_ctx):
        token = rng.integers(0, tf_engine.hparams.n_vocab, [len(pad)]).astype(np.int32)
        want, tf_state = tf_engine.step(tf.constant(token), tf.constant(pos), tf.constant(pad), tf_state)
        got, state = lite.step(token, pos, pad, state)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def rows_run(lite, monkeypatch):
    """A list that collects the number of rows of each program run of `lite` from here on."""
    runs = []
    for piece in lite._pieces:
        monkeypatch.setattr(piece, "run", lambda x, feeds, run=piece.run: runs.append(len(x)) or run(x, feeds))
    return runs


def test_a_prompt_given_to_several_rows_runs_once_and_fills_each_rows_cache(engines, monkeypatch):

    from runtime import tf

    tf_engine, lite, _ = engines
    tokens, pad = padded_prompts(tf_engine.hparams.n_vocab, [5, 3, 5, 3])
    tokens[2], tokens[3] = tokens[0], tokens[1]
    runs = rows_run(lite, monkeypatch)
    got, state = lite.prefill(tokens, pad, 8)
    assert runs == [5 + 3] * len(lite._pieces)  # one call: each distinct prompt once, its padding left out
    want, tf_state = tf_engine.prefill(tf.constant(tokens), tf.constant(pad), tf.constant(8))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    token = np.array([1, 2, 3, 4], np.int32)
    want, _ = tf_engine.step(tf.constant(token), tf.constant(5), tf.constant(pad), tf_state)
    np.testing.assert_allclose(lite.step(token, 5, pad, state)[0], want.numpy(), atol=1e-4, rtol=0)


def test_prompts_past_the_calls_room_run_in_several_calls_with_the_same_logits(engines, monkeypatch):
    import litert_engine
    from runtime import tf

    tf_engine, lite, _ = engines
    monkeypatch.setattr(litert_engine, "PACKED_ROWS", 7)
    tokens, pad = padded_prompts(tf_engine.hparams.n_vocab, [5, 2, 4, 3], seed=4)
    runs = rows_run(lite, monkeypatch)
    got, state = lite.prefill(tokens, pad, 8)
    assert runs == [n for n in (5 + 2, 4 + 3) for _ in lite._pieces]
    want, tf_state = tf_engine.prefill(tf.constant(tokens), tf.constant(pad), tf.constant(8))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    token = np.array([1, 2, 3, 4], np.int32)
    want, _ = tf_engine.step(tf.constant(token), tf.constant(5), tf.constant(pad), tf_state)
    np.testing.assert_allclose(lite.step(token, 5, pad, state)[0], want.numpy(), atol=1e-4, rtol=0)


def test_a_prompt_filling_the_window_and_a_new_prefill_then_the_first_stream_again(engines):
    from runtime import tf

    tf_engine, lite, _ = engines
    n_ctx, n_vocab = tf_engine.hparams.n_ctx, tf_engine.hparams.n_vocab
    first_tokens, first_pad = padded_prompts(n_vocab, [3])
    _, state = lite.prefill(first_tokens, first_pad, 8)
    lite.step(np.array([5], np.int32), 3, first_pad, state)
    tokens, pad = padded_prompts(n_vocab, [n_ctx, n_ctx - 5], seed=2)
    want, _ = tf_engine.prefill(tf.constant(tokens), tf.constant(pad), tf.constant(n_ctx))
    got, new_state = lite.prefill(tokens, pad, n_ctx)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    # The first stream goes on where it was, its cache set aside and put back.
    _, tf_state = tf_engine.prefill(tf.constant(first_tokens), tf.constant(first_pad), tf.constant(8))
    _, tf_state = tf_engine.step(tf.constant([5]), tf.constant(3), tf.constant(first_pad), tf_state)
    want, _ = tf_engine.step(tf.constant([6]), tf.constant(4), tf.constant(first_pad), tf_state)
    got, _ = lite.step(np.array([6], np.int32), 4, first_pad, state)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_rows_moved_and_joined_decode_as_they_did_alone(engines):
    from runtime import tf

    tf_engine, lite, _ = engines
    n_vocab = tf_engine.hparams.n_vocab
    long, short = padded_prompts(n_vocab, [7], seed=1)[0], padded_prompts(n_vocab, [3], seed=2)[0]

    def alone(x):  # the last position's logits of one full prefill, no cache moved
        return tf_engine.prefill(tf.constant(x), tf.zeros([1], tf.int32), tf.constant(x.shape[1]))[0].numpy()[0]

    # The short row, prefilled alone, moves right by 4 (its padding) and joins the long one.
    _, first = lite.prefill(long[:, :6], np.zeros(1, np.int32), 7)
    _, second = lite.prefill(short[:, :2], np.zeros(1, np.int32), 2)
    state = lite.concat(lite.rearrange(first, 1, [0], 0, 7), lite.rearrange(second, 1, [0], -4, 7), 7)
    # Dropping the long row and the short one's padding gives back a cache it steps alone on.
    dropped = lite.rearrange(state, 2, [1], 4, 3)
    logits, _ = lite.step(short[:, 2], 2, np.zeros(1, np.int32), dropped)
    np.testing.assert_allclose(logits[0], alone(short), atol=1e-4)
    logits, _ = lite.step(np.array([long[0, 6], short[0, 2]]), 6, np.array([0, 4], np.int32), state)
    np.testing.assert_allclose(logits[0], alone(long), atol=1e-4)
    np.testing.assert_allclose(logits[1], alone(short), atol=1e-4)


CONTROLS = [dict(), dict(repetition_penalty=1.5), dict(presence_penalty=1.0, frequency_penalty=0.7),
            dict(logit_bias={11: 5.0, 12: -100.0}), dict(bad_words=[[11], [13, 14]]),
            dict(min_length=6, stop_at_eot=True, logit_bias={50256: 30.0})]


@pytest.mark.parametrize("controls", CONTROLS, ids=lambda c: "-".join(c) or "none")
def test_greedy_tokens_equal_the_tensorflow_engines_with_every_control(engines, controls):
    import sample

    tf_engine, lite, _ = engines
    prompts = [[1, 2, 3, 4], [7]]
    length = tf_engine.hparams.n_ctx - 4
    runs = [np.concatenate(list(sample.Sampler(e, 50256).generate(prompts, length, temperature=0, **controls)), 1)
            for e in (tf_engine, lite)]
    np.testing.assert_array_equal(runs[1], runs[0])
    if controls.get("min_length"):
        assert (runs[0][:, :6] != 50256).all() and (runs[0][:, 6] == 50256).all()


def test_sliding_past_the_window_gives_the_tensorflow_engines_tokens(engines):
    import sample

    tf_engine, lite, _ = engines
    prompts, length = [[5, 6, 7], [9]], 3 * tf_engine.hparams.n_ctx
    runs = [np.concatenate(list(sample.Sampler(e, 50256).generate(prompts, length, temperature=0)), 1)
            for e in (tf_engine, lite)]
    assert runs[0].shape == (2, length)
    np.testing.assert_array_equal(runs[1], runs[0])


def test_sampling_with_a_seed_and_logprobs_matches_the_tensorflow_engine(engines):
    import sample

    tf_engine, lite, _ = engines
    outs = []
    for e in (tf_engine, lite):
        stream = sample.Sampler(e, 50256).generate([[1, 2, 3]], 12, top_k=5, seed=7, logprobs=2, max_chunk=4)
        chunks = [(c, stream.logprobs) for c in stream]
        outs.append((np.concatenate([c for c, _ in chunks], 1), np.concatenate([lp[0] for _, lp in chunks], 1)))
    np.testing.assert_array_equal(outs[1][0], outs[0][0])
    np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-4)


def test_the_loop_over_the_litert_engine_compiles_once(engines):
    import sample

    _, lite, _ = engines
    sampler = sample.Sampler(lite, 50256)
    list(sampler.generate([[1, 2, 3]], 6, top_k=5, seed=1))
    before = sampler.traces()
    assert before["chunk"] == 1
    list(sampler.generate([[4], [5, 6, 7, 8]], 9, temperature=0.5, top_p=0.9, logprobs=2, repetition_penalty=1.2))
    assert sampler.traces() == before  # other batches, prompts, knobs and controls reuse the trace


def test_int8_weights_stay_close_to_float32(engines):
    _, lite, int8 = engines
    tokens, pad = padded_prompts(lite.hparams.n_vocab, [6, 6])
    exact, _ = lite.prefill(tokens, pad, 10)
    quantized, _ = int8.prefill(tokens, pad, 10)
    assert not np.array_equal(quantized, exact)  # the weights really are quantized
    assert np.abs(quantized - exact).max() < 0.1 * np.abs(exact).max()


@pytest.fixture()
def models_dir(tmp_path):
    import checkpoint
    from hparams import HParams

    checkpoint.write_random_model(str(tmp_path / "tiny"), HParams(**TINY_HPARAMS), seed=1, std=0.2)
    return str(tmp_path)


PRELOADED_RUN = """
import sys
sys.path.insert(0, {src!r})
import litert_engine
litert_engine.preload("tiny", {models!r}, "float32", {engine!r})
before_tensorflow = "tensorflow" not in sys.modules
preloaded = list(litert_engine._PRELOADED.values())
import api
gpt = api.load("tiny", {models!r}, engine={engine!r}, progress=False)
taken = gpt.engine is not None and all(p in gpt.engine._pieces for p in preloaded)
print(before_tensorflow, len(preloaded), taken, len(litert_engine._PRELOADED))
print(gpt.generate("Hi", 8, temperature=0))
"""


@pytest.mark.parametrize("engine", ["litert", "auto"])
def test_a_preloaded_program_is_built_before_tensorflow_and_taken_by_the_engine(models_dir, engine):
    import api

    expected = api.load("tiny", models_dir, engine="litert", progress=False).generate("Hi", 8, temperature=0)
    code = PRELOADED_RUN.format(src=SRC_DIR, models=models_dir, engine=engine)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    flags, text = run.stdout.split("\n", 1)
    assert flags == "True 1 True 0"  # built with no TensorFlow, then taken, none left over
    assert text.rstrip("\n") == expected


def test_a_model_with_no_cached_conversion_or_on_tensorflow_is_not_preloaded(models_dir):
    import litert_engine

    # This process has TensorFlow already: preloading could no longer lower the peak.
    litert_engine.preload("tiny", models_dir, "float32", "litert")
    assert not litert_engine._PRELOADED
    code = (f"import sys; sys.path.insert(0, {SRC_DIR!r}); import litert_engine\n"
            f"litert_engine.preload('tiny', {models_dir!r}, 'float32', 'litert')\n"
            f"litert_engine.preload('tiny', {models_dir!r}, 'int8', 'tf')\n"
            f"litert_engine.preload('missing', {models_dir!r}, 'float32', 'litert')\n"
            "print(len(litert_engine._PRELOADED), 'tensorflow' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (run.returncode, run.stdout.strip()) == (0, "0 False")


def test_preloading_without_litert_installed_leaves_the_error_to_api_load(models_dir):
    import api

    api.load("tiny", models_dir, engine="litert", progress=False)  # a cached conversion to find
    code = (f"import sys; sys.path.insert(0, {SRC_DIR!r})\n"
            "sys.modules['ai_edge_litert'] = None  # as if the package were not installed\n"
            "from importlib import metadata\n"
            "known = metadata.version\n"
            "def version(name):\n"
            "    if name == 'ai-edge-litert':\n"
            "        raise metadata.PackageNotFoundError(name)\n"
            "    return known(name)\n"
            "metadata.version = version\n"
            "import errors, litert_engine\n"
            f"litert_engine.preload('tiny', {models_dir!r}, 'float32', 'litert')\n"
            "import api\n"
            "try:\n"
            f"    api.load('tiny', {models_dir!r}, engine='litert')\n"
            "except errors.UserError as e:\n"
            "    print(len(litert_engine._PRELOADED), e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("0 engine litert needs the package ai-edge-litert")


def test_released_pages_of_a_mapped_program_leave_the_process_and_no_other_mappings_do(tmp_path):
    import mmap

    import litert_engine

    path = tmp_path / "program.tflite"
    path.write_bytes(os.urandom(4 << 20))

    def mapped():
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def touch(view):  # reads one byte a page
        return sum(view[i] for i in range(0, len(view), 4096))

    other = mapped()  # as another interpreter's mapping of the same file
    checksum = touch(other)
    mine, pages = litert_engine.MappedPages.opened_by(str(path), mapped)
    assert touch(mine) == checksum and resident_kib(path) >= 2 * 4096
    pages.release()
    assert 4096 <= resident_kib(path) < 2 * 4096  # the other mapping keeps its pages
    assert touch(mine) == checksum  # read back from the file
    mine.close()
    other.close()


def resident_kib(path):
    """This process's resident KiB of the mappings of `path`, from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) > 5 and fields[5] == os.path.realpath(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_conversion_is_cached_and_redone_when_the_weights_change(models_dir, monkeypatch):
    import api
    import checkpoint
    import litert_convert

    first = api.load("tiny", models_dir, engine="litert", progress=False)
    folder = os.path.join(models_dir, "tiny", "litert")
    cached = glob.glob(os.path.join(folder, "*"))
    assert len(cached) == 1 and os.path.basename(cached[0]).startswith("float32-")

    def no_conversion(lm, int8=False, layers=None):
        raise AssertionError("converted again although the cache is current")

    with monkeypatch.context() as m:
        m.setattr(litert_convert, "convert", no_conversion)
        again = api.load("tiny", models_dir, engine="litert", progress=False)
    assert again.generate("Hi", 8, temperature=0) == first.generate("Hi", 8, temperature=0)

    # New weights in place: the old conversion is stale, replaced, and the text follows the new weights.
    from hparams import HParams
    data = glob.glob(os.path.join(models_dir, "tiny", "model.ckpt.data*"))[0]
    checkpoint.write_random_model(os.path.join(models_dir, "tiny"), HParams(**TINY_HPARAMS), seed=2, std=0.2)
    os.utime(data, ns=(1, 1))  # a different time written, even on a coarse clock
    fresh = api.load("tiny", models_dir, engine="litert", progress=False)
    now = glob.glob(os.path.join(folder, "*"))
    assert len(now) == 1 and now != cached
    reference = api.load("tiny", models_dir, engine="tf")
    assert fresh.generate("Hi", 8, temperature=0) == reference.generate("Hi", 8, temperature=0)


def test_a_model_past_one_flatbuffer_runs_as_programs_in_turn(tmp_path, monkeypatch):
    import api
    import checkpoint
    import decode
    import export
    import litert_engine
    import model
    from hparams import HParams
    from runtime import tf

    hp = HParams(**OTHER_HPARAMS)
    checkpoint.write_random_model(str(tmp_path / "m"), hp, seed=3, std=0.2)
    # A flatbuffer as small as the embeddings and one and a half float32 layers.
    embeddings, layer = (hp.n_vocab + hp.n_ctx) * hp.n_embd * 4, 12 * hp.n_embd ** 2 * 4
    monkeypatch.setattr(litert_engine, "FLATBUFFER_LIMIT", (embeddings + 1.5 * layer) / 0.95)
    assert litert_engine.split(hp, "float32") == [range(0, 1), range(1, 2), range(2, 3)]
    assert litert_engine.split(hp, "int8") == [range(0, 3)]
    assert api.choose_engine("auto", "float32", hp) == "tf"  # not measured split: auto keeps TensorFlow

    gpt = api.load("m", str(tmp_path), engine="litert", progress=False)
    names = sorted(os.listdir(tmp_path / "m" / "litert"))
    assert [n.split("-")[-1] for n in names] == ["1of3.tflite", "2of3.tflite", "3of3.tflite"]
    tf_engine = decode.Decoder(model.load_model("m", str(tmp_path)))
    tokens, pad = padded_prompts(hp.n_vocab, [5, 2])
    want, tf_state = tf_engine.prefill(tf.constant(tokens), tf.constant(pad), tf.constant(hp.n_ctx))
    got, state = gpt.engine.prefill(tokens, pad, hp.n_ctx)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    for pos, token in zip(range(5, 9), ([1, 2], [3, 4], [5, 6], [7, 8])):
        want, tf_state = tf_engine.step(tf.constant(token), tf.constant(pos), tf.constant(pad), tf_state)
        got, state = gpt.engine.step(np.array(token, np.int32), pos, pad, state)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    assert gpt.generate("Hi", 8, temperature=0) == api.load("m", str(tmp_path)).generate("Hi", 8, temperature=0)

    export.export("tflite", "m", str(tmp_path), out=str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["encoder.json", "gpt2-float32-1of3.tflite",
                                                    "gpt2-float32-2of3.tflite", "gpt2-float32-3of3.tflite",
                                                    "hparams.json", "vocab.bpe"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import litert_engine

    target = str(tmp_path / "litert" / "float32-x.tflite")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        litert_engine.write_program(b"abc", target)
    assert os.listdir(tmp_path / "litert") == []


def test_engine_choice_and_its_errors():
    import api
    from errors import UserError

    import hparams

    assert api.choose_engine("auto", "float32") == "litert"  # a CPU-only machine with LiteRT installed
    assert api.choose_engine("auto", "float32", hparams.SIZES["355M"]) == "litert"
    assert api.choose_engine("auto", "float32", hparams.SIZES["774M"]) == "tf"  # past a flatbuffer's 2 GB
    assert api.choose_engine("auto", "int8") == "litert"
    assert api.choose_engine("auto", "bfloat16") == "tf"
    assert api.choose_engine("tf", "float32") == "tf"
    for engine, dtype, message in [("tf", "int8", "int8 weights run on the LiteRT engine only"),
                                   ("litert", "bfloat16", "float32 or int8"), ("onnx", "float32", "engine must be"),
                                   ("litert", "float8", "dtype must be")]:
        with pytest.raises(UserError, match=message):
            api.choose_engine(engine, dtype)


def test_the_scripts_take_the_engine_flags(tiny_models_dir):
    bad = run_script("generate_unconditional_samples.py", "--model_name", "tiny", "--models_dir", tiny_models_dir,
                     "--engine", "tf", "--dtype", "int8", "--nsamples", "1", "--length", "2")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "use --engine litert" in bad.stderr
    texts = [run_script("generate_conditional_samples.py", "--prompt", "Hello", "--model_name", "tiny",
                        "--models_dir", tiny_models_dir, "--engine", engine, "--temperature", "0", "--length", "10")
             for engine in ("tf", "litert")]
    assert texts[0].returncode == 0 and texts[1].returncode == 0, texts[1].stderr
    assert texts[1].stdout == texts[0].stdout


def test_export_writes_a_program_a_bare_interpreter_runs_as_documented(models_dir, tmp_path, capsys):
    from ai_edge_litert.interpreter import Interpreter

    import export
    import litert_engine
    import model_files

    export.export("tflite", "tiny", models_dir, out=str(tmp_path / "out"))
    path = capsys.readouterr().out.strip()
    assert sorted(os.listdir(tmp_path / "out")) == ["encoder.json", "gpt2-float32.tflite", "hparams.json", "vocab.bpe"]
    # The README's contract, by input name: a prompt's rows beside an empty, masked one-slot cache.
    hp = TINY_HPARAMS
    it = Interpreter(model_path=path)
    runner = it.get_signature_runner()
    tokens = np.array([5, 6, 7], np.int32)
    empty = np.zeros([1, hp["n_head"], hp["n_embd"] // hp["n_head"], 1], np.float32)
    cache = {f"{kind}_{i}": empty for kind in ("keys", "values") for i in range(hp["n_layer"])}
    causal = np.where(np.tri(3, dtype=bool), 0, -1e10).astype(np.float32)
    out = runner(tokens=tokens, positions=np.arange(3, dtype=np.int32), own_bias=causal,
                 cache_bias=np.full([3, 1, 1, 1], -1e10, np.float32), out_rows=np.array([2], np.int32), **cache)
    assert out["output_0"].shape == (1, hp["n_vocab"])
    assert out["output_1"].shape == out["output_2"].shape == (hp["n_layer"], 3, hp["n_head"], 8)
    engine = litert_engine.Engine(path, model_files.load_hparams(os.path.join(models_dir, "tiny")))
    np.testing.assert_allclose(out["output_0"], engine.prefill(tokens[None], np.zeros([1], np.int32), 4)[0], atol=1e-6)


def test_export_rejects_an_unknown_format(models_dir):
    import export
    from errors import UserError

    with pytest.raises(UserError, match="format must be one of saved_model, tflite"):
        export.export("onnx", "tiny", models_dir, out="x")
