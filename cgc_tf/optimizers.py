"""SGD with torch's coupled L2 weight decay and torch's momentum form.

`CoupledSGD` is `torch.optim.SGD(params, lr, momentum, weight_decay=wd)`'s update, the
reference's: g' = g + wd * w; v = mu * v + g'; w -= lr * v. Keras' SGD decays outside
the momentum and keeps lr in its velocity; docs/method.md ("Deviations from the
reference") says what each choice changes.
"""

import keras
from keras import ops

WEIGHT_DECAY_MODES = ("coupled", "decoupled")


@keras.saving.register_keras_serializable(package="cgc_tf")
class CoupledSGD(keras.optimizers.Optimizer):
    """torch.optim.SGD (dampening 0, no Nesterov) as a Keras optimizer.

    Update per variable w (float32 [...]) with gradient g, learning rate lr:
    `v = momentum * v + (g + weight_decay * w); w -= lr * v` (with momentum 0:
    `w -= lr * (g + weight_decay * w)`). The decay applies to every variable, batch
    normalisation and biases included, as in the reference, unless excluded with
    `exclude_from_weight_decay()`. Works under `LossScaleOptimizer` (mixed
    precision), tf.distribute and `jit_compile`, and round-trips through
    `get_config` and `.keras` files.

    Args:
      learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
      momentum: float in [0, 1).
      weight_decay: float >= 0, the coupled L2 coefficient (torch's `weight_decay`).
      name: optimizer name.
      **kwargs: the other `keras.optimizers.Optimizer` arguments (clipnorm,
        loss_scale_factor, gradient_accumulation_steps, ...).
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        weight_decay=0.0,
        name="coupled_sgd",
        **kwargs,
    ):
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
            0.0 <= momentum < 1.0
        ):
            raise ValueError(f"momentum={momentum!r} must be a number in [0, 1)")
        if weight_decay is None:
            weight_decay = 0.0
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or (
            weight_decay < 0
        ):
            raise ValueError(f"weight_decay={weight_decay!r} must be a number >= 0")
        # The base class's `weight_decay` is the decoupled form: keep it off and
        # hold the coupled coefficient under another name.
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.momentum = float(momentum)
        self.coupled_weight_decay = float(weight_decay)

    def build(self, variables):
        """Creates one momentum buffer per variable (none when momentum is 0)."""
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        """torch's SGD update of one variable."""
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.coupled_weight_decay and self._use_weight_decay(variable):
            decay = ops.cast(self.coupled_weight_decay, variable.dtype)
            gradient = ops.add(gradient, ops.multiply(decay, variable))
        if self.momentum != 0:
            velocity = self.momentums[self._get_variable_index(variable)]
            momentum = ops.cast(self.momentum, variable.dtype)
            self.assign(velocity, ops.add(ops.multiply(velocity, momentum), gradient))
            gradient = velocity
        self.assign_sub(variable, ops.multiply(gradient, learning_rate))

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "weight_decay": self.coupled_weight_decay})
        return config


def sgd(learning_rate, momentum, weight_decay, weight_decay_mode="coupled"):
    """SGD with momentum and weight decay in one of `WEIGHT_DECAY_MODES`.

    Args:
      learning_rate: float or LearningRateSchedule.
      momentum: float in [0, 1).
      weight_decay: float >= 0.
      weight_decay_mode: "coupled" (torch.optim.SGD, the reference: `CoupledSGD`) or
        "decoupled" (`keras.optimizers.SGD(weight_decay=...)`: `w -= lr * wd * w`
        outside the momentum, and Keras' velocity form `v = mu * v - lr * g`).

    Returns:
      A keras.optimizers.Optimizer.
    """
    if weight_decay_mode == "coupled":
        return CoupledSGD(learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay)
    if weight_decay_mode == "decoupled":
        return keras.optimizers.SGD(
            learning_rate=learning_rate,
            momentum=float(momentum),
            weight_decay=weight_decay or None,
        )
    raise ValueError(
        f"weight_decay_mode={weight_decay_mode!r} is not one of {list(WEIGHT_DECAY_MODES)}"
    )
