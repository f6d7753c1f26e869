"""The entry layer: the ``mpq`` command (one module per sub-command, each registering its parser and handler),
the stage registry that runs a run's stages in order, and the local launcher of ``--nproc`` jobs.

Nothing below this package imports it: stages, the model side and the infrastructure know nothing of commands."""
