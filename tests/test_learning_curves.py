"""experiments/learning_curves.py reads both codes' logs as they are written, resumes included."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))

import learning_curves as lc  # noqa: E402

OURS = """I1128 10:40:26 logs.py:93] epoch 1/300: test top-1 10.00% (best 10.00%), loss 2.3 | T 1.0
I1128 10:51:07 logs.py:93] epoch 2/300: test top-1 18.90% (best 18.90%), loss 2.2017 | T 4621.7
I1128 11:31:04 train.py:180] resumed from step 500 in /tmp/w
I1128 11:40:00 logs.py:93] epoch 2/300: test top-1 18.95% (best 18.95%), loss 2.2017 | T 4621.7
I1128 11:52:00 logs.py:93] epoch 3/300: test top-1 33.02% (best 33.02%), loss 1.9 | T 5000.0
"""
PUBLISHED = """11/28 10:41:30 AM | Test Loss: 2.3074	 Acc: 19.54%		 Time: 44.93s
11/28 10:41:30 AM | Best Acc: 19.54%
11/28 10:55:19 AM | Test Loss: 1.7223	 Acc: 37.40%		 Time: 47.41s
"""


def test_each_epoch_keeps_its_last_line_and_the_published_order():
    assert lc.ours_curve(OURS) == [10.00, 18.95, 33.02]  # the repeated epoch 2: its last line
    assert lc.published_curve(PUBLISHED) == [19.54, 37.40]


def test_noise_is_the_median_distance_from_the_neighbours_mean():
    assert lc.noise([10.0, 20.0, 30.0, 40.0]) == 0.0  # a straight line
    assert lc.noise([10.0, 30.0, 10.0, 30.0, 10.0]) == 20.0
    assert lc.noise([1.0, 2.0]) == 0.0


def test_the_table_lines_up_curves_of_different_lengths():
    table = lc.table({"R56": ([10.0, 20.0, 30.0], [15.0, 25.0])})
    lines = table.splitlines()
    assert lines[0] == "| run | 1 | 2 | 3 | noise |"
    assert lines[1].count("---") == 5
    assert lines[3] == "| R56 published | 15.00 | 25.00 |  | 0.00 |"
    assert lines[4] == "| R56 ours - published | -5.00 | -5.00 |  | |"
