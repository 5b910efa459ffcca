"""Generation as a SavedModel: the whole sampling loop inside one graph, for TF Serving.

`GenerateModule` holds the weights and two signatures, which plain TensorFlow loads and runs
without this project's code:

- `serving_default(tokens, lengths, max_new_tokens, temperature, top_p, top_k, seed)`:
  tokens int32 [batch, time] right-padded, each row's length in `lengths` [batch]; the knobs
  are scalars (temperature 0 is greedy, top_k 0 and top_p 1 are off). Returns `output_ids`
  int32 [batch, max_new_tokens] and `logprobs` float32 [batch, max_new_tokens], each token's
  natural-log probability under the model's own distribution.
- `generate_with_controls`: the same, plus the generation controls that are scalars
  (repetition_penalty, presence_penalty, frequency_penalty, min_length).

The loop is `sample.Sampler`'s, so a seed gives the tokens `api.generate` gives for it.
"""
import decode
import encoder as encoder_lib
import model as model_lib
import processors
import sample
from runtime import tf

SCALAR_INT, SCALAR_FLOAT = tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32)
GENERATE_SIGNATURE = dict(tokens=tf.TensorSpec([None, None], tf.int32), lengths=tf.TensorSpec([None], tf.int32),
                          max_new_tokens=SCALAR_INT, temperature=SCALAR_FLOAT, top_p=SCALAR_FLOAT,
                          top_k=SCALAR_INT, seed=SCALAR_INT)
CONTROLS_SIGNATURE = dict(repetition_penalty=SCALAR_FLOAT, presence_penalty=SCALAR_FLOAT,
                          frequency_penalty=SCALAR_FLOAT, min_length=SCALAR_INT)


