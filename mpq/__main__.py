"""``python -m mpq`` (and ``torchrun -m mpq``) is the ``mpq`` command."""

from mpq.runner.cli import main_entry

main_entry()
