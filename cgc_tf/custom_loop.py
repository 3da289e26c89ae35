"""A training loop for MultiWorkerMirroredStrategy that drives the model's own `train_step`.

Keras 3 `Model.fit` does not support MultiWorkerMirroredStrategy, so multi-worker
training runs this loop: each step is `strategy.run(model.train_step)` in a
`tf.function`, as in `fit`, so both paths train the same objective. Checkpoints
after every epoch and on SIGTERM, and resuming from them: docs/distributed.md.
"""

import os
import shutil
import signal
import tempfile
import threading

import keras
import numpy as np
import tensorflow as tf

from cgc_tf import callbacks as callbacks_lib
from cgc_tf import distribute

# The keys of the epoch and step counters in the checkpoints `train` writes.
_EPOCH_KEY = "epoch/.ATTRIBUTES/VARIABLE_VALUE"
_STEP_KEY = "step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE"
# The log entry of the all-reduced SIGTERM flag (removed before callbacks see the logs).
_PREEMPTED_KEY = "_preempted"


def completed_epochs(checkpoint_dir):
    """Epochs recorded in the latest checkpoint `train` wrote to `checkpoint_dir`.

    Args:
      checkpoint_dir: the `checkpoint_dir` of `train`.

    Returns:
      int, 0 when the directory holds no checkpoint (or does not exist).
    """
    latest = tf.train.latest_checkpoint(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
    if latest is None:
        return 0
    return int(tf.train.load_variable(latest, _EPOCH_KEY))


def barrier(strategy):
    """Returns once every worker of `strategy` has called it.

    A cross-replica sum of ones: a collective op that no worker finishes before
    all have started it. Every worker must call it the same number of times.

    Args:
      strategy: a tf.distribute.Strategy (with one worker this returns at once).

    Returns:
      int, the number of replicas that took part (`strategy.num_replicas_in_sync`).
    """

    @tf.function
    def count_replicas():
        ones = strategy.run(lambda: tf.ones([], tf.int32))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)

    return int(count_replicas().numpy())


