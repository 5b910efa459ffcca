"""LoRA (Hu et al. 2021): low-rank adapters trained beside frozen weights.

A target matrix W [in, out] reads as W + (alpha / rank) A B, with A [in, rank] random and
B [rank, out] zero at the start, so training starts from the model itself; only A and B train.
A save merges A B into W, so it is a checkpoint in the released format that every script
loads; the run directory keeps the adapters too (`runs`), so a run resumes from them.
"""
import collections.abc
import dataclasses
import math

import checkpoint
import model
from errors import UserError
from runtime import tf

# The dense projections of a block that can take adapters, by their scope under model/h{i}/.
TARGETS = tuple(scope for field, scope in checkpoint.BLOCK_SCOPES.items() if "/" in scope)
FIELDS = {scope: field for field, scope in checkpoint.BLOCK_SCOPES.items()}
ALPHA = "lora/alpha"  # the adapters' bundle keeps alpha under this name beside them
BASE_DTYPES = {"bfloat16": tf.bfloat16, "float32": tf.float32}
BASE_DTYPE = "bfloat16"  # the frozen weights' default: half float32's memory


def adapter_names(scope_prefix):
    """The names of the two factors of the matrix `scope_prefix`/w (as 'model/h0/attn/c_attn')."""
    return f"{scope_prefix}/lora_a", f"{scope_prefix}/lora_b"


def parse_targets(targets):
    """A tuple of TARGETS from a comma-separated string or a list of them."""
    names = targets.split(",") if isinstance(targets, str) else list(targets or ())
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise UserError(f"lora_targets must be a comma-separated list of {', '.join(TARGETS)}, got {targets!r}")
    return tuple(t for t in TARGETS if t in names)


