"""Tests of cgc_tf/schedules.py: LinearWarmup's values and its serialization."""

import keras
import numpy as np
import tensorflow as tf

from cgc_tf import schedules
from tests import testing_base


class LinearWarmupTest(testing_base.TestCase):
    def test_constant_rate_ramps_linearly_then_holds(self):
        schedule = schedules.LinearWarmup(0.1, warmup_steps=4)
        # 0.1 * min(1, (step + 1) / 4)
        expected = [0.025, 0.05, 0.075, 0.1, 0.1, 0.1]
        self.assertAllClose([float(schedule(step)) for step in range(6)], expected, atol=1e-7)

    def test_wraps_a_schedule_step_by_step(self):
        decay = keras.optimizers.schedules.PiecewiseConstantDecay([2, 5], [1.0, 0.5, 0.25])
        schedule = schedules.LinearWarmup(decay, warmup_steps=3)
        steps = np.arange(8)
        ramp = np.minimum(1.0, (steps + 1) / 3)
        after = np.array([float(decay(step)) for step in steps])
        self.assertAllClose([float(schedule(step)) for step in steps], after * ramp, atol=1e-7)
        # The ramp multiplies: at step 1 (below the first boundary) 1.0 * 2/3.
        self.assertAllClose(float(schedule(1)), 2 / 3, atol=1e-7)

    def test_one_warmup_step_is_the_wrapped_rate(self):
        schedule = schedules.LinearWarmup(0.3, warmup_steps=1)
        self.assertAllClose([float(schedule(step)) for step in range(3)], [0.3] * 3)

    def test_serialization_round_trip_with_a_rate_and_a_schedule(self):
        self.run_serialization_test(schedules.LinearWarmup(0.05, warmup_steps=7))
        cosine = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=100)
        revived = self.run_serialization_test(schedules.LinearWarmup(cosine, 10, name="w"))
        self.assertIsInstance(revived.after_warmup, keras.optimizers.schedules.CosineDecay)
        for step in (0, 9, 50):
            self.assertAllClose(float(revived(step)), float(schedules.LinearWarmup(cosine, 10)(step)))

    def test_an_optimizer_with_the_schedule_saves_and_loads(self):
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        schedule = schedules.LinearWarmup(0.1, warmup_steps=5)
        model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
        model.fit(np.ones((4, 4)), np.zeros((4, 2)), epochs=1, verbose=0)
        loaded = self.run_model_saving_test(model, tf.ones((2, 4)))
        # One step done: the loaded optimizer's rate is the schedule's, 0.1 * 2/5, and
        # it keeps ramping (0.1 * 3/5 after the next step).
        self.assertEqual(int(loaded.optimizer.iterations), 1)
        self.assertAllClose(float(loaded.optimizer.learning_rate), 0.04, atol=1e-7)
        loaded.fit(np.ones((4, 4)), np.zeros((4, 2)), epochs=1, verbose=0)
        self.assertAllClose(float(loaded.optimizer.learning_rate), 0.06, atol=1e-7)


if __name__ == "__main__":
    tf.test.main()
