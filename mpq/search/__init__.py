"""The search: the integer program and its solvers (``program``), building it from a run or MixDQ files (``build``),
the sweep (``sweep``), the candidate table (``candidates``), MixDQ's sensitivity files (``mixdq_files``), one-off
solves (``oneoff``)."""