class GenerateModule(tf.Module):
    """The weights of a `model.GPT2` and the generation signatures over them.

    Args:
        lm: A `model.GPT2`.
        eot_token: The end-of-text id, which left padding is made of.
    """

    def __init__(self, lm, eot_token):
        super().__init__(name="gpt2")
        # Only the variables are tracked: the model's own tf.functions stay out of the SavedModel.
        self.weights = list(lm.weights.values())
        self.n_ctx = lm.hparams.n_ctx
        self.n_vocab = lm.hparams.n_vocab
        self.eot_token = eot_token
        self.sampler = sample.Sampler(decode.Decoder(lm), eot_token)
        self.generate = tf.function(self._generate, autograph=False, input_signature=list(GENERATE_SIGNATURE.values()))
        self.generate_with_controls = tf.function(
            self._generate_with_controls, autograph=False,
            input_signature=list(GENERATE_SIGNATURE.values()) + list(CONTROLS_SIGNATURE.values()))

    @classmethod
    def load(cls, model_name, models_dir, dtype="float32"):
        lm = model_lib.load_model(model_name, models_dir, dtype=dtype)
        return cls(lm, encoder_lib.Encoder.from_dir(lm.path).eot_token)

    def signatures(self):
        """The signatures `tf.saved_model.save` takes, inputs named as the module's docstring says."""
        return {"serving_default": self.generate.get_concrete_function(),
                "generate_with_controls": self.generate_with_controls.get_concrete_function()}

    def _generate(self, tokens, lengths, max_new_tokens, temperature, top_p, top_k, seed):
        left, pad = self._checked_left_padded(tokens, lengths, max_new_tokens, temperature, top_p, top_k)
        controls = processors.Controls().tensors(self.n_vocab)
        batch = tf.shape(tokens)[0]
        tally = processors.Tally(tf.zeros([batch, 0], tf.int32), tf.zeros([batch, 0], tf.bool),
                                 tf.zeros([batch, 0], tf.int32))
        return self._loop(left, pad, max_new_tokens, temperature, top_p, top_k, seed, controls, tally)

    def _generate_with_controls(self, tokens, lengths, max_new_tokens, temperature, top_p, top_k, seed,
                                repetition_penalty, presence_penalty, frequency_penalty, min_length):
        left, pad = self._checked_left_padded(tokens, lengths, max_new_tokens, temperature, top_p, top_k)
        checks = [tf.debugging.assert_greater(repetition_penalty, 0.0, "repetition_penalty must be > 0"),
                  tf.debugging.assert_less_equal(tf.abs(presence_penalty), 2.0, "presence_penalty must be -2 to 2"),
                  tf.debugging.assert_less_equal(tf.abs(frequency_penalty), 2.0, "frequency_penalty must be -2 to 2"),
                  tf.debugging.assert_non_negative(min_length, "min_length must be >= 0")]
        with tf.control_dependencies(checks):
            batch = tf.shape(tokens)[0]
        # Always on: at their neutral values the processors leave every logit exactly as it was.
        controls = processors.ControlTensors(
            tf.constant(True), repetition_penalty, presence_penalty, frequency_penalty,
            tf.zeros([self.n_vocab]), tf.zeros([0, 0], tf.int32), tf.zeros([0], tf.int32), min_length)
        where = tf.where(tf.range(tf.shape(left)[1])[None, :] >= pad[:, None])  # [m, 2]: (row, column) of prompt tokens
        seen = tf.stack([tf.cast(where[:, 0], tf.int32), tf.gather_nd(left, where)], axis=1)  # [m, 2]: (row, token)
        in_prompt = tf.tensor_scatter_nd_update(tf.zeros([batch, self.n_vocab], tf.bool), seen,
                                                tf.ones(tf.shape(seen)[:1], tf.bool))
        tally = processors.Tally(tf.zeros([batch, self.n_vocab], tf.int32), in_prompt, tf.zeros([batch, 0], tf.int32))
        return self._loop(left, pad, max_new_tokens, temperature, top_p, top_k, seed, controls, tally)

    def _checked_left_padded(self, tokens, lengths, max_new_tokens, temperature, top_p, top_k):
        """The prompts left-padded with end-of-text and each row's padding [batch], after checks
        that fail the call with a message (TF Serving answers those with a 400)."""
        time = tf.shape(tokens)[1]
        checks = [
            tf.debugging.assert_equal(tf.shape(lengths)[0], tf.shape(tokens)[0], "lengths needs one entry per row"),
            tf.debugging.assert_positive(lengths, "every prompt needs at least one token"),
            tf.debugging.assert_less_equal(lengths, time, "lengths must not exceed the tokens' width"),
            tf.debugging.assert_less_equal(tokens, self.n_vocab - 1, f"tokens must be ids below {self.n_vocab}"),
            tf.debugging.assert_non_negative(tokens, "tokens must be ids >= 0"),
            tf.debugging.assert_positive(max_new_tokens, "max_new_tokens must be >= 1"),
            tf.debugging.assert_less_equal(time + max_new_tokens - 1, self.n_ctx,
                                           f"the prompt and max_new_tokens must fit the window of {self.n_ctx} "
                                           "(time + max_new_tokens - 1 positions)"),
            tf.debugging.assert_non_negative(temperature, "temperature must be >= 0 (0 is greedy)"),
            tf.debugging.assert_positive(top_p, "top_p must be in (0, 1]"),
            tf.debugging.assert_less_equal(top_p, 1.0, "top_p must be in (0, 1]"),
            tf.debugging.assert_non_negative(top_k, "top_k must be >= 0 (0 is off)"),
        ]
        with tf.control_dependencies(checks):
            pad = time - lengths
        source = tf.range(time)[None, :] - pad[:, None]  # [batch, time]: each left-padded column's place in tokens
        left = tf.where(source >= 0, tf.gather(tokens, tf.maximum(source, 0), batch_dims=1), self.eot_token)
        return left, pad

    def _loop(self, left, pad, max_new_tokens, temperature, top_p, top_k, seed, controls, tally):
        s = self.sampler
        time = tf.shape(left)[1]
        knobs = sample.Knobs(temperature, top_k, top_p, tf.cast(seed, tf.int64), tf.constant(False), tf.constant(0))
        logits, state = s.prefill(left, pad, time + max_new_tokens - 1)
        done = tf.zeros([tf.shape(left)[0]], tf.bool)
        tokens, logits, state, done, tally, (own, _, _) = s.chunk_function(None)(
            logits, state, done, time, pad, max_new_tokens - 1, tf.constant(0), knobs, controls, tally)
        last, _, _, (last_own, _, _) = s.sample_last(logits, done, knobs, controls, tally, max_new_tokens - 1)
        # [steps, batch] -> [batch, steps] as float32 (exact for token ids): oneDNN takes an int32
        # Transpose only to log an error line and fall back.
        by_row = tf.cast(tf.transpose(tf.cast(tokens, tf.float32)), tf.int32)
        return {"output_ids": tf.concat([by_row, last], axis=1),
                "logprobs": tf.concat([tf.transpose(own), last_own], axis=1)}
