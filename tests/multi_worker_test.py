"""Tests for cgc_tf.custom_loop: against fit and resumed in-process under MirroredStrategy,
and two-worker MultiWorkerMirroredStrategy training on localhost.

The multi-worker test starts this file as a script, once per worker, with a TF_CONFIG naming
two localhost ports; each worker trains a tiny CGCModel with global negatives on
its share of the embedded `cluttered_digits` dataset and writes its final weights.
An uninterrupted run is the reference. In the interrupted run worker 1 is first
preempted (SIGTERM) in epoch 0, and both workers save and exit; relaunched, it
kills itself (SIGKILL) in epoch 1, and the test kills the chief too; relaunched
again, both resume from the chief's epoch-1 checkpoint and must end with the
uninterrupted run's weights.
"""

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import cgc_tf
from cgc_tf import callbacks
from cgc_tf import custom_loop
from tests import testing_devices
from tests import testing_models
from tests import testing_processes

_NUM_WORKERS = 2
_IMAGE_SIZE = 16
_NUM_CLASSES = 10
_GLOBAL_BATCH = 8
_EPOCHS = 2
_STEPS_PER_EPOCH = 3
_CRASH_EPOCH = 1  # worker 1 is killed in this epoch
# The exit status of a worker script that stopped with TrainingPreempted.
_EXIT_PREEMPTED = 3
# Upper bound on one two-worker run (imports, cluster start-up, two tiny epochs) on
# a loaded 2-core machine; a hung collective fails the test instead of the CI.
_RUN_TIMEOUT_SECONDS = 240


def _read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _loop_dataset_fn(images, labels, global_batch):
    """dataset_fn of per-replica batches; one pass over the examples per epoch."""

    def dataset_fn(input_context, epoch):
        del epoch  # the same unshuffled pass every epoch, like fit(shuffle=False)
        batch = input_context.get_per_replica_batch_size(global_batch)
        dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)
        shard = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return shard.repeat()

    return dataset_fn


