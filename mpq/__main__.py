"""``python -m mpq`` (and ``torchrun -m mpq``) is the ``mpq`` command."""

from mpq.commands.main import main_entry

main_entry()
