"""Adam and SGD as the fine-tuning fork ran them (TF1's AdamOptimizer and GradientDescentOptimizer),
and Adafactor (Shazeer & Stern 2018), whose factored second moments take a row and a column per
matrix instead of Adam's two full copies of the weights.

Adam and SGD update through TensorFlow's fused kernels (one pass over each variable, where composing
the update from elementwise ops would make several). Every update goes through the distribution
strategy's `update`, so mirrored variables get the same step on every device.
"""
from runtime import tf


class SGD(tf.Module):
    """Plain gradient descent: var -= learning_rate * grad. Build it in the strategy's scope."""

    def __init__(self, variables, learning_rate):
        super().__init__(name="sgd")
        self.learning_rate = float(learning_rate)
        # Built in the strategy's scope; updates go through that strategy, whatever scope applies them.
        self.strategy = tf.distribute.get_strategy()
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.slots = {}

    def apply(self, grads, variables):
        """Applies one step; `grads` are mirrored values (or tensors) matching `variables`."""
        strategy = self.strategy
        lr = tf.constant(self.learning_rate, tf.float32)
        for var, grad in zip(variables, grads):
            strategy.extended.update(var, self._update, args=(grad, lr), group=False)
        self.iterations.assign_add(1)

    @staticmethod
    def _update(var, grad, lr):
        return tf.raw_ops.ResourceApplyGradientDescent(var=var.handle, alpha=lr, delta=grad)


class Adam(tf.Module):
    """Adam with TF1's defaults (beta1 0.9, beta2 0.999, epsilon 1e-8) and its bias correction
    folded into the step size. Slots are named as TF1 names them (`<var>/Adam`, `<var>/Adam_1`).
    Build it in the strategy's scope."""

    slot_names = ("Adam", "Adam_1")

    def __init__(self, variables, learning_rate, beta1=0.9, beta2=0.999, epsilon=1e-8):
        super().__init__(name="adam")
        self.learning_rate = float(learning_rate)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.strategy = tf.distribute.get_strategy()
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.slots = {}
        for var in variables:
            name = _name(var)
            for slot in self.slot_names:
                self.slots[f"{name}/{slot}"] = tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False,
                                                           name=f"{name}/{slot}")

    def apply(self, grads, variables):
        """Applies one step; `grads` are mirrored values (or tensors) matching `variables`."""
        strategy = self.strategy
        t = tf.cast(self.iterations + 1, tf.float32)
        beta1_power, beta2_power = tf.pow(self.beta1, t), tf.pow(self.beta2, t)
        hyper = [tf.constant(x, tf.float32) for x in (self.learning_rate, self.beta1, self.beta2, self.epsilon)]
        for var, grad in zip(variables, grads):
            name = _name(var)
            m, v = self.slots[f"{name}/Adam"], self.slots[f"{name}/Adam_1"]
            strategy.extended.update(var, self._update, args=(grad, m, v, beta1_power, beta2_power, *hyper),
                                     group=False)
        self.iterations.assign_add(1)

    @staticmethod
    def _update(var, grad, m, v, beta1_power, beta2_power, lr, beta1, beta2, epsilon):
        return tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=beta1_power,
                                            beta2_power=beta2_power, lr=lr, beta1=beta1, beta2=beta2,
                                            epsilon=epsilon, grad=grad)


