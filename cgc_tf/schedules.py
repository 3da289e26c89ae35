"""Learning-rate schedules of cgc-train, importable wherever a trained model is loaded.

`import cgc_tf` imports this module, so `keras.models.load_model` on a model.keras
written by cgc-train finds the schedule of its optimizer in any process (it is
registered as "cgc_tf>LinearWarmup").
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="cgc_tf")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Multiplies a learning rate (schedule) by min(1, (step + 1) / warmup_steps).

    Keras has warmup only inside CosineDecay; this wraps any schedule (step
    decay, cosine or a constant) the same way.
    """

    def __init__(self, after_warmup, warmup_steps, name="linear_warmup"):
        """Args:
        after_warmup: float learning rate or a LearningRateSchedule.
        warmup_steps: int >= 1, optimizer steps of the linear ramp.
        name: schedule name.
        """
        self.after_warmup = after_warmup
        self.warmup_steps = int(warmup_steps)
        self.name = name

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if isinstance(self.after_warmup, keras.optimizers.schedules.LearningRateSchedule):
            rate = tf.cast(self.after_warmup(step), tf.float32)
        else:
            rate = tf.constant(self.after_warmup, tf.float32)
        ramp = tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        return rate * ramp

    def get_config(self):
        after_warmup = self.after_warmup
        if isinstance(after_warmup, keras.optimizers.schedules.LearningRateSchedule):
            after_warmup = keras.saving.serialize_keras_object(after_warmup)
        return {"after_warmup": after_warmup, "warmup_steps": self.warmup_steps, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["after_warmup"], dict):
            config["after_warmup"] = keras.saving.deserialize_keras_object(config["after_warmup"])
        return cls(**config)