def parse_base_dtype(name):
    """tf.bfloat16 or tf.float32 from its name, the dtype frozen weights are stored in."""
    if name not in BASE_DTYPES:
        raise UserError(f"base_dtype must be one of {', '.join(BASE_DTYPES)}, got {name!r}")
    return BASE_DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Config:
    """What adapters a model takes: their rank, alpha (scale alpha / rank; default alpha = rank,
    a scale of 1) and target matrices."""

    rank: int
    alpha: float = None
    targets: tuple = TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise UserError(f"lora_rank must be a whole number >= 1, got {self.rank!r}")
        alpha = self.rank if self.alpha is None else self.alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise UserError(f"lora_alpha must be a number > 0, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def scale(self):
        return self.alpha / self.rank

    @classmethod
    def of_adapters(cls, adapters):
        """The Config that saved `adapters` (name -> value, with ALPHA)."""
        factors = [n for n in adapters if n.endswith("/lora_a")]
        targets = {n.split("/", 2)[2].rsplit("/", 1)[0] for n in factors}
        return cls(int(adapters[factors[0]].shape[-1]), float(adapters[ALPHA]), tuple(sorted(targets)))


def initial_adapters(hparams, config, seed=0):
    """Fresh adapters: A uniform in +-1/sqrt(in) (as peft initialises it), B zero."""
    shapes = checkpoint.variable_shapes(hparams)
    adapters = {}
    for i in range(hparams.n_layer):
        for j, scope in enumerate(config.targets):
            prefix = f"model/h{i}/{scope}"
            _, n_in, n_out = shapes[prefix + "/w"]
            a, b = adapter_names(prefix)
            bound = 1 / math.sqrt(n_in)
            adapters[a] = tf.random.stateless_uniform([n_in, config.rank], [seed, i * len(TARGETS) + j],
                                                      minval=-bound, maxval=bound)
            adapters[b] = tf.zeros([config.rank, n_out])
    adapters[ALPHA] = tf.constant(config.alpha)
    return adapters


def delta(a, b, scale):
    """The merged adapters' change of a matrix, [in, out] float32 (the released layout less its leading 1)."""
    return scale * tf.matmul(a, b)


class ChangedWeights(collections.abc.Mapping):
    """Float32 weights in the released layout with each target matrix moved by `sign` times its
    adapters' change (+1 merges them in, -1 takes them out), read one at a time as
    `checkpoint.CheckpointWeights` is, so a save or a resume never holds a second copy of the model."""

    def __init__(self, weights, adapters, sign):
        self.weights, self.adapters, self.sign = weights, adapters, sign
        self.config = Config.of_adapters(adapters)
        self.shapes = getattr(weights, "shapes", None) or {n: list(w.shape) for n, w in weights.items()}

    def __getitem__(self, name):
        value = tf.convert_to_tensor(self.weights[name], tf.float32)
        a, b = adapter_names(name[:-len("/w")])
        if name.endswith("/w") and a in self.adapters:
            value += self.sign * delta(self.adapters[a], self.adapters[b], self.config.scale)[None]
        return value

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


class MergedWeights(ChangedWeights):
    """What a save holds: the base weights with the adapters' change merged in."""

    def __init__(self, base, adapters):
        super().__init__(base, adapters, +1)


class UnmergedWeights(ChangedWeights):
    """The base weights under a merged save: each target matrix less its adapters' change."""

    def __init__(self, merged, adapters):
        super().__init__(merged, adapters, -1)


class _VariablesAsSaved(collections.abc.Mapping):
    """A model's variables in the released layout, converted one at a time on lookup."""

    def __init__(self, variables, compute_dtype, shapes):
        self.variables, self.compute_dtype, self.shapes = variables, compute_dtype, shapes

    def __getitem__(self, name):
        return checkpoint.to_checkpoint_layout(name, self.variables[name], self.compute_dtype)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


class LoraGPT2(model.GPT2):
    """A GPT2 whose weights are frozen and whose target matrices read through trainable adapters.

    Args:
        hparams, weights, compute_dtype: As `model.GPT2`'s.
        config: A `Config`.
        adapters: Name -> value of adapters to start from (a resumed run's); default fresh ones.
        seed: Seeds fresh adapters.
        base_dtype: What the frozen matrices are stored in: tf.float32 (exact), or tf.bfloat16 (half
            the memory; the model trains on the weights rounded to bfloat16). Saves merge the
            adapters into float32 weights either way: a 16-bit model reads those again from
            `weights`, one tensor at a time, which must stay readable until the next save (`rebase`).
    """

    def __init__(self, hparams, weights, config, adapters=None, seed=0, compute_dtype=tf.float32,
                 base_dtype=tf.float32):
        super().__init__(hparams, weights, compute_dtype=compute_dtype, trainable=False, matrix_dtype=base_dtype)
        self.config = config
        self.base_dtype = tf.as_dtype(base_dtype)
        # Rounded matrices cannot give back the float32 weights a save merges into, so those are read again.
        self.base = None if self.base_dtype == tf.float32 else weights
        values = adapters if adapters is not None else initial_adapters(hparams, config, seed)
        self.adapters = {name: tf.Variable(tf.cast(values[name], tf.float32), trainable=True, name=name)
                         for name in values if name != ALPHA}
        # Which layer a block of variables is, so `read_block` finds its adapters.
        self.layer_of = {id(block.ln_1.g): i for i, block in enumerate(self.layers.blocks)}

    def adapted(self, prefix, w):
        """Matrix variable `w` of scope `prefix` plus its adapters' change, float32 in the model's layout."""
        a, b = adapter_names(prefix)
        change = delta(self.adapters[a], self.adapters[b], self.config.scale)
        if checkpoint.is_transposed(self.compute_dtype):
            change = tf.transpose(change)
        return tf.cast(w, tf.float32) + change

    def read_block(self, p):
        block = super().read_block(p)
        layer = self.layer_of[id(p.ln_1.g)]
        replaced = {}
        for scope in self.config.targets:
            field = FIELDS[scope]
            w = self.adapted(f"model/h{layer}/{scope}", getattr(p, field).w)
            replaced[field] = checkpoint.Dense(tf.cast(w, self.compute_dtype), getattr(block, field).b)
        return block._replace(**replaced)

    def recomputed_block(self, h, p, mask):
        # The merges depend on variables alone, so the executor would make every block's at once, up front.
        with tf.control_dependencies([h]):
            return super().recomputed_block(h, p, mask)

    def checkpoint_weights(self):
        """The merged weights in the released layout, float32, computed one tensor at a time on
        lookup: what a save holds, and what every script loads."""
        base = self.base if self.base is not None else _VariablesAsSaved(self.weights, self.compute_dtype,
                                                                          checkpoint.variable_shapes(self.hparams))
        return MergedWeights(base, self.adapter_values())

    def rebase(self, merged, adapters):
        """Reads the float32 base weights of later saves from `merged`, a save of this model with
        `adapters` merged in (so the weights it started from may go: rotated out of a run)."""
        if self.base is not None:
            self.base = UnmergedWeights(merged, adapters)

    def adapter_values(self):
        """The adapters as a save keeps them, alpha included."""
        values = {name: v.read_value() for name, v in self.adapters.items()}
        values[ALPHA] = tf.constant(self.config.alpha)
        return values
