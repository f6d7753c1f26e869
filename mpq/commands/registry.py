"""What a sub-command is: its name, its parser's arguments and its handler (the CLI is built from these)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

Handler = Callable[[argparse.Namespace], int | None]


@dataclass(frozen=True)
class Command:
    """One ``mpq`` sub-command: ``add_arguments(parser)`` declares its options, ``handler(args)`` runs it (an
    ``int`` return is the exit status)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Handler
    description: str | None = None
