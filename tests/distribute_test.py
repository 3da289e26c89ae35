"""Tests for cgc_tf.distribute: the strategy factory, replica helpers, and CGC steps
under MirroredStrategy over two logical CPU devices compared with one device."""

import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import cgc_tf
from cgc_tf import distribute
from cgc_tf import losses
from tests import testing_devices
from tests import testing_models

IMAGE_SIZE = 16
GLOBAL_BATCH = 4
LEARNING_RATE = 0.5


def deterministic_augmentation():
    """T = a horizontal flip of the whole image, for every example."""
    return cgc_tf.PairedAugmentation(
        area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=1.0
    )


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return images, np.array([0, 1, 2, 1], np.int32)


def _one_step(strategy, augmentation_fn, **model_arguments):
    """One SGD step of a fresh CGCModel on the global batch under `strategy`.

    The augmentation is built inside the scope, like the rest of the model: its
    seed state must be a mirrored variable (one built outside is a single variable
    that the replicas advance in turn, in no fixed order).

    Returns:
      (trainable weights after the step, fit history dict).
    """
    images, labels = _batch()
    with strategy.scope():
        model = cgc_tf.CGCModel(
            testing_models.tiny_convnet(IMAGE_SIZE), views=2, augmentation=augmentation_fn(),
            **model_arguments,
        )
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
    history = model.fit(
        images, labels, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0
    )
    return [variable.numpy() for variable in model.trainable_variables], history.history


