"""The input of a training run: its batches per epoch, datasets and input statistics.

What `cgc_tf.training` feeds `fit` and `custom_loop.train` from a TrainConfig:
the (semi-supervised) training batches with per-epoch seeds, each worker's share
under strategy='multi_worker', the eval split, and the callback that records
what each input pipeline decoded (model_dir/input_stats/). Why a module: these
decide which examples a resumed or distributed run sees (docs/training.md).
Images are float32 [B, S, S, 3] in [0, 1].
"""

import os

import keras
import numpy as np
import tensorflow as tf

from cgc_tf import data
from cgc_tf import model_dir as layout


def steps_per_epoch(config, info):
    """Optimizer steps per epoch: config.steps_per_epoch or the labelled batches per pass."""
    if config.steps_per_epoch is not None:
        return config.steps_per_epoch
    if config.examples_per_class is not None:
        examples = config.examples_per_class * info.num_classes
    else:
        examples = info.splits[info.train_split]
    return max(1, examples // config.batch_size)


def heatmap_images(eval_data, count):
    """The first `count` eval images, float32 [N, S, S, 3]."""
    images = []
    for batch in eval_data:
        x = batch[0]
        if isinstance(x, dict):
            x = x["image"]
        images.append(x.numpy())
        if sum(len(i) for i in images) >= count:
            break
    return np.concatenate(images)[:count]


def train_dataset(config, batch_size, completed_epochs, counter, num_shards=1, shard_index=0,
                  input_stats=None):
    """One pass of training batches of `batch_size`; semi-supervised with config.unlabeled.

    With `num_shards` > 1 only shard `shard_index` of the records is read and
    decoded (`data.train_dataset`); `input_stats` counts the decoded images.
    """
    sharding = {"num_shards": num_shards, "shard_index": shard_index, "input_stats": input_stats}
    # Shifting the seed by the completed epochs keeps a resumed run from
    # replaying the shuffling order of the first epochs; the labelled subset
    # keeps config.seed (subset_seed), so a resumed run trains on the same examples.
    seed = config.seed + completed_epochs
    corrupt = {"skip_corrupt_images": config.skip_corrupt_images, "corrupt_image_counter": counter}
    train = data.train_dataset(
        config.dataset,
        batch_size,
        config.image_size,
        data_dir=config.data_dir,
        examples_per_class=config.examples_per_class,
        seed=seed,
        classification_view=config.views == 3,
        drop_remainder=True,
        subset_seed=config.seed,
        **corrupt,
        **sharding,
    )
    if config.unlabeled is not None:
        unlabeled = data.unlabeled_dataset(
            config.unlabeled,
            batch_size,
            config.image_size,
            data_dir=config.data_dir,
            split=config.unlabeled_split,
            seed=seed,
            **corrupt,
            **sharding,
        )
        train = data.semi_supervised_dataset(train, unlabeled)
    return train


def eval_dataset(config, counter):
    """The eval split in batches of config.batch_size, (x, y); `counter` counts corrupt images."""
    return data.eval_dataset(
        config.dataset,
        config.batch_size,
        config.image_size,
        data_dir=config.data_dir,
        skip_corrupt_images=config.skip_corrupt_images,
        corrupt_image_counter=counter,
    )


def multi_worker_dataset_fn(config, counter, input_stats):
    """dataset_fn for `custom_loop.train`: one epoch of this worker's share of the records."""

    def dataset_fn(input_context, epoch):
        # The seed of epoch e is config.seed + e, as for the first epoch of a
        # fit run resumed after e epochs; the loop rebuilds the dataset every
        # epoch, so a resumed run sees the batches of an uninterrupted one.
        batches = train_dataset(
            config,
            input_context.get_per_replica_batch_size(config.batch_size),
            epoch,
            counter,
            num_shards=input_context.num_input_pipelines,
            shard_index=input_context.input_pipeline_id,
            input_stats=input_stats,
        )
        # The records are already sharded before decoding; tf.data's auto-shard
        # (which distribute_datasets_from_function does not apply, but an
        # experimental_distribute_dataset of this dataset would) must not split
        # this worker's share again.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF
        )
        return batches.repeat().with_options(options)

    return dataset_fn


class InputStatsWriter(keras.callbacks.Callback):
    """Writes model_dir/input_stats/worker-<index>.json after every epoch and at the end."""

    def __init__(self, model_dir, input_stats):
        super().__init__()
        self._model_dir = model_dir
        self._input_stats = input_stats
        self._epochs = 0

    def _write(self):
        values = dict(self._input_stats.as_dict(), epochs_this_run=self._epochs)
        path = layout.input_stats_file(self._input_stats.shard_index)
        layout.write_json(os.path.join(self._model_dir, path), values)

    def on_epoch_end(self, epoch, logs=None):
        self._epochs += 1
        self._write()

    def on_train_end(self, logs=None):
        self._write()
