"""The packages a script needs, checked before it loads any of them.

A Python without the project's environment (its .venv not activated, a machine without
TensorBoard) would otherwise stop with a traceback at the first import, or, for the Trainer,
after a whole epoch, when the epoch's TensorBoard row or PSNR figure imports what is missing and
the epoch is lost. Standard library only, so that the check runs before torch loads.
"""
import importlib.util
import sys

# import name -> the name requirements.txt installs it by
PIP_NAMES = {"torch": "torch", "numpy": "numpy", "tqdm": "tqdm", "PIL": "Pillow", "matplotlib": "matplotlib",
             "tensorboard": "tensorboard"}
EVERYTHING = tuple(PIP_NAMES)


def missing(names):
    """The pip names of those of `names` (import names) that this Python cannot import."""
    return [PIP_NAMES.get(n, n) for n in names if importlib.util.find_spec(n) is None]


def require(script, names=EVERYTHING):
    """Exit with one line naming what `script` needs and this Python lacks; else return."""
    lacking = missing(names)
    if lacking:
        print(f"error: {script} needs {', '.join(lacking)}, which this Python ({sys.executable}) does not "
              "have: run it in the project's environment (`source scripts/setup_env.sh` makes .venv "
              "and enters it), or `pip install -r requirements.txt`", file=sys.stderr)
        sys.exit(2)  # as for any other bad setting
