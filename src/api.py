"""The Python API the command-line scripts stand on.

>>> import api
>>> gpt = api.load("124M")                                    # doctest: +SKIP
>>> gpt.generate("The meaning of life is", length=20, seed=1)  # doctest: +SKIP
[' ...']
"""
import codecs

import numpy as np

import checkpoint
import decode
import encoder as encoder_lib
import hparams as hparams_lib
import litert_convert
import litert_engine
import model as model_lib
import model_files
import sample as sample_lib
import score as score_lib
import runtime
from errors import UserError
from runtime import tf


ENGINES = ("tf", "litert", "auto")


def choose_engine(engine, dtype, hparams=None):
    """The engine that runs `dtype`: 'tf' or 'litert'. 'auto' picks the faster one measured on
    the device: LiteRT on a CPU when it is installed and the model's program fits one flatbuffer
    (README.md has the figures), TensorFlow on a GPU and for bfloat16; int8 runs on LiteRT only."""
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if dtype not in ("float32", "fp32", "bfloat16", "bf16", "int8"):
        raise UserError(f"dtype must be float32, bfloat16 or int8, got {dtype!r}")
    if engine == "auto":
        fits = hparams is None or litert_engine.fits(hparams, dtype)
        on_cpu = not tf.config.list_physical_devices("GPU")
        lite = dtype == "int8" or (dtype in ("float32", "fp32") and on_cpu and fits and litert_engine.installed())
        engine = "litert" if lite else "tf"
    if engine == "tf" and dtype == "int8":
        raise UserError("int8 weights run on the LiteRT engine only: use engine litert (or auto), or dtype float32")
    if engine == "litert" and dtype in ("bfloat16", "bf16"):
        raise UserError("the LiteRT engine runs float32 or int8: use dtype float32 or int8, or engine tf")
    if engine == "litert" and not litert_engine.installed():
        raise UserError("engine litert needs the package ai-edge-litert: pip install -r requirements.txt, "
                        "or use engine tf")
    return engine


def load(model_name="124M", models_dir="models", dtype="float32", engine="tf", progress=True):
    """Loads a model directory, in the released format or Hugging Face's, with its encoder.

    Args:
        model_name: Directory name under `models_dir` (117M and 345M mean 124M and 355M).
        models_dir: Directory holding model directories.
        dtype: 'float32' (exact), 'bfloat16' (TensorFlow engine) or 'int8' (weights quantized,
            LiteRT engine).
        engine: 'tf', 'litert' (generation on LiteRT, converted once and cached in the model's
            directory) or 'auto' (LiteRT on a CPU when installed and the model fits, else TensorFlow).
        progress: Show a progress bar while converting for LiteRT.

    Returns:
        A `Model`.
    """
    runtime.configure_devices()
    path = hparams = None
    if engine == "auto":  # auto's choice depends on the model's size
        path = hparams_lib.model_dir(model_name, models_dir)
        hparams = model_files.load_hparams(path)
    if choose_engine(engine, dtype, hparams) == "tf":
        litert_engine.discard_preloaded()
        lm = model_lib.load_model(model_name, models_dir, dtype=dtype)
        return Model(lm, encoder_lib.Encoder.from_dir(lm.path))
    if hparams is None:
        path = hparams_lib.model_dir(model_name, models_dir)
        hparams = model_files.load_hparams(path)
    dtype = "float32" if dtype == "fp32" else dtype

    def load_lm():
        return model_lib.load_model(model_name, models_dir)

    program = litert_convert.cached_program(path, hparams, dtype, load_lm, progress=progress)
    return Model(None, encoder_lib.Encoder.from_dir(path), engine=litert_engine.Engine(program, hparams),
                 load_lm=load_lm, path=path)