class CustomLoopTest(testing_devices.TwoReplicaTestCase):
    """The loop on two logical CPUs (MirroredStrategy): same steps as fit, exact resume."""

    images = np.random.default_rng(0).uniform(size=(8, 16, 16, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 1, 0, 2, 2, 1], np.int32)
    steps_per_epoch = 2  # global batch 4: one pass over the 8 examples

    def _temp_dir(self):
        # A new directory per call (get_temp_dir() is one per test).
        directory = tempfile.mkdtemp(prefix="cgc_tf_custom_loop_test_")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return directory

    def _model(self):
        with self.strategy.scope():
            model = cgc_tf.CGCModel(
                testing_models.tiny_convnet(16), views=2, global_negatives=True,
                augmentation=cgc_tf.PairedAugmentation(seed=1),
            )
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
        return model

    def _train(self, epochs, directory, **kwargs):
        model = self._model()
        history = custom_loop.train(
            model, self.strategy, _loop_dataset_fn(self.images, self.labels, 4), epochs,
            self.steps_per_epoch, os.path.join(directory, "checkpoints"),
            csv_path=os.path.join(directory, "log.csv"), verbose=0, **kwargs,
        )
        return model, history

    _uninterrupted = None

    def _uninterrupted_run(self):
        """Two epochs in one call (memoised: two tests compare with it)."""
        if CustomLoopTest._uninterrupted is None:
            directory = self._temp_dir()
            model, history = self._train(2, directory)
            CustomLoopTest._uninterrupted = {
                "trainable_variables": [v.numpy() for v in model.trainable_variables],
                "variables": [v.numpy() for v in model.variables],
                "history": history.history,
                "rows": _read_csv(os.path.join(directory, "log.csv")),
            }
        return CustomLoopTest._uninterrupted

    def test_matches_fit(self):
        run = self._uninterrupted_run()
        expected = self._model()
        expected_history = expected.fit(
            self.images, self.labels, batch_size=4, epochs=2, shuffle=False, verbose=0
        )
        for actual, wanted in zip(run["trainable_variables"], expected.trainable_variables):
            self.assertAllClose(actual, wanted, atol=1e-6)
        self.assertEqual(sorted(run["history"]), sorted(expected_history.history))
        for key, values in expected_history.history.items():
            self.assertAllClose(run["history"][key], values, atol=1e-6, msg=key)
        self.assertEqual([row["epoch"] for row in run["rows"]], ["0", "1"])
        self.assertAllClose([float(row["loss"]) for row in run["rows"]], run["history"]["loss"])

    def test_resume_equals_uninterrupted_run(self):
        uninterrupted = self._uninterrupted_run()["variables"]
        directory = self._temp_dir()
        self._train(1, directory)
        # A new process would rebuild the model: here a fresh model, same directory.
        resumed, history = self._train(2, directory)
        self.assertEqual(history.epoch, [1])
        self.assertEqual(int(resumed.optimizer.iterations.numpy()), 2 * self.steps_per_epoch)
        # Weights, momentum and the augmentation's seed state were all restored.
        for actual, wanted in zip(resumed.variables, uninterrupted):
            self.assertAllEqual(actual, wanted)
        rows = _read_csv(os.path.join(directory, "log.csv"))
        self.assertEqual([row["epoch"] for row in rows], ["0", "1"])
        checkpoint_dir = os.path.join(directory, "checkpoints")
        self.assertEqual(
            tf.train.latest_checkpoint(checkpoint_dir), os.path.join(checkpoint_dir, "ckpt-2")
        )

    def test_sigterm_saves_the_step_and_resume_equals_uninterrupted_run(self):
        uninterrupted = self._uninterrupted_run()["variables"]
        directory = self._temp_dir()
        handler_before = signal.getsignal(signal.SIGTERM)
        with self.assertRaisesRegex(callbacks.TrainingPreempted, r"epoch 1, step 1"):
            self._train(2, directory, callbacks=[_SignalAt(0, 0, signal.SIGTERM)])
        checkpoint = tf.train.latest_checkpoint(os.path.join(directory, "checkpoints"))
        self.assertEqual(tf.train.load_variable(checkpoint, custom_loop._STEP_KEY), 1)
        self.assertEqual(custom_loop.completed_epochs(os.path.join(directory, "checkpoints")), 0)
        # The handler is uninstalled: the one installed before the run is back
        # (SIG_DFL in a fresh process; another test's may be in place under pytest).
        self.assertEqual(signal.getsignal(signal.SIGTERM), handler_before)
        resumed, history = self._train(2, directory)
        self.assertEqual(history.epoch, [0, 1])
        self.assertEqual(int(resumed.optimizer.iterations.numpy()), 2 * self.steps_per_epoch)
        for actual, wanted in zip(resumed.variables, uninterrupted):
            self.assertAllEqual(actual, wanted)

    def test_dataset_that_runs_out(self):
        def dataset_fn(input_context, epoch):
            del epoch
            batch = input_context.get_per_replica_batch_size(4)
            dataset = tf.data.Dataset.from_tensor_slices((self.images, self.labels))
            return dataset.batch(batch).take(0)

        with self.assertRaisesRegex(ValueError, r"ran out after step 0 of epoch 0 .*\.repeat\(\)"):
            custom_loop.train(self._model(), self.strategy, dataset_fn, 2, 2,
                              os.path.join(self._temp_dir(), "checkpoints"), verbose=0)

    def test_invalid_arguments(self):
        model = self._model()
        dataset_fn = _loop_dataset_fn(self.images, self.labels, 4)
        directory = self._temp_dir()
        with self.assertRaisesRegex(ValueError, r"epochs=0 must be an int >= 1"):
            custom_loop.train(model, self.strategy, dataset_fn, 0, 2, directory)
        with self.assertRaisesRegex(ValueError, r"steps_per_epoch=1.5 must be an int >= 1"):
            custom_loop.train(model, self.strategy, dataset_fn, 1, 1.5, directory)
        with self.assertRaisesRegex(ValueError, r"verbose=2 must be 0 or 1"):
            custom_loop.train(model, self.strategy, dataset_fn, 1, 1, directory, verbose=2)
        with self.strategy.scope():
            uncompiled = cgc_tf.CGCModel(testing_models.tiny_convnet(16), views=2)
        with self.assertRaisesRegex(ValueError, r"model must be compiled"):
            custom_loop.train(uncompiled, self.strategy, dataset_fn, 1, 1, directory)
        with self.strategy.scope():
            uncompiled.compile(optimizer="sgd", jit_compile=True)
        with self.assertRaisesRegex(ValueError, r"jit_compile=True.* 2 replicas"):
            custom_loop.train(uncompiled, self.strategy, dataset_fn, 1, 1, directory)


