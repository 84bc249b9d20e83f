"""The errors that mean bad input, or a full disk (``disk_full``), which the user must fix
too: the run stops on every rank with exit code 2 and one line naming the setting (or
path) and the fix (``launch/train.py``'s ``cli``). Anything else is a bug or a broken
machine: exit code 1 and a traceback on the rank that raised it."""

from .config import ConfigError
from .data import DataError
from .disk_full import DiskFullError
from .faults import InjectedFailure
from .importance import SelectionError
from .model import ModelError
from .run_checkpoint import CheckpointError

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, SelectionError, InjectedFailure,
               DiskFullError)
