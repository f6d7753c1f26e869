"""Prompt lists shipped with mpq (``builtin:captions``, ``builtin:shapes``), read by :mod:`mpq.prompts`."""
