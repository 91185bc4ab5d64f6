"""What a report measures (routing agreement, held-out loss, solve and stage statistics, provenance,
lm-eval) and how it is shown (report.md, plots) or compared across runs (``harc-hpc compare``)."""