class Model:
    """A loaded GPT-2 and its encoder: generate and stream text.

    With a LiteRT `engine`, generation runs on it, and the TensorFlow model (`lm`, which scoring,
    features and fine-tuning use) is loaded by `load_lm()` when first needed.
    """

    def __init__(self, lm, encoder, engine=None, load_lm=None, path=None):
        self._lm = lm
        self._load_lm = load_lm
        self.encoder = encoder
        self.engine = engine
        self.hparams = engine.hparams if engine else lm.hparams
        self.path = path or getattr(lm, "path", None)
        self._sampler = None

    @property
    def lm(self):
        if self._lm is None:
            self._lm = self._load_lm()
        return self._lm

    @property
    def sampler(self):
        if self._sampler is None:
            self._sampler = sample_lib.Sampler(self.engine or decode.Decoder(self.lm), self.eot_token)
        return self._sampler

    @property
    def eot_token(self):
        return self.encoder.eot_token

    def encode(self, text):
        return self.encoder.encode(text)

    def decode(self, tokens):
        return self.encoder.decode(tokens)

    def _contexts(self, prompts, truncate="error"):
        """Prompt strings or token sequences (lists, numpy arrays) -> token lists, fitted to the
        window by `sample.fit_prompt`; a single prompt becomes a batch of one."""
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        contexts = []
        for prompt in prompts:
            if isinstance(prompt, str):
                tokens = self.encode(prompt)
            else:
                tokens = np.asarray(prompt).tolist()
                if np.ndim(tokens) != 1 or not all(isinstance(t, int) and 0 <= t < self.hparams.n_vocab
                                                   for t in tokens):
                    raise UserError(f"a token prompt must be a list of token ids from 0 to {self.hparams.n_vocab - 1}")
            if not tokens:
                raise UserError("Prompt should not be empty!")
            contexts.append(sample_lib.fit_prompt(tokens, self.hparams.n_ctx, truncate))
        return contexts

    def stream(self, prompts, length=None, truncate="error", **options):
        """Generates text for each prompt, yielding `(row, text)` pieces as tokens are made.

        Args:
            prompts: A string, a list of strings (any lengths), or token lists.
            length: New tokens per row (default: half the window, as the interactive script).
                Past the window, the window slides (see `sample.TokenStream`).
            truncate: "error" (a prompt longer than the window raises) or "left" (only its
                last n_ctx tokens go in).
            temperature: Divides the logits; 0 is greedy.
            top_k: Keep the k most likely tokens (0: off).
            top_p: Keep the nucleus of probability p (1: off).
            seed: The same seed gives the same text.
            stop_at_eot: End a row at `<|endoftext|>` (not included in the text).
            stop: A string or list of strings that end a row (not included).
            repetition_penalty: CTRL's penalty on tokens of the prompt or the output (> 0; 1: off).
            presence_penalty: Subtracted once from tokens already generated (-2 to 2; 0: off).
            frequency_penalty: Subtracted per time a token was generated (-2 to 2; 0: off).
            logit_bias: {token id or one-token string: bias added to its logit}; -100 bans.
            bad_words: Strings (or token-id lists) never generated; a string is banned as it
                encodes and, unless it starts with a space, after a space too.
            min_length: No end-of-text before this many new tokens.

        The controls apply to the raw logits before temperature, top-k and top-p, in the order
        `processors.process` gives. Bad options raise here, before any text: this is not itself
        a generator.
        """
        tokens, rows = self._start(self._contexts(prompts, truncate), length, None, **options)
        return self._pieces(tokens, rows)

    def _start(self, contexts, length, logprobs, *, temperature=1.0, top_k=0, top_p=1.0, seed=None,
               stop_at_eot=False, stop=None, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
               logit_bias=None, bad_words=None, min_length=0):
        """The token stream of `stream`'s options, and a `RowText` per row."""
        if length is None:
            length = self.hparams.n_ctx // 2
        tokens = self.sampler.generate(contexts, length, temperature=temperature, top_k=top_k, top_p=top_p,
                                       seed=seed, stop_at_eot=stop_at_eot, logprobs=logprobs,
                                       repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                       frequency_penalty=frequency_penalty, logit_bias=self._bias_ids(logit_bias),
                                       bad_words=bad_word_ids(self.encoder, bad_words), min_length=min_length)
        return tokens, [RowText(self.encoder, stop, stop_at_eot) for _ in contexts]

    def _bias_ids(self, logit_bias):
        """logit_bias with its string keys as their token ids."""
        if not isinstance(logit_bias, dict):
            return logit_bias  # the sampler says what it takes
        biases = {}
        for key, value in logit_bias.items():
            if isinstance(key, str):
                tokens = self.encode(key)
                if len(tokens) != 1:
                    raise UserError(f"logit_bias must map strings of one token; {key!r} is {len(tokens)} tokens "
                                    "(give token ids, or ban it with bad_words)")
                key = tokens[0]
            biases[key] = value
        return biases

    @staticmethod
    def _pieces(tokens, rows):
        for chunk in tokens:
            for r, row in enumerate(rows):
                piece = row.feed(chunk[r])
                if row.finished:
                    tokens.stop([r])
                if piece:
                    yield r, piece
        for r, row in enumerate(rows):
            piece = row.finish()
            if piece:
                yield r, piece

    def _token_pieces(self, tokens, rows, records):
        """As `_pieces`, a token at a time, recording each token that makes it into a row's text."""
        for chunk in tokens:
            for r, row in enumerate(rows):
                for j, token in enumerate(chunk[r]):
                    if row.finished:
                        break
                    ends_row = row.ends_at(token)
                    piece = row.feed([token])
                    if not ends_row:
                        records.add(r, token, *(part[r, j] for part in tokens.logprobs))
                    if piece:
                        yield r, piece
                if row.finished:
                    tokens.stop([r])
        for r, row in enumerate(rows):
            piece = row.finish()
            if piece:
                yield r, piece

    def score(self, texts, stride=None, batch_size=8):
        """Scores texts: for each, a dict of tokens, nll (mean nats/token), perplexity,
        bits_per_byte and token_logprobs (natural log, one per token). A single string gives a
        single dict. Texts longer than the window use a sliding window moving by `stride`."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not all(texts):
            raise UserError("cannot score an empty text")
        token_lists = [self.encode(t) for t in texts]
        scored = score_lib.score_tokens(self.lm, token_lists, self.eot_token, stride=stride, batch_size=batch_size)
        reports = [dict(score_lib.summarize(t, toks, lps), token_logprobs=lps)
                   for t, toks, lps in zip(texts, token_lists, scored)]
        return reports[0] if single else reports

    def features(self, text, layers=None):
        """Hidden states of a text, numpy [tokens, n_embd] per layer.

        Args:
            text: A string (or a token list).
            layers: Indices into the n_layer + 1 states (0: embeddings, n_layer: the final,
                normalised output); default: only the final one. Negative indices count from the end.

        Returns:
            One array for a single int `layers`, else a list of arrays.
        """
        tokens = self._contexts(text)[0]
        if len(tokens) > self.hparams.n_ctx:
            raise UserError(f"the text is {len(tokens)} tokens; features take at most {self.hparams.n_ctx}")
        states = self.lm.hidden_states([tokens])
        picked = [-1] if layers is None else [layers] if isinstance(layers, int) else list(layers)
        out = [states[i].numpy()[0] for i in picked]
        return out[0] if layers is None or isinstance(layers, int) else out

    def fine_tune(self, dataset, steps, *, batch_size=1, learning_rate=None, optimizer="adam",
                  accumulate_gradients=1, memory_saving_gradients=False, only_train_transformer_layers=False,
                  noise=0.0, combine=50000, encoding="utf-8", run_dir=None, save_every=0, seed=None, log=None):
        """Fine-tunes this model in place (what `generate` and `score` use afterwards) for `steps`
        updates, with the options of train.py.

        Args:
            dataset: A path (file, directory, glob, encode.py .npz) or a list of texts, each one
                document (separated by <|endoftext|>).
            steps: Updates to make.
            learning_rate: The step size; None: 2e-5 for "adam" and "sgd", the paper's relative
                step for "adafactor" (as train.py's --learning_rate).
            run_dir: Also save there as train.py does (a model directory; resumable with
                train.py --restore_from latest); None saves nothing: call `save` when done.
            save_every: Save to run_dir every this many steps too (0: only at the end).
            seed: Seeds the data order and noise.
            log: A file for the `[step | seconds] loss=.. avg=..` lines (default: none).

        Returns:
            The loss of each step.
        """
        import io

        # Only fine-tuning needs these; they stay out of the sampling scripts' start-up.
        import dataset as dataset_lib
        import finetune
        import runs
        import trainer as trainer_lib

        if self.lm.compute_dtype != tf.float32:
            raise UserError("fine-tuning needs the float32 model: load it with dtype='float32'")
        if isinstance(dataset, str):
            chunks = dataset_lib.load_dataset(self.encoder, dataset, combine, encoding, progress=False)
        else:
            documents = [dataset_lib.encode_document(self.encoder, text) for text in dataset if text]
            if not documents:
                raise UserError("the dataset holds no text")
            chunks = [dataset_lib.join_documents(documents, self.eot_token)]
        seed = sample_lib.new_seed(seed)
        data = dataset_lib.TokenSampler(chunks, seed=seed)
        strategy = tf.distribute.get_strategy()
        trainer = trainer_lib.Trainer(self.lm, strategy, optimizer=optimizer, learning_rate=learning_rate,
                                      accumulate_gradients=accumulate_gradients,
                                      memory_saving_gradients=memory_saving_gradients,
                                      only_train_transformer_layers=only_train_transformer_layers, noise=noise,
                                      seed=seed)
        if run_dir is not None:
            runs.prepare(run_dir, self._vocab_dir(), self.hparams)
        schedule = finetune.Schedule(batch_size=batch_size, sample_every=0, save_every=save_every,
                                     max_steps=steps)
        return finetune.fine_tune(trainer, self.encoder, data, run_dir, schedule, out=log or io.StringIO())

    def save(self, path):
        """Writes this model as a model directory in the released format (checkpoint, hparams.json,
        encoder.json, vocab.bpe): load it with `api.load(name, models_dir)` or any script."""
        weights = {name: tf.cast(w, tf.float32).numpy() for name, w in self.lm.checkpoint_weights().items()}
        return checkpoint.write_model_dir(path, self.hparams, weights, vocab_dir=self._vocab_dir())

    def _vocab_dir(self):
        """Where this model's encoder.json and vocab.bpe are (every GPT-2 size shares one vocabulary)."""
        return self.path or encoder_lib.default_vocab_dir()

    def generate(self, prompts, length=None, logprobs=None, truncate="error", **options):
        """Like `stream`, but returns the finished texts: a list, one per prompt (a string for a
        single string prompt).

        With `logprobs` N, each text comes as a dict instead: {"prompt", "text", "tokens"}, with
        one {"id", "text", "logprob", "top_logprobs"} per token of the text: its natural-log
        probability under the model's own distribution (before the controls and filters) and
        the N likeliest tokens as [text, logprob] pairs (none for 0).
        """
        contexts = self._contexts(prompts, truncate)
        texts = [""] * len(contexts)
        tokens, rows = self._start(contexts, length, logprobs, **options)
        if logprobs is None:
            pieces = self._pieces(tokens, rows)
        else:
            records = TokenRecords(self.encoder, len(contexts))
            pieces = self._token_pieces(tokens, rows, records)
        for r, piece in pieces:
            texts[r] += piece
        if logprobs is not None:
            prompt_texts = [prompts] if isinstance(prompts, str) else [self.decode(c) for c in contexts]
            texts = [dict(prompt=p, text=t, tokens=kept) for p, t, kept in zip(prompt_texts, texts, records.rows)]
        return texts[0] if isinstance(prompts, str) else texts


def bad_word_ids(encoder, bad_words):
    """bad_words with each string as its tokens, and as its tokens after a space (as `generate`
    takes them); anything else is left for `processors.Controls.check` to judge."""
    if isinstance(bad_words, str):
        bad_words = [bad_words]
    if not isinstance(bad_words, (list, tuple)):
        return bad_words
    words = []
    for word in bad_words:
        if not isinstance(word, str):
            words.append(word)
            continue
        if not encoder.encode(word):
            raise UserError(f"bad_words must be strings of at least one token, got {word!r}")
        words += [encoder.encode(w) for w in dict.fromkeys([word] if word[0].isspace() else [word, " " + word])]
    return words


class TokenRecords:
    """Each row's tokens with their log-probabilities, as `generate(logprobs=N)` returns them."""

    def __init__(self, encoder, n_rows):
        self._encoder = encoder
        self.rows = [[] for _ in range(n_rows)]

    def add(self, row, token, logprob, top, top_ids):
        text = self._encoder.decode
        self.rows[row].append(dict(id=int(token), text=text([int(token)]), logprob=float(logprob),
                                   top_logprobs=[[text([int(i)]), float(v)] for i, v in zip(top_ids, top)]))


class RowText:
    """Turns one row's tokens into text as they arrive: whole UTF-8 characters only, cut at the
    first stop string, holding back text that could still become one."""

    def __init__(self, encoder, stop, stop_at_eot):
        if isinstance(stop, str):
            stop = [stop]
        self._stops = [s for s in (stop or []) if s]
        if stop is not None and not all(isinstance(s, str) for s in stop):
            raise UserError("stop must be a string or a list of strings")
        self._encoder = encoder
        self._stop_at_eot = stop_at_eot
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._emitted = 0
        self.finished = False

    @property
    def offset(self):
        """Where the next token's text begins in the row's text: the characters decoded so far."""
        return len(self._text)

    def ends_at(self, token):
        """Whether `token` ends the row without being part of its text (end-of-text)."""
        return self._stop_at_eot and int(token) == self._encoder.eot_token

    def feed(self, tokens):
        if self.finished:
            return ""
        tokens = [int(t) for t in tokens]
        if self._stop_at_eot and self._encoder.eot_token in tokens:
            tokens = tokens[:tokens.index(self._encoder.eot_token)]
            self.finished = True
        self._text += self._utf8.decode(self._encoder.decode_bytes(tokens), final=self.finished)
        return self._take()

    def finish(self):
        if not self.finished:
            self._text += self._utf8.decode(b"", final=True)
            self.finished = True
        return self._take()

    def _take(self):
        hits = [i for i in (self._text.find(s, max(0, self._emitted - len(s))) for s in self._stops) if i >= 0]
        if hits:
            self._text = self._text[:min(hits)]
            self.finished = True
        end = len(self._text)
        if not self.finished:
            end -= self._held_back()
        piece = self._text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return piece

    def _held_back(self):
        """Length of the longest end of the text that begins some stop string."""
        longest = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(self._text)), longest, -1):
                if self._text.endswith(s[:n]):
                    longest = n
                    break
        return longest
