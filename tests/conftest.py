import os
import sys

import pytest

# Let plain `pytest` (not only `python -m pytest`) import the modules at the repo root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_dance(tmp_path_factory):
    """A small generated dataset shared by the tests; copy it before changing anything in it.

    3 training videos of 2 windows of 16 frames, 2 dancers, val 20 frames, 2 test sequences and
    1 unseen-dancer sequence of 20 frames, at 32x64.
    """
    from scripts.make_dance_data import make_dataset
    root = tmp_path_factory.mktemp("tiny") / "DR"
    make_dataset(root, train_frames=96, val_frames=20, test_seqs=2, test_len=20, height=32,
                 width=64, dancers=2, train_videos=3, unseen_seqs=1, progress=False)
    return root
