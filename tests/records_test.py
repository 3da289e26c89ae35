"""Tests of cgc_tf/data/records.py: the shard check every source runs (called
through `cgc_tf.data.sources`, which re-exports it)."""

import numpy as np
import tensorflow as tf

from cgc_tf.data import sources


class CheckShardTest(tf.test.TestCase):
    def test_valid_shards_pass(self):
        for num_shards, shard_index in ((1, 0), (4, 3), (np.int64(2), np.int32(1))):
            sources.check_shard(num_shards, shard_index)

    def test_invalid_shards_name_the_argument(self):
        cases = (
            ((0, 0), r"num_shards=0 must be an integer >= 1"),
            ((2, -1), r"shard_index=-1 must be an integer >= 0"),
            ((2, 2), r"shard_index=2 must be < num_shards=2"),
            ((True, 0), r"num_shards=True must be an integer"),
            ((2, 0.5), r"shard_index=0.5 must be an integer"),
        )
        for arguments, pattern in cases:
            with self.assertRaisesRegex(ValueError, pattern):
                sources.check_shard(*arguments)


if __name__ == "__main__":
    tf.test.main()
