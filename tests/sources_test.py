"""Tests of cgc_tf/data/sources.py: dataset names resolved to sources."""

import tensorflow as tf

from cgc_tf.data import sources


class ResolveTest(tf.test.TestCase):
    def test_bad_names(self):
        for name in ("", None, 3):
            with self.assertRaisesRegex(ValueError, r"dataset=.* must be 'cluttered_digits'"):
                sources.resolve(name)

    def test_folder_names_give_a_folder_source_of_that_root(self):
        root = self.get_temp_dir()
        source = sources.resolve("folder:" + root)
        self.assertIsInstance(source, sources.FolderSource)
        self.assertEqual(source.root, root)


if __name__ == "__main__":
    tf.test.main()