@pytest.mark.slow
class MultiWorkerTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="cgc_tf_multi_worker_test_")
        cls.data_dir = os.path.join(cls.root, "tfds")
        # Build the embedded dataset once here: two workers building it at the
        # same time into one data_dir would race.
        from cgc_tf import data

        data.train_dataset(
            "cluttered_digits", _GLOBAL_BATCH, _IMAGE_SIZE, data_dir=cls.data_dir,
            classification_view=False,
        )

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def _launch(self, model_dir, worker_1_arguments=()):
        ports = testing_processes.free_ports(_NUM_WORKERS)
        processes = []
        for index in range(_NUM_WORKERS):
            environment = testing_processes.worker_environment(
                ports,
                index,
                # Non-chief checkpoints go to tempfile directories: keep them here.
                TMPDIR=os.path.join(model_dir, f"tmp_{index}"),
            )
            os.makedirs(environment["TMPDIR"], exist_ok=True)
            arguments = [
                sys.executable, os.path.abspath(__file__), "--model_dir", model_dir,
                "--data_dir", self.data_dir,
            ]
            if index == 1:
                arguments += list(worker_1_arguments)
            log = open(os.path.join(model_dir, f"worker_{index}.log"), "a")
            self.addCleanup(log.close)
            processes.append(
                subprocess.Popen(arguments, env=environment, stdout=log, stderr=subprocess.STDOUT)
            )
        for process in processes:
            self.addCleanup(lambda p=process: p.poll() is None and p.kill())
        return processes

    def _log(self, model_dir, index):
        with open(os.path.join(model_dir, f"worker_{index}.log")) as file:
            return file.read()[-4000:]

    def _wait(self, process, model_dir, index, timeout=_RUN_TIMEOUT_SECONDS):
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            self.fail(f"worker {index} timed out; its log:\n{self._log(model_dir, index)}")

    def _run_to_the_end(self, model_dir):
        """Both workers finish; returns their results and final weights."""
        processes = self._launch(model_dir)
        for index, process in enumerate(processes):
            self.assertEqual(self._wait(process, model_dir, index), 0, self._log(model_dir, index))
        results, weights = [], []
        for index in range(_NUM_WORKERS):
            with open(os.path.join(model_dir, f"result_{index}.json")) as file:
                results.append(json.load(file))
            weights.append(dict(np.load(os.path.join(model_dir, f"weights_{index}.npz"))))
        return results, weights

    def test_preempted_and_killed_run_ends_like_an_uninterrupted_one(self):
        uninterrupted_dir = os.path.join(self.root, "uninterrupted")
        os.makedirs(uninterrupted_dir)
        _, uninterrupted = self._run_to_the_end(uninterrupted_dir)

        model_dir = os.path.join(self.root, "run")
        os.makedirs(model_dir)
        checkpoint_dir = os.path.join(model_dir, "checkpoints")

        # Run 1: worker 1 is preempted (SIGTERM) in epoch 0: every worker saves
        # after the same step and exits with TrainingPreempted.
        processes = self._launch(model_dir, ["--signal", "SIGTERM", "--at", "0,1"])
        for index, process in enumerate(processes):
            self.assertEqual(
                self._wait(process, model_dir, index), _EXIT_PREEMPTED, self._log(model_dir, index)
            )
        latest = tf.train.latest_checkpoint(checkpoint_dir)
        self.assertEqual(int(tf.train.load_variable(latest, custom_loop._STEP_KEY)), 2)
        self.assertEqual(custom_loop.completed_epochs(checkpoint_dir), 0)

        # Run 2: resumes at epoch 0, step 2; worker 1 dies (SIGKILL) in epoch 1,
        # after the chief saved epoch 0.
        chief, worker = self._launch(model_dir, ["--signal", "SIGKILL", "--at", "1,1"])
        self.assertEqual(self._wait(worker, model_dir, 1), -signal.SIGKILL, self._log(model_dir, 1))
        # The chief is now stuck in (or failing) a collective with the dead peer;
        # a cluster manager would restart the whole job: kill it too.
        time.sleep(1.0)
        if chief.poll() is None:
            chief.kill()
        chief.wait()
        self.assertEqual(tf.train.latest_checkpoint(checkpoint_dir),
                         os.path.join(checkpoint_dir, "ckpt-1"))
        self.assertEqual(custom_loop.completed_epochs(checkpoint_dir), 1)
        rows = _read_csv(os.path.join(model_dir, "log.csv"))
        self.assertEqual([row["epoch"] for row in rows], ["0"])

        # Run 3: both restart from the chief's checkpoint of epoch 1 (at most one
        # epoch lost) and finish.
        results, weights = self._run_to_the_end(model_dir)
        for result in results:
            self.assertEqual(result["epochs_run"], [_CRASH_EPOCH])
            self.assertEqual(result["optimizer_iterations"], _EPOCHS * _STEPS_PER_EPOCH)
            self.assertTrue(np.isfinite(result["loss"]))
        rows = _read_csv(os.path.join(model_dir, "log.csv"))
        self.assertEqual([row["epoch"] for row in rows], ["0", "1"])
        self.assertEqual(tf.train.latest_checkpoint(checkpoint_dir),
                         os.path.join(checkpoint_dir, f"ckpt-{_EPOCHS}"))
        # Worker 1's temporary checkpoint directories of the finished and the
        # preempted run are gone; only the killed run's remains.
        leftovers = [
            name for name in os.listdir(os.path.join(model_dir, "tmp_1"))
            if name.startswith("cgc_tf_worker_checkpoint_")
        ]
        self.assertLen(leftovers, 1)

        self.assertEqual(sorted(weights[0]), sorted(weights[1]))
        for name in weights[0]:
            self.assertAllEqual(weights[0][name], weights[1][name])
            # Every epoch's batches depend on its index only: the interrupted run
            # trained on the uninterrupted run's batches, from restored states.
            self.assertAllClose(weights[0][name], uninterrupted[0][name], atol=1e-6, rtol=0)
        # Training moved the weights away from the initial ones.
        initial = np.load(os.path.join(uninterrupted_dir, "initial_weights.npz"))
        moved = max(np.abs(initial[name] - weights[0][name]).max() for name in initial.files)
        self.assertGreater(moved, 1e-3)


