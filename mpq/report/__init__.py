"""The report: evaluation on held-out prompts (``evaluate``), figures (``plots``), ``index.html`` and
``summary.json`` (``report``)."""
