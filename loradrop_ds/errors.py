"""The errors that mean bad input: the run stops on every rank with exit code 2 and one
line naming the setting and the fix (``launch/train.py``'s ``cli``). Anything else is a
bug or a broken machine: exit code 1 and a traceback on the rank that raised it."""

from .config import ConfigError
from .data import DataError
from .faults import InjectedFailure
from .importance import SelectionError
from .model import ModelError
from .run_checkpoint import CheckpointError

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, SelectionError, InjectedFailure)
