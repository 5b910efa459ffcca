"""The fine-tuning computation: loss, compiled training step, gradient accumulation, devices.

Every step goes through a tf.distribute strategy, the default one on a single device, so one
code path serves a CPU, one GPU, the GPUs of a machine (mirrored) and several machines
(multi-worker, configured by TF_CONFIG).
"""

import checkpoint
import lora as lora_lib
import model as model_lib
import optimizers
from errors import UserError
from runtime import tf

STRATEGIES = ("default", "mirrored", "multi_worker")
PRECISIONS = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def make_strategy(name):
    """The tf.distribute strategy called `name` (one of STRATEGIES)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise UserError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def parse_precision(precision, flag="precision"):
    if precision not in PRECISIONS:
        raise UserError(f"{flag} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def build_model(hparams, weights, strategy, precision="float32", lora=None, adapters=None, seed=0, base_dtype=None):
    """A GPT2 with float32 variables (mirrored when the strategy has several devices); with a
    `lora.Config`, a `lora.LoraGPT2` whose `adapters` (default: fresh ones, seeded) are what trains,
    its frozen matrices stored in `base_dtype` (a name of `lora.BASE_DTYPES`, default `lora.BASE_DTYPE`)."""
    if lora is None and base_dtype not in (None, "float32"):
        raise UserError("base_dtype is for the frozen weights of LoRA: give lora_rank too (without LoRA every "
                        "weight trains, in float32)")
    with strategy.scope():
        if lora is not None:
            return lora_lib.LoraGPT2(hparams, weights, lora, adapters=adapters, seed=seed,
                                     compute_dtype=parse_precision(precision),
                                     base_dtype=lora_lib.parse_base_dtype(base_dtype or lora_lib.BASE_DTYPE))
        return model_lib.GPT2(hparams, weights, compute_dtype=parse_precision(precision), float32_variables=True)


# Options only one optimizer takes: option -> (that optimizer, its keyword).
OPTIMIZER_OPTIONS = {"adafactor_beta1": ("adafactor", "beta1"),
                     "adafactor_clip_threshold": ("adafactor", "clip_threshold")}


def optimizer_keywords(name, **options):
    """UserErrors for an unknown optimizer and for options of another one; returns the keywords
    of the optimizer's class for the `options` given (OPTIMIZER_OPTIONS, None: not given)."""
    if name not in optimizers.OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(optimizers.OPTIMIZERS)}, got {name!r}")
    kwargs = {}
    for option, value in options.items():
        owner, keyword = OPTIMIZER_OPTIONS[option]
        if value is None:
            continue
        if owner != name:
            raise UserError(f"{option} must not be given with optimizer {name!r}: it is an option of {owner} "
                            f"(drop it, or use optimizer {owner})")
        kwargs[keyword] = value
    if "beta1" in kwargs and not (isinstance(kwargs["beta1"], (int, float)) and 0 <= kwargs["beta1"] < 1):
        raise UserError(f"adafactor_beta1 must be in [0, 1) (0: no first moment), got {kwargs['beta1']!r}")
    if "clip_threshold" in kwargs and not (isinstance(kwargs["clip_threshold"], (int, float))
                                           and kwargs["clip_threshold"] > 0):
        raise UserError(f"adafactor_clip_threshold must be a number > 0, got {kwargs['clip_threshold']!r}")
    return kwargs


def make_optimizer(name, variables, learning_rate=None, compute_dtype=tf.float32, **options):
    """The optimizer `name` over `variables`. learning_rate None: the fork's 2e-5 for Adam and SGD,
    the paper's relative step for Adafactor. `options` as `optimizer_keywords` takes them."""
    kwargs = optimizer_keywords(name, **options)
    if name == "adafactor":
        transposed = [v.name.split(":")[0] for v in variables
                      if v.name.split(":")[0].endswith("/w") and checkpoint.is_transposed(compute_dtype)]
        return optimizers.Adafactor(variables, learning_rate, transposed=transposed, **kwargs)
    return optimizers.OPTIMIZERS[name](variables, 2e-5 if learning_rate is None else learning_rate)