def train(
    model,
    strategy,
    dataset_fn,
    epochs,
    steps_per_epoch,
    checkpoint_dir,
    csv_path=None,
    callbacks=None,
    verbose=1,
):
    """Trains `model` for `epochs` epochs, resuming from `checkpoint_dir` if it holds a checkpoint.

    Args:
      model: a compiled keras.Model (e.g. `CGCModel`) whose weights and optimizer
        were created under `strategy.scope()`.
      strategy: the tf.distribute.Strategy the model was built under.
      dataset_fn: callable(input_context, epoch) -> tf.data.Dataset of epoch
        `epoch`'s batches for this input pipeline: batches of
        `input_context.get_per_replica_batch_size(global_batch_size)` examples,
        this pipeline's share (`input_context.input_pipeline_id`), at least
        `steps_per_epoch` batches per local replica (repeat it when unsure).
        Called at the start of every epoch (through
        `strategy.distribute_datasets_from_function`), so an epoch's batches
        depend on its index only and a resumed run trains on exactly the
        batches an uninterrupted one would.
      epochs: int >= 1, the total number of epochs including those of a run
        that is resumed.
      steps_per_epoch: int >= 1, optimizer steps per epoch.
      checkpoint_dir: directory of the chief's checkpoints, readable by every
        worker (shared file system or cloud storage); created if missing.
      csv_path: optional CSV file that gets one row per epoch on the chief
        (`callbacks.ResumableCSVLogger` with append=True, so a resumed run adds
        rows in the same columns; rows of epochs past the restored checkpoint
        are dropped first).
      callbacks: optional list of keras.callbacks.Callback, called on every worker
        with logs already averaged over all replicas. Do not pass
        BackupAndRestore or ModelCheckpoint: this loop checkpoints itself.
      verbose: 1 shows a progress bar on the chief, 0 is silent.

    Returns:
      keras.callbacks.History of the epochs run by this call (`history.epoch`
      holds the absolute epoch indices, so a resumed run starts past 0).

    Raises:
      ValueError: on invalid arguments, or if the dataset runs out of batches.
      callbacks.TrainingPreempted: a worker received SIGTERM; every worker saved
        a checkpoint after the same step, from which a restart resumes.
    """
    for argument, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument}={value!r} must be an int >= 1")
    if verbose not in (0, 1):
        raise ValueError(f"verbose={verbose!r} must be 0 or 1")
    if getattr(model, "optimizer", None) is None:
        raise ValueError("model must be compiled (model.compile(optimizer=...)) before train()")
    if model.jit_compile and strategy.num_replicas_in_sync > 1:
        # XLA would compile the whole multi-replica step for one device, which
        # cannot reach the other replicas' variables; Keras's jit_compile="auto"
        # turns XLA off under tf.distribute for the same reason.
        raise ValueError(
            f"model was compiled with jit_compile=True, which does not work with "
            f"{strategy.num_replicas_in_sync} replicas; compile with jit_compile=False "
            "(or 'auto')"
        )
    chief = distribute.is_chief(strategy)

    with strategy.scope():
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        # Steps done in epoch `epoch` when a SIGTERM checkpoint was saved (0 after
        # a completed epoch).
        step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    first_epoch, first_step = 0, 0
    if latest:
        first_epoch = int(tf.train.load_variable(latest, _EPOCH_KEY))
        first_step = int(tf.train.load_variable(latest, _STEP_KEY))

    # dataset_fn runs once per local input pipeline when the distributed dataset
    # is made (the strategy builds the datasets eagerly); a sharded dataset_fn
    # must not be called again with a default InputContext, which would read
    # (and decode) the whole dataset.
    element_specs = []
    local_replicas = len(strategy.extended.worker_devices)

    def distributed_epoch(epoch_index, skip_steps):
        def epoch_dataset_fn(input_context):
            dataset = dataset_fn(input_context, epoch_index)
            element_specs.append(dataset.element_spec)
            # Each step takes one batch per local replica from this pipeline.
            return dataset.skip(skip_steps * local_replicas) if skip_steps else dataset

        return iter(strategy.distribute_datasets_from_function(epoch_dataset_fn))

    iterator = distributed_epoch(first_epoch, first_step) if first_epoch < epochs else None
    with strategy.scope():
        # All state must exist before tracing (strategy.run cannot create
        # distributed variables) and before restoring. Keras's fit builds it the
        # same way, from symbolic tensors shaped like a batch: the optimizer slots
        # and the compiled metrics (a private method; there is no public one).
        if element_specs:
            model._symbolic_build(data_batch=element_specs[0])  # pylint: disable=protected-access
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    # Keras 3 models are not tf.train.Checkpoint trackables (a Checkpoint of the
    # model object saves none of its variables), so the variables are listed:
    # model.variables holds the weights, BatchNorm statistics and random-generator
    # states; they are matched by position, which a rebuilt model reproduces.
    checkpoint = tf.train.Checkpoint(
        model_variables=list(model.variables),
        optimizer_variables=list(model.optimizer.variables),
        epoch=epoch,
        step_in_epoch=step_in_epoch,
    )
    if latest:
        checkpoint.restore(latest).assert_consumed()
    if chief and csv_path:
        callbacks_lib.truncate_csv_log(csv_path, first_epoch)
    write_dir = checkpoint_dir if chief else tempfile.mkdtemp(prefix="cgc_tf_worker_checkpoint_")
    manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=1)

    step_function = _make_step_function(model, strategy)
    preemption = _SigtermFlag()

    callback_list = list(callbacks or [])
    if chief and csv_path:
        callback_list.append(callbacks_lib.ResumableCSVLogger(csv_path, append=True))
    callback_list = keras.callbacks.CallbackList(
        callback_list,
        add_history=True,
        add_progbar=chief and verbose == 1,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
    )
    model.stop_training = False
    callback_list.on_train_begin()
    preemption.install()
    try:
        for epoch_index in range(first_epoch, epochs):
            model.reset_metrics()
            callback_list.on_epoch_begin(epoch_index)
            if iterator is None:
                iterator = distributed_epoch(epoch_index, 0)
            logs, preempted = {}, False
            first = first_step if epoch_index == first_epoch else 0
            for step in range(first, steps_per_epoch):
                callback_list.on_train_batch_begin(step)
                try:
                    logs = step_function(next(iterator), preemption.value())
                except (StopIteration, tf.errors.OutOfRangeError) as error:
                    raise ValueError(
                        f"dataset_fn's dataset ran out after step {step} of epoch "
                        f"{epoch_index} (steps_per_epoch={steps_per_epoch}); repeat it "
                        "with .repeat()"
                    ) from error
                # All-reduced with the step: every worker sees any worker's SIGTERM
                # after the same step, so all of them take part in the save.
                preempted = float(np.asarray(logs.pop(_PREEMPTED_KEY))) > 0
                callback_list.on_train_batch_end(step, logs)
                if preempted and step + 1 < steps_per_epoch:
                    epoch.assign(epoch_index)
                    step_in_epoch.assign(step + 1)
                    manager.save(checkpoint_number=epoch_index + 1)
                    raise callbacks_lib.TrainingPreempted(
                        f"SIGTERM received by a worker at epoch {epoch_index + 1}, step "
                        f"{step + 1}: every worker saved the training state to "
                        f"{checkpoint_dir}; restart the job to resume from the next step."
                    )
            iterator = None
            epoch_logs = {name: float(np.asarray(value)) for name, value in logs.items()}
            callback_list.on_epoch_end(epoch_index, epoch_logs)
            epoch.assign(epoch_index + 1)
            step_in_epoch.assign(0)
            manager.save(checkpoint_number=epoch_index + 1)
            if preempted:
                raise callbacks_lib.TrainingPreempted(
                    f"SIGTERM received by a worker in the last step of epoch "
                    f"{epoch_index + 1}: every worker saved the training state after that "
                    f"epoch to {checkpoint_dir}; restart the job to resume."
                )
            if model.stop_training:
                break
    finally:
        preemption.uninstall()
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    callback_list.on_train_end()
    return model.history


class _SigtermFlag:
    """Records SIGTERM (main thread only) instead of dying, for a coordinated save."""

    def __init__(self):
        self._received = False
        self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self._received = True

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def value(self):
        """float32 scalar tensor: 1 once SIGTERM arrived, else 0."""
        return tf.constant(1.0 if self._received else 0.0)


def _make_step_function(model, strategy):
    """One distributed `model.train_step`, returning its logs averaged over replicas.

    The logs also hold `_PREEMPTED_KEY`: the sum over all replicas of their
    worker's SIGTERM flag (float32 scalar, > 0 when any worker received one),
    all-reduced with the step's metrics.
    """

    def one_step(data, preempted):
        outputs = strategy.run(model.train_step, args=(data,))
        # As keras' fit ("auto" reduction): the mean of the per-replica metric
        # results (all-reduced across workers under MultiWorkerMirroredStrategy).
        logs = {
            name: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
            for name, value in outputs.items()
        }
        flags = strategy.run(tf.identity, args=(preempted,))
        logs[_PREEMPTED_KEY] = strategy.reduce(tf.distribute.ReduceOp.SUM, flags, axis=None)
        return logs

    return tf.function(one_step, reduce_retracing=True, jit_compile=bool(model.jit_compile))