class StrategyFromNameTest(tf.test.TestCase):
    def test_unknown_name(self):
        with self.assertRaisesRegex(ValueError, r"strategy='mirror' is not one of .*'mirrored'"):
            distribute.strategy_from_name("mirror")

    def test_default_is_the_current_strategy(self):
        self.assertIs(distribute.strategy_from_name("default"), tf.distribute.get_strategy())

    def test_one_device_and_mirrored_on_this_machine(self):
        one_device = distribute.strategy_from_name("one_device")
        self.assertIsInstance(one_device, tf.distribute.OneDeviceStrategy)
        self.assertEqual(one_device.num_replicas_in_sync, 1)
        mirrored = distribute.strategy_from_name("mirrored")
        self.assertIsInstance(mirrored, tf.distribute.MirroredStrategy)
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        self.assertEqual(mirrored.num_replicas_in_sync, len(devices))

    def test_tpu_without_a_tpu_fails_loudly(self):
        with mock.patch.dict(os.environ, {}, clear=True):
            with self.assertRaisesRegex(ValueError, "TPU"):
                distribute.strategy_from_name("tpu")

    def test_cluster_from_tf_config(self):
        tf_config = (
            '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
            '"task": {"type": "worker", "index": 1}}'
        )
        slurm = _slurm_environment()
        with mock.patch.dict(os.environ, dict(slurm, TF_CONFIG=tf_config), clear=True):
            resolver = distribute.cluster_resolver_from_environment()
            # TFConfigClusterResolver reads TF_CONFIG when asked.
            self.assertEqual(resolver.task_id, 1)
            self.assertEqual(
                resolver.cluster_spec().as_dict()["worker"], ["host1:2222", "host2:2222"]
            )
        self.assertIsInstance(resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver)

    def test_cluster_from_slurm_without_gpus(self):
        with mock.patch.dict(os.environ, _slurm_environment(), clear=True):
            resolver = distribute.cluster_resolver_from_environment()
            spec = resolver.cluster_spec().as_dict()
            self.assertNotIn("CUDA_VISIBLE_DEVICES", os.environ)
        self.assertIsInstance(resolver, tf.distribute.cluster_resolver.SlurmClusterResolver)
        self.assertEqual(spec, {"worker": ["node7:8888", "node8:8888"]})
        self.assertEqual((resolver.task_type, resolver.task_id), ("worker", 1))

    def test_no_cluster_in_the_environment(self):
        with mock.patch.dict(os.environ, {"SLURM_JOB_ID": "1"}, clear=True):
            self.assertIsNone(distribute.cluster_resolver_from_environment())

    def _cpuinfo(self, flags):
        path = os.path.join(self.get_temp_dir(), "cpuinfo")
        with open(path, "w") as file:
            file.write(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
        return path

    def test_auto_mixed_precision_follows_the_hardware(self):
        no_gpu = mock.patch.object(tf.config, "list_physical_devices", return_value=[])
        with no_gpu:
            for flags, policy in (("avx512f", "float32"), ("avx512f avx512_bf16", "mixed_bfloat16"),
                                  ("amx_tile amx_bf16", "mixed_bfloat16")):
                chosen, reason = distribute.resolve_mixed_precision(
                    "auto", "default", cpuinfo_path=self._cpuinfo(flags)
                )
                self.assertEqual(chosen, policy, msg=flags)
                self.assertIn("auto", reason)
            self.assertEqual(
                distribute.resolve_mixed_precision("auto", "default", "/no/such/file")[0], "float32"
            )
        self.assertEqual(distribute.resolve_mixed_precision("auto", "tpu")[0], "mixed_bfloat16")
        self.assertEqual(distribute.resolve_mixed_precision("none", "tpu")[0], "float32")
        self.assertEqual(
            distribute.resolve_mixed_precision("mixed_float16", "default")[0], "mixed_float16"
        )
        gpus = [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")] * 2
        for capabilities, policy in ((((8, 0), (9, 0)), "mixed_bfloat16"),
                                     (((8, 6), (7, 5)), "float32")):
            with mock.patch.object(tf.config, "list_physical_devices", return_value=gpus), \
                    mock.patch.object(tf.config.experimental, "get_device_details",
                                      side_effect=[{"compute_capability": c} for c in capabilities]):
                chosen, reason = distribute.resolve_mixed_precision(
                    "auto", "mirrored", cpuinfo_path=self._cpuinfo("avx512_bf16")
                )
            self.assertEqual(chosen, policy, msg=reason)

    def test_is_chief_on_one_machine(self):
        self.assertTrue(distribute.is_chief())
        self.assertTrue(distribute.is_chief(distribute.strategy_from_name("one_device")))

    def test_scaled_learning_rate(self):
        self.assertAllClose(distribute.scaled_learning_rate(0.1, 256), 0.1)
        self.assertAllClose(distribute.scaled_learning_rate(0.1, 64), 0.025)
        self.assertAllClose(distribute.scaled_learning_rate(0.2, 32, base_batch_size=64), 0.1)
        with self.assertRaisesRegex(ValueError, r"global_batch_size=0 must be a positive int"):
            distribute.scaled_learning_rate(0.1, 0)

    def test_helpers_are_no_ops_with_one_replica(self):
        loss = tf.constant(3.0)
        self.assertEqual(distribute.num_replicas_in_sync(), 1)
        self.assertIs(distribute.scale_loss_for_replicas(loss), loss)
        values = tf.ones([2, 3])
        gathered, offset = distribute.all_gather_with_offset(values)
        self.assertIs(gathered, values)
        self.assertEqual(offset, 0)


def _slurm_environment():
    """What `srun --nodes=2 --ntasks-per-node=1` sets for the second task."""
    return {
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "node[7-8]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    }


class ReplicaHelpersTest(testing_devices.TwoReplicaTestCase):
    def test_scale_and_gather(self):
        @tf.function
        def replica_step():
            context_ = tf.distribute.get_replica_context()
            values = tf.fill([2, 3], tf.cast(context_.replica_id_in_sync_group, tf.float32))
            gathered, offset = distribute.all_gather_with_offset(values)
            return distribute.scale_loss_for_replicas(tf.constant(1.0)), gathered, offset

        with self.strategy.scope():
            self.assertEqual(distribute.num_replicas_in_sync(), 2)
        scaled, gathered, offsets = self.strategy.run(replica_step)
        local = self.strategy.experimental_local_results
        self.assertAllClose(local(scaled), [0.5, 0.5])
        expected = np.repeat([0.0, 1.0], 2)[:, None] * np.ones([1, 3])
        for gathered_on_replica in local(gathered):
            self.assertAllClose(gathered_on_replica, expected)
        self.assertAllEqual(local(offsets), [0, 2])

    def test_gathered_negatives_give_single_device_gradients(self):
        rng = np.random.default_rng(1)
        values = rng.normal(size=(GLOBAL_BATCH, 6)).astype(np.float32)
        positives = rng.normal(size=(GLOBAL_BATCH, 6)).astype(np.float32)
        temperature = 0.5

        def loss_fn(local_values, local_positives, gather):
            anchors = tf.math.l2_normalize(local_values, axis=-1)
            negatives, offset = None, 0
            if gather:
                negatives, offset = distribute.all_gather_with_offset(anchors)
            return losses.info_nce(
                anchors, tf.math.l2_normalize(local_positives, axis=-1), temperature,
                negatives, offset,
            )

        full = tf.constant(values)
        with tf.GradientTape() as tape:
            tape.watch(full)
            expected_loss = loss_fn(full, positives, gather=False)
        expected_gradient = tape.gradient(expected_loss, full)

        @tf.function
        def replica_step():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            rows = tf.range(2) + 2 * replica
            local = tf.gather(values, rows)
            with tf.GradientTape() as tape:
                tape.watch(local)
                loss = loss_fn(local, tf.gather(positives, rows), gather=True)
                scaled = distribute.scale_loss_for_replicas(loss)
            return loss, tape.gradient(scaled, local)

        loss, gradient = self.strategy.run(replica_step)
        local = self.strategy.experimental_local_results
        self.assertAllClose(np.mean(local(loss)), expected_loss, atol=1e-6)
        # Each replica's anchors are negatives of the other replica's loss too; the
        # all_gather gradient brings those terms back to the replica that owns them.
        self.assertAllClose(np.concatenate(local(gradient)), expected_gradient, atol=1e-6)


class CGCStepTest(testing_devices.TwoReplicaTestCase):
    """One CGC step on two replicas against the same global batch on one device."""

    _single_device_results = {}

    def _single_device(self, augmentation_fn, **model_arguments):
        # Memoised: two tests compare with the same single-device step.
        key = (augmentation_fn.__name__, tuple(sorted(model_arguments.items())))
        if key not in self._single_device_results:
            self._single_device_results[key] = _one_step(
                tf.distribute.get_strategy(), augmentation_fn, **model_arguments
            )
        return self._single_device_results[key]

    @parameterized.named_parameters(
        ("contrastive_global_negatives", "contrastive", True),
        ("mse", "mse", False),
    )
    def test_matches_single_device(self, consistency, global_negatives):
        arguments = dict(lambda_=1.0, consistency=consistency, global_negatives=global_negatives)
        expected_weights, expected_history = self._single_device(
            deterministic_augmentation, **arguments
        )
        weights, history = _one_step(self.strategy, deterministic_augmentation, **arguments)
        for key in ("loss", "ce_loss", "cgc_loss"):
            self.assertAllClose(history[key], expected_history[key], atol=1e-5, msg=key)
        for actual, expected in zip(weights, expected_weights):
            self.assertAllClose(actual, expected, atol=1e-5)

    def test_local_negatives_are_per_replica_batches(self):
        # On one device global_negatives has no effect: the full-batch step.
        expected_weights, _ = self._single_device(
            deterministic_augmentation, lambda_=1.0, consistency="contrastive",
            global_negatives=True,
        )
        weights, history = _one_step(
            self.strategy, deterministic_augmentation, lambda_=1.0, global_negatives=False
        )
        # Oracle: the reported InfoNCE is the mean of the two half-batch losses, each
        # with only its own half as negatives.
        images, _ = _batch()
        model = cgc_tf.CGCModel(
            testing_models.tiny_convnet(IMAGE_SIZE), views=2,
            augmentation=deterministic_augmentation(),
        )
        halves = [
            model.consistency_terms(tf.constant(images[start : start + 2]), training=True)["loss"]
            for start in (0, 2)
        ]
        full = model.consistency_terms(tf.constant(images), training=True)["loss"]
        self.assertAllClose(history["cgc_loss"][0], np.mean(halves), atol=1e-5)
        self.assertNotAllClose(history["cgc_loss"][0], full, atol=1e-3)
        difference = max(np.abs(a - b).max() for a, b in zip(weights, expected_weights))
        self.assertGreater(difference, 1e-3)

    def test_random_transforms_give_the_single_device_step(self):
        # PairedAugmentation draws T for the global batch and each replica keeps its
        # rows, so two replicas train on the transforms one device draws.
        arguments = dict(lambda_=1.0, global_negatives=True)

        def augmentation():
            return cgc_tf.PairedAugmentation(seed=3)

        expected_weights, expected_history = self._single_device(augmentation, **arguments)
        weights, history = _one_step(self.strategy, augmentation, **arguments)
        self.assertAllClose(history["cgc_loss"], expected_history["cgc_loss"], atol=1e-5)
        for actual, expected in zip(weights, expected_weights):
            self.assertAllClose(actual, expected, atol=1e-5)

    def _batch_norm_step(self, strategy, synchronized):
        """One CGC step of small_resnet; returns {variable path: per-replica values}."""
        images, labels = _batch()
        keras.utils.set_random_seed(0)
        with strategy.scope():
            backbone, target_layer = cgc_tf.backbones.build(
                "small_resnet", (IMAGE_SIZE, IMAGE_SIZE, 3), 3,
                synchronized_batch_norm=synchronized,
            )
            model = cgc_tf.CGCModel(
                backbone, target_layer=target_layer, views=2, lambda_=1.0,
                global_negatives=True, augmentation=deterministic_augmentation(),
            )
            model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
        model.fit(images, labels, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        values = {
            variable.path: [
                np.asarray(value) for value in strategy.experimental_local_results(variable.value)
            ]
            for variable in model.backbone.variables
        }
        return values

    def test_synchronized_batch_norm_gives_identical_statistics_on_every_replica(self):
        def moving(values):
            return {path: v for path, v in values.items() if "moving" in path}

        single_device = self._batch_norm_step(tf.distribute.get_strategy(), synchronized=True)
        synchronized = self._batch_norm_step(self.strategy, synchronized=True)
        self.assertNotEmpty(moving(synchronized))
        for path, (first, second) in moving(synchronized).items():
            self.assertAllEqual(first, second, msg=path)
        # Batch statistics over both replicas are those of the global batch.
        for path, (expected,) in single_device.items():
            self.assertAllClose(synchronized[path][0], expected, atol=1e-4, msg=path)
        per_replica = self._batch_norm_step(self.strategy, synchronized=False)
        difference = max(
            np.abs(first - second).max() for first, second in moving(per_replica).values()
        )
        self.assertGreater(difference, 1e-4)

    def test_replicas_draw_one_transform_per_global_example(self):
        # The SeedGenerator state is a mirrored variable with aggregation "none":
        # each replica updates its own copy, identically. Every replica draws the
        # global batch's transforms and keeps its rows, so example i of replica r
        # gets row r * B + i of the draw one device makes, and the state advances.
        layers = (keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2))

        def augmentation():
            return cgc_tf.PairedAugmentation(seed=7, geometric_layers=layers)

        with self.strategy.scope():
            replicated = augmentation()

        @tf.function
        def draw():
            transform = self.strategy.run(
                lambda: replicated.sample(tf.constant(2), IMAGE_SIZE, IMAGE_SIZE)
            )
            return tf.nest.map_structure(self.strategy.experimental_local_results, transform)

        single_device = augmentation()
        for _ in range(2):
            transform = draw()
            expected = single_device.sample(4, IMAGE_SIZE, IMAGE_SIZE)
            boxes = transform["boxes"]
            self.assertNotAllClose(boxes[0], boxes[1])
            self.assertAllEqual(tf.concat(boxes, 0), expected["boxes"])
            self.assertAllEqual(tf.concat(transform["flips"], 0), expected["flips"])
            flip, rotation = transform["layer_transformations"]
            expected_flip, expected_rotation = expected["layer_transformations"]
            self.assertAllEqual(tf.concat(flip["flips"], 0), expected_flip["flips"])
            self.assertAllClose(
                tf.concat(rotation["rotation_matrix"], 0), expected_rotation["rotation_matrix"]
            )
        self.assertAllEqual(replicated.seed_generator.state.numpy(), [7, 6])