class Adafactor(tf.Module):
    """Adafactor with the paper's defaults: second-moment decay 1 - t^-0.8, update clipping at
    RMS `clip_threshold`, steps relative to each parameter's RMS (at least `epsilon2`), and no
    first moment unless `beta1` > 0. A matrix keeps the means of its squared gradients over rows
    and over columns (slots `<var>/Adafactor_vr`, `<var>/Adafactor_vc`, indexed by the rows and
    columns of the released [in, out] layout), a vector their running mean (`<var>/Adafactor_v`);
    `beta1` adds `<var>/Adafactor_m`. Build it in the strategy's scope.

    Args:
        variables: The variables to train.
        learning_rate: The relative step rho; None: the paper's min(1e-2, 1/sqrt(t)).
        beta1: First-moment decay (0: none, the paper's default).
        clip_threshold: The update's RMS is clipped to this (the paper's d).
        transposed: Names of matrices held as [out, in] (16-bit layouts, `checkpoint.is_transposed`).
    """

    def __init__(self, variables, learning_rate=None, beta1=0.0, clip_threshold=1.0, decay_rate=0.8,
                 epsilon1=1e-30, epsilon2=1e-3, transposed=()):
        super().__init__(name="adafactor")
        self.learning_rate = None if learning_rate is None else float(learning_rate)
        self.beta1, self.clip_threshold, self.decay_rate = float(beta1), float(clip_threshold), float(decay_rate)
        self.epsilon1, self.epsilon2 = epsilon1, epsilon2
        self.transposed = frozenset(transposed)
        self.strategy = tf.distribute.get_strategy()
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.slots = {}
        for var in variables:
            name = _name(var)
            if var.shape.rank == 2:
                rows, columns = reversed(var.shape) if name in self.transposed else var.shape
                self._slot(f"{name}/Adafactor_vr", [rows])
                self._slot(f"{name}/Adafactor_vc", [columns])
            else:
                self._slot(f"{name}/Adafactor_v", var.shape)
            if self.beta1:
                self._slot(f"{name}/Adafactor_m", var.shape)

    def _slot(self, name, shape):
        self.slots[name] = tf.Variable(tf.zeros(shape), trainable=False, name=name)

    def apply(self, grads, variables):
        """Applies one step; `grads` are mirrored values (or tensors) matching `variables`."""
        t = tf.cast(self.iterations + 1, tf.float32)
        rho = tf.minimum(1e-2, tf.math.rsqrt(t)) if self.learning_rate is None else tf.constant(self.learning_rate)
        decay = 1 - tf.pow(t, -self.decay_rate)  # the paper's beta2-hat: 0 at the first step
        for var, grad in zip(variables, grads):
            name = _name(var)
            slots = [self.slots.get(f"{name}/Adafactor_{s}") for s in ("vr", "vc", "v", "m")]
            # Per released row: a mean over the model layout's last axis, or its first when transposed.
            row_axis = 0 if name in self.transposed else 1
            self.strategy.extended.update(var, self._update, args=(grad, rho, decay, *slots),
                                          kwargs=dict(row_axis=row_axis), group=False)
        self.iterations.assign_add(1)

    def _update(self, var, grad, rho, decay, vr, vc, v, m, row_axis):
        squared = tf.square(grad) + self.epsilon1
        if vr is not None:
            vr_new = decay * vr + (1 - decay) * tf.reduce_mean(squared, axis=row_axis)
            vc_new = decay * vc + (1 - decay) * tf.reduce_mean(squared, axis=1 - row_axis)
            vr.assign(vr_new)
            vc.assign(vc_new)
            # The rank-1 estimate vr vc^T / mean(vr), applied as two scalings instead of formed.
            row_scale = tf.math.rsqrt(vr_new / tf.reduce_mean(vr_new))
            col_scale = tf.math.rsqrt(vc_new)
            if row_axis == 0:
                row_scale, col_scale = col_scale, row_scale
            update = grad * row_scale[:, None] * col_scale[None, :]
        else:
            v_new = decay * v + (1 - decay) * squared
            v.assign(v_new)
            update = grad * tf.math.rsqrt(v_new)
        update /= tf.maximum(1.0, _rms(update) / self.clip_threshold)
        step = tf.maximum(self.epsilon2, _rms(var)) * rho * update
        if m is not None:
            step = self.beta1 * m + (1 - self.beta1) * step
            m.assign(step)
        return var.assign_sub(step)


OPTIMIZERS = {"adam": Adam, "sgd": SGD, "adafactor": Adafactor}


def _rms(x):
    return tf.sqrt(tf.reduce_mean(tf.square(x)))


def _name(var):
    """A variable's checkpoint name, without TensorFlow's ':0' suffix."""
    return var.name.split(":")[0]