def xla_suits(compute_dtype):
    """Whether XLA speeds up training in `compute_dtype`: its CPU backend multiplies 16-bit
    matrices no faster than float32 ones, where oneDNN's kernels run bfloat16 at twice the rate."""
    return compute_dtype == tf.float32 or bool(tf.config.list_logical_devices("GPU"))


def loss_of(lm, tokens, inputs=None, recompute=False):
    """Mean next-token cross-entropy over tokens [B, T], predicting tokens[:, 1:] from `inputs`
    (default: the tokens themselves)."""
    logits = lm.training_logits(tokens if inputs is None else inputs, recompute=recompute, skip_last=True)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tokens[:, 1:], logits=logits))


def add_noise(tokens, p, n_vocab, seed):
    """Replaces each token by a uniformly random one with probability p (the fork's --noise)."""
    replace = tf.random.stateless_uniform(tf.shape(tokens), seed) < p
    random = tf.random.stateless_uniform(tf.shape(tokens), seed + 1, minval=0, maxval=n_vocab, dtype=tf.int32)
    return tf.where(replace, random, tokens)


class Trainer:
    """Trains `lm` (built by `build_model` under `strategy`) on batches of token windows.

    Args:
        lm: A `model.GPT2` whose variables were created in `strategy.scope()` (a `lora.LoraGPT2`: only
            its adapters train).
        strategy: The tf.distribute strategy; batches are split evenly across its replicas.
        optimizer: 'adam', 'sgd' or 'adafactor'.
        learning_rate: The optimizer's step size (see `make_optimizer` for None).
        optimizer_options: OPTIMIZER_OPTIONS for the optimizer, by name.
        accumulate_gradients: Batches whose gradients are averaged into each update.
        memory_saving_gradients: Recompute each block's activations during backprop.
        only_train_transformer_layers: Train the blocks only, not embeddings or the final norm.
        noise: Probability of replacing each input token by a random one.
        seed: Seeds the noise.
        xla: Compile the training step with XLA, which fuses the elementwise work between the
            matrix products (faster after seconds of compiling).
            Single device only, not with memory_saving_gradients (XLA would merge the
            recomputation away), and not for 16-bit precisions on a CPU (see `xla_suits`).
    """

    def __init__(self, lm, strategy, optimizer="adam", learning_rate=None, accumulate_gradients=1,
                 memory_saving_gradients=False, only_train_transformer_layers=False, noise=0.0, seed=0, xla=True,
                 optimizer_options=None):
        self.lm, self.strategy = lm, strategy
        self.accumulate = int(accumulate_gradients)
        self.recompute = bool(memory_saving_gradients)
        self.noise, self.seed = float(noise), int(seed)
        # Under LoRA only the adapters train (all of them inside the blocks).
        trainable = lm.adapters if isinstance(lm, lora_lib.LoraGPT2) else lm.weights
        self.variables = [v for name, v in trainable.items()
                          if not only_train_transformer_layers or name.startswith("model/h")]
        self.fp16 = lm.compute_dtype == tf.float16
        with strategy.scope():
            self.optimizer = make_optimizer(optimizer, self.variables, learning_rate, lm.compute_dtype,
                                            **(optimizer_options or {}))
            # float16 gradients underflow: the loss is scaled up and the scale halved on overflow.
            self.loss_scale = tf.Variable(2.0 ** 15 if self.fp16 else 1.0, trainable=False, name="loss_scale")
            self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")
            self.sums = ([tf.Variable(tf.zeros(v.shape), trainable=False) for v in self.variables]
                         if self.accumulate > 1 else [])
        # A compiled cluster sits on one device, so it cannot reach mirrored copies on others.
        self.xla = (bool(xla) and not self.recompute and strategy.num_replicas_in_sync == 1
                    and xla_suits(lm.compute_dtype))
        # The whole step compiles, optimizer update included, so gradients need not all be held at once.
        self._step = tf.function(self._train_step, autograph=False, jit_compile=self.xla or None)
        self._accumulate = tf.function(self._accumulate_step, autograph=False, jit_compile=self.xla or None)
        self._apply_sums = tf.function(self._apply_accumulated, autograph=False)
        self._eval = tf.function(self._eval_step, autograph=False)

    # --- per replica ---------------------------------------------------------------------

    def _replica_gradients(self, tokens, seed):
        inputs = add_noise(tokens, self.noise, self.lm.hparams.n_vocab, seed) if self.noise > 0 else tokens
        with tf.GradientTape() as tape:
            loss = loss_of(self.lm, tokens, inputs, recompute=self.recompute)
            scaled = loss * self.loss_scale if self.fp16 else loss
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(scaled, self.variables)]
        if self.fp16:
            grads = [g / self.loss_scale for g in grads]
        return loss, grads

    # --- compiled steps (cross-replica) --------------------------------------------------

    def _gradients(self, tokens, seed):
        loss, grads = self.strategy.run(self._replica_gradients, args=(tokens, seed))
        # Averaged across replicas into mirrored values, one copy beside each copy of the variable.
        grads = self.strategy.extended.batch_reduce_to(
            tf.distribute.ReduceOp.MEAN, list(zip(grads, self.variables)))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, loss, axis=None), grads

    def _train_step(self, tokens, seed):
        loss, grads = self._gradients(tokens, seed)
        self._apply(grads)
        return loss

    def _accumulate_step(self, tokens, seed):
        loss, grads = self._gradients(tokens, seed)
        for total, grad in zip(self.sums, grads):
            self.strategy.extended.update(total, lambda t, g: t.assign_add(g), args=(grad,), group=False)
        return loss

    def _apply_accumulated(self):
        grads = [total / self.accumulate for total in self.sums]
        self._apply(grads)
        for total in self.sums:
            total.assign(tf.zeros_like(total))

    def _apply(self, grads):
        if not self.fp16:
            self.optimizer.apply(grads, self.variables)
            return
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(self.strategy.experimental_local_results(g)[0]))
                                for g in grads])

        def step():
            self.optimizer.apply(grads, self.variables)
            self.good_steps.assign_add(1)
            # After a run of good steps, try a larger scale again.
            grow = self.good_steps >= 2000
            self.loss_scale.assign(tf.where(grow, self.loss_scale * 2, self.loss_scale))
            self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), self.good_steps))
            return tf.constant(True)

        def skip():
            self.loss_scale.assign(tf.maximum(self.loss_scale / 2, 1.0))
            self.good_steps.assign(0)
            return tf.constant(False)

        tf.cond(finite, step, skip)

    def _eval_step(self, tokens):
        losses = self.strategy.run(lambda t: loss_of(self.lm, t), args=(tokens,))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)

    # --- public --------------------------------------------------------------------------

    def check_batch_size(self, batch_size):
        """A UserError unless `batch_size` rows split evenly across the replicas."""
        replicas = self.strategy.num_replicas_in_sync
        if batch_size % replicas:
            raise UserError(f"batch_size ({batch_size}) must be a multiple of the {replicas} devices in use")

    def distribute(self, batch):
        """Splits a numpy batch [B, T] into equal parts, one per replica."""
        self.check_batch_size(len(batch))
        part = len(batch) // self.strategy.num_replicas_in_sync
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(batch[ctx.replica_id_in_sync_group * part:][:part], tf.int32))

    def train_step(self, batches, step):
        """One update from `accumulate_gradients` batches (a list of numpy [B, T]); the mean loss."""
        if len(batches) != self.accumulate:
            raise ValueError(f"expected {self.accumulate} batches, got {len(batches)}")
        seeds = [tf.constant([self.seed, step * self.accumulate + i], tf.int64) for i in range(len(batches))]
        with self.strategy.scope():
            if self.accumulate == 1:
                return float(self._step(self.distribute(batches[0]), seeds[0]))
            losses = [float(self._accumulate(self.distribute(b), s)) for b, s in zip(batches, seeds)]
            self._apply_sums()
        return sum(losses) / len(losses)

    def evaluate(self, batch):
        """Mean loss of a numpy batch [B, T], without training."""
        with self.strategy.scope():
            return float(self._eval(self.distribute(batch)))
