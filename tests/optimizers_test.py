"""Tests of cgc_tf.optimizers: CoupledSGD is torch.optim.SGD's update, step for step."""

import os
import re

from absl.testing import parameterized
import keras
import numpy as np
import pytest
import tensorflow as tf

from cgc_tf import config as config_lib
from cgc_tf import optimizers
from tests import testing_devices

LEARNING_RATES = (0.1, 0.1, 0.1, 0.01, 0.01)  # a step-schedule drop before step 4
MOMENTUM = 0.9
WEIGHT_DECAY = 0.05  # large, so that the coupled and decoupled forms differ visibly


def _problem(seed=0):
    """A least-squares problem: inputs [4, 3], targets [4, 2], kernel [3, 2], bias [2]."""
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(4, 3)),
        rng.normal(size=(4, 2)),
        rng.normal(size=(3, 2)),
        rng.normal(size=(2,)),
    )


def _gradients(inputs, targets, kernel, bias):
    """d/d(kernel, bias) of mean((inputs @ kernel + bias - targets) ** 2), by hand."""
    residual = inputs @ kernel + bias - targets
    scale = 2.0 / residual.size
    return scale * inputs.T @ residual, scale * residual.sum(axis=0)


def _torch_sgd_oracle(learning_rates, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY):
    """torch.optim.SGD's documented update, transcribed in float64 numpy."""
    inputs, targets, kernel, bias = _problem()
    weights = [kernel, bias]
    buffers = [np.zeros_like(kernel), np.zeros_like(bias)]
    for rate in learning_rates:
        for index, gradient in enumerate(_gradients(inputs, targets, *weights)):
            gradient = gradient + weight_decay * weights[index]
            buffers[index] = momentum * buffers[index] + gradient
            weights[index] = weights[index] - rate * buffers[index]
    return weights


def _keras_steps(optimizer, learning_rates=None, steps=len(LEARNING_RATES)):
    """Runs `steps` updates of `optimizer` on `_problem`; returns the final weights."""
    inputs, targets, kernel, bias = _problem()
    inputs = tf.constant(inputs, tf.float32)
    targets = tf.constant(targets, tf.float32)
    kernel = keras.Variable(kernel.astype("float32"), name="kernel")
    bias = keras.Variable(bias.astype("float32"), name="bias")
    variables = [kernel, bias]
    for step in range(steps):
        if learning_rates is not None:
            optimizer.learning_rate = learning_rates[step]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(inputs @ kernel + bias - targets))
        optimizer.apply(tape.gradient(loss, variables), variables)
    return [v.numpy() for v in variables]


def _step_schedule():
    """LEARNING_RATES as a schedule (the optimizer reads it at its iteration count)."""
    return keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.01])