class _SignalAt(keras.callbacks.Callback):
    """Sends `signum` to its own process at the start of (epoch, step).

    SIGKILL: a lost worker. SIGTERM: a preempted one.
    """

    def __init__(self, epoch, step, signum):
        super().__init__()
        self.signal_epoch, self.signal_step, self.signum = epoch, step, signum
        self.epoch_index = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_index = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch_index, batch) == (self.signal_epoch, self.signal_step):
            os.kill(os.getpid(), self.signum)


def _worker_main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--signal", choices=["SIGTERM", "SIGKILL"], default=None)
    parser.add_argument("--at", default=None, help="epoch,step where worker 1 gets --signal")
    args = parser.parse_args(argv)

    from cgc_tf import data
    from cgc_tf import distribute

    # Before any TensorFlow op: the strategy configures the runtime's collectives.
    strategy = distribute.strategy_from_name("multi_worker")

    index = strategy.cluster_resolver.task_id
    with strategy.scope():
        model = cgc_tf.CGCModel(
            testing_models.tiny_convnet(_IMAGE_SIZE, _NUM_CLASSES),
            views=2,
            global_negatives=True,
            augmentation=cgc_tf.PairedAugmentation(seed=0),
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    if distribute.is_chief(strategy) and args.signal is None:
        path = os.path.join(args.model_dir, "initial_weights.npz")
        if not os.path.exists(path):
            np.savez(path, **{v.path: v.numpy() for v in model.trainable_variables})

    def dataset_fn(input_context, epoch):
        batches = data.train_dataset(
            "cluttered_digits",
            input_context.get_per_replica_batch_size(_GLOBAL_BATCH),
            _IMAGE_SIZE,
            data_dir=args.data_dir,
            classification_view=False,
            seed=epoch,
            # A full-split buffer would decode the worker's whole share before the
            # first step.
            shuffle_buffer=32,
            # Each worker reads and decodes only its share of the records.
            num_shards=input_context.num_input_pipelines,
            shard_index=input_context.input_pipeline_id,
        )
        return batches.repeat()

    signal_callbacks = None
    if args.signal is not None:
        epoch, step = (int(value) for value in args.at.split(","))
        signal_callbacks = [_SignalAt(epoch, step, getattr(signal, args.signal))]
    try:
        history = custom_loop.train(
            model,
            strategy,
            dataset_fn,
            epochs=_EPOCHS,
            steps_per_epoch=_STEPS_PER_EPOCH,
            checkpoint_dir=os.path.join(args.model_dir, "checkpoints"),
            csv_path=os.path.join(args.model_dir, "log.csv"),
            callbacks=signal_callbacks,
            verbose=0,
        )
    except callbacks.TrainingPreempted as error:
        print(error, flush=True)
        sys.exit(_EXIT_PREEMPTED)
    np.savez(
        os.path.join(args.model_dir, f"weights_{index}.npz"),
        **{v.path: v.numpy() for v in model.trainable_variables},
    )
    with open(os.path.join(args.model_dir, f"result_{index}.json"), "w") as file:
        json.dump(
            {
                "epochs_run": history.epoch,
                "loss": history.history["loss"][-1],
                "optimizer_iterations": int(model.optimizer.iterations.numpy()),
            },
            file,
        )


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
