"""Tests of cgc_tf/evaluation_progress.py: the lines ProgressLine prints, with a fake clock."""

import contextlib
import io

import tensorflow as tf

from cgc_tf import evaluation_progress


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _line(stream, interactive, interval=30.0):
    clock = _Clock()
    line = evaluation_progress.ProgressLine(
        "Explanation metrics", stream=stream, interactive=interactive, interval=interval,
        clock=clock,
    )
    return line, clock


class ProgressLineTest(tf.test.TestCase):
    def test_log_lines_every_interval_and_seconds_per_metric(self):
        stream = io.StringIO()
        line, clock = _line(stream, interactive=False)
        clock.now += 2
        line("grad-cam", 4, 6)  # 2 s after the start: no line yet (interval 30 s)
        clock.now += 30
        line("insertion/deletion", 4, 6)  # 32 s: a line
        clock.now += 5
        line("consistency", 4, 6)  # 5 s after the last line: none
        clock.now += 1
        line("grad-cam", 6, 6)
        clock.now += 3
        line("insertion/deletion", 6, 6)
        clock.now += 25
        line("consistency", 6, 6)  # 33 s after the last line: a line
        line.close()
        self.assertEqual(
            stream.getvalue().splitlines(),
            [
                "Explanation metrics: insertion/deletion 4/6 images, 32 s",
                "Explanation metrics: consistency 6/6 images, 66 s",
                "Explanation metrics: 6 images in 66 s "
                "(grad-cam 3 s, insertion/deletion 33 s, consistency 30 s)",
            ],
        )
        self.assertEqual(
            line.seconds, {"grad-cam": 3.0, "insertion/deletion": 33.0, "consistency": 30.0}
        )

    def test_terminal_rewrites_one_line_padded_over_the_longer_one(self):
        stream = io.StringIO()
        line, clock = _line(stream, interactive=True)
        line("insertion/deletion", 4, None)
        line("grad-cam", 6, None)
        clock.now += 7
        line.close()
        first = "Explanation metrics: insertion/deletion 4 images, 0 s"
        second = "Explanation metrics: grad-cam 6 images, 0 s"
        final = "Explanation metrics: 6 images in 7 s (insertion/deletion 0 s, grad-cam 0 s)"
        self.assertEqual(
            stream.getvalue(),
            "\r" + first + "\r" + second.ljust(len(first)) + "\r" + final.ljust(len(first)) + "\n",
        )

    def test_nothing_reported_prints_nothing(self):
        stream = io.StringIO()
        line, _ = _line(stream, interactive=False, interval=0.0)
        line.close()
        self.assertEqual(stream.getvalue(), "")

    def test_interval_zero_prints_every_call_and_a_string_stream_is_not_a_terminal(self):
        stream = io.StringIO()
        line = evaluation_progress.ProgressLine("T", stream=stream, interval=0.0)
        line("consistency", 2, 4)
        line("consistency", 4, 4)
        self.assertEqual(len(stream.getvalue().splitlines()), 2)
        self.assertNotIn("\r", stream.getvalue())

    def test_negative_interval_is_an_error(self):
        with self.assertRaisesRegex(ValueError, "interval=-1"):
            evaluation_progress.ProgressLine("T", interval=-1)


class ProgressTest(tf.test.TestCase):
    def test_a_hook_gets_stage_done_and_the_total(self):
        calls = []
        progress = evaluation_progress.Progress(lambda *call: calls.append(call), "T")
        progress.total = 8
        progress.report("grad-cam", 4)
        progress.close()
        self.assertEqual(calls, [("grad-cam", 4, 8)])

    def test_false_prints_nothing_and_true_prints_lines_to_stdout(self):
        stream = io.StringIO()
        with contextlib.redirect_stdout(stream):
            silent = evaluation_progress.Progress(False, "Quiet")
            silent.report("consistency", 2)
            silent.close()
            self.assertEqual(stream.getvalue(), "")
            shown = evaluation_progress.Progress(True, "Shown")
            shown.report("consistency", 2)
            shown.close()
        self.assertIn("Shown: 2 images in", stream.getvalue())

    def test_anything_else_is_an_error(self):
        with self.assertRaisesRegex(ValueError, "`progress` must be a bool or a callable"):
            evaluation_progress.Progress("yes", "T")


if __name__ == "__main__":
    tf.test.main()