class CoupledSGDTest(tf.test.TestCase, parameterized.TestCase):

    def test_modes_mirror_config(self):
        self.assertEqual(config_lib.WEIGHT_DECAY_MODES, optimizers.WEIGHT_DECAY_MODES)

    @parameterized.named_parameters(
        ("assigned_rates", False),
        ("schedule", True),
    )
    def test_five_steps_equal_torch_update(self, use_schedule):
        rate = _step_schedule() if use_schedule else LEARNING_RATES[0]
        optimizer = optimizers.CoupledSGD(rate, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        weights = _keras_steps(optimizer, None if use_schedule else LEARNING_RATES)
        for got, expected in zip(weights, _torch_sgd_oracle(LEARNING_RATES)):
            self.assertAllClose(got, expected, atol=1e-6, rtol=1e-6)

    def test_without_momentum_or_decay(self):
        optimizer = optimizers.CoupledSGD(0.1)
        weights = _keras_steps(optimizer, steps=3)
        expected = _torch_sgd_oracle([0.1] * 3, momentum=0.0, weight_decay=0.0)
        for got, want in zip(weights, expected):
            self.assertAllClose(got, want, atol=1e-6, rtol=1e-6)

    def test_decoupled_mode_is_keras_sgd_and_differs(self):
        decoupled = optimizers.sgd(0.1, MOMENTUM, WEIGHT_DECAY, weight_decay_mode="decoupled")
        self.assertIs(type(decoupled), keras.optimizers.SGD)
        self.assertEqual(decoupled.weight_decay, WEIGHT_DECAY)
        coupled = optimizers.sgd(0.1, MOMENTUM, WEIGHT_DECAY)
        self.assertIsInstance(coupled, optimizers.CoupledSGD)
        # Keras' velocity carries the learning rate, so with a rate drop the two
        # forms differ even without decay.
        keras_form = _keras_steps(keras.optimizers.SGD(0.1, momentum=MOMENTUM), LEARNING_RATES)
        torch_form = _torch_sgd_oracle(LEARNING_RATES, weight_decay=0.0)
        self.assertGreater(np.abs(keras_form[0] - torch_form[0]).max(), 1e-3)
        decayed = _keras_steps(decoupled, [0.1] * 5)
        self.assertGreater(
            np.abs(decayed[0] - _torch_sgd_oracle([0.1] * 5)[0]).max(), 1e-3
        )

    @parameterized.named_parameters(
        ("mode", {"weight_decay_mode": "adamw"}, "weight_decay_mode='adamw' is not one of"),
        ("momentum", {"momentum": 1.0}, "momentum=1.0 must be a number in [0, 1)"),
        ("decay", {"weight_decay": -1.0}, "weight_decay=-1.0 must be a number >= 0"),
    )
    def test_invalid_arguments(self, changes, message):
        arguments = dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-4)
        arguments.update(changes)
        with self.assertRaisesRegex(ValueError, re.escape(message)):
            optimizers.sgd(**arguments)

    def test_config_round_trip(self):
        optimizer = optimizers.CoupledSGD(_step_schedule(), momentum=0.9, weight_decay=1e-4)
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(optimizer)
        )
        self.assertIsInstance(restored, optimizers.CoupledSGD)
        self.assertEqual(restored.momentum, 0.9)
        self.assertEqual(restored.coupled_weight_decay, 1e-4)
        self.assertIsNone(restored.weight_decay)  # the decoupled form stays off
        self.assertEqual(restored.get_config(), optimizer.get_config())

    def test_saved_model_loads_and_continues(self):
        keras.utils.set_random_seed(0)
        inputs, targets, _, _ = _problem()
        inputs, targets = inputs.astype("float32"), targets.astype("float32")
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
             keras.layers.Dense(2)]
        )
        model.compile(
            optimizer=optimizers.CoupledSGD(0.1, momentum=0.9, weight_decay=0.01), loss="mse"
        )
        model.fit(inputs, targets, batch_size=4, epochs=2, verbose=0)
        path = os.path.join(self.get_temp_dir(), "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        self.assertIsInstance(loaded.optimizer, optimizers.CoupledSGD)
        for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables):
            self.assertAllClose(saved, restored)
        model.fit(inputs, targets, batch_size=4, epochs=1, verbose=0)
        loaded.fit(inputs, targets, batch_size=4, epochs=1, verbose=0)
        for original, restored in zip(model.weights, loaded.weights):
            self.assertAllClose(original, restored, atol=1e-6)

    def test_loss_scale_and_jit_compile_give_the_same_step(self):
        inputs, targets, _, _ = _problem()
        inputs, targets = inputs.astype("float32"), targets.astype("float32")

        def fitted(optimizer, jit_compile):
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
            model.fit(inputs, targets, batch_size=4, epochs=3, verbose=0)
            return model.get_weights()

        def make():
            return optimizers.CoupledSGD(0.1, momentum=0.9, weight_decay=0.05)

        reference = fitted(make(), jit_compile=False)
        for optimizer, jit_compile in (
            (make(), True),
            (keras.optimizers.LossScaleOptimizer(make(), initial_scale=1024.0), False),
        ):
            for got, expected in zip(fitted(optimizer, jit_compile), reference):
                self.assertAllClose(got, expected, atol=1e-6)

    def test_torch_sgd_gives_the_oracle(self):
        torch = pytest.importorskip("torch")
        inputs, targets, kernel, bias = (torch.tensor(a) for a in _problem())
        parameters = [torch.nn.Parameter(kernel), torch.nn.Parameter(bias)]
        optimizer = torch.optim.SGD(
            parameters, lr=LEARNING_RATES[0], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        for rate in LEARNING_RATES:
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.zero_grad()
            torch.mean((inputs @ parameters[0] + parameters[1] - targets) ** 2).backward()
            optimizer.step()
        for got, expected in zip(parameters, _torch_sgd_oracle(LEARNING_RATES)):
            self.assertAllClose(got.detach().numpy(), expected, atol=1e-12)


class CoupledSGDReplicatedTest(testing_devices.TwoReplicaTestCase):

    def test_two_replicas_equal_one(self):
        inputs, targets, _, _ = _problem()
        inputs, targets = inputs.astype("float32"), targets.astype("float32")

        def fitted(strategy):
            with strategy.scope():
                keras.utils.set_random_seed(0)
                model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
                model.compile(
                    optimizer=optimizers.CoupledSGD(0.1, momentum=0.9, weight_decay=0.05),
                    loss="mse",
                )
            model.fit(inputs, targets, batch_size=4, epochs=3, verbose=0, shuffle=False)
            return model.get_weights()

        one = fitted(tf.distribute.get_strategy())
        two = fitted(self.strategy)
        for got, expected in zip(two, one):
            self.assertAllClose(got, expected, atol=1e-6)


if __name__ == "__main__":
    tf.test.main()
