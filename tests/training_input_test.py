"""cgc_tf.training_input: steps per epoch, heatmap images, the input statistics file."""

import json
import os
import shutil
import tempfile
import types

import numpy as np
import tensorflow as tf

from cgc_tf import config as config_lib
from cgc_tf import model_dir as layout
from cgc_tf import training_input


class _Stats:
    shard_index = 1

    def as_dict(self):
        return {"decoded": 5}


class TrainingInputTest(tf.test.TestCase):
    def test_steps_per_epoch(self):
        info = types.SimpleNamespace(num_classes=4, splits={"train": 100}, train_split="train")
        config = config_lib.TrainConfig(batch_size=32)
        self.assertEqual(training_input.steps_per_epoch(config, info), 100 // 32)
        self.assertEqual(
            training_input.steps_per_epoch(config.replace(steps_per_epoch=7), info), 7
        )
        subset = config.replace(examples_per_class=3, batch_size=5)
        self.assertEqual(training_input.steps_per_epoch(subset, info), 3 * 4 // 5)
        # Fewer labelled examples than one batch: still one step.
        self.assertEqual(training_input.steps_per_epoch(config.replace(batch_size=128), info), 1)

    def test_heatmap_images_takes_the_first_images_across_batches(self):
        images = np.arange(5 * 2 * 2 * 3, dtype=np.float32).reshape(5, 2, 2, 3)
        batches = tf.data.Dataset.from_tensor_slices(({"image": images}, np.zeros(5))).batch(2)
        self.assertAllEqual(training_input.heatmap_images(batches, 3), images[:3])

    def test_input_stats_writer_counts_epochs(self):
        model_dir = tempfile.mkdtemp(prefix="cgc_training_input_test_")
        self.addCleanup(shutil.rmtree, model_dir, ignore_errors=True)
        writer = training_input.InputStatsWriter(model_dir, _Stats())
        path = os.path.join(model_dir, layout.input_stats_file(1))
        for expected in (1, 2):
            writer.on_epoch_end(expected - 1)
            with open(path) as f:
                self.assertEqual(json.load(f), {"decoded": 5, "epochs_this_run": expected})


if __name__ == "__main__":
    tf.test.main()
