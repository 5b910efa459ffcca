"""Adam and SGD as the fine-tuning fork ran them (TF1's AdamOptimizer and GradientDescentOptimizer).

They update through TensorFlow's fused kernels (one pass over each variable, where composing
the update from elementwise ops would make several), and through the distribution strategy's
`update`, so mirrored variables get the same step on every device.
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


OPTIMIZERS = {"adam": Adam, "sgd": SGD}


def _name(var):
    """A variable's checkpoint name, without TensorFlow's ':0' suffix."""
    return var.name.split(":")[0]
