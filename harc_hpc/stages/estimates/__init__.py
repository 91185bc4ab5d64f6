"""Each stage's estimate for ``harc-hpc plan``: one module per stage module, named by its spec's
``estimate:`` entry (stages/<stage>.yaml, next to ``function:``), each a function of
(harc_hpc.stages.estimate.EstimateContext, stage name) -> StageEstimate.

An estimate sizes what the stage allocates with the helpers the stage itself sizes and places its
data with (solve_router.choose_residency, merge_statistics.statistics_kind, the capture's placement
rule, modeling.host_memory_bounds), so a change to how a stage runs is a change to its estimate.
Adding a stage: write its estimate here (or in the stage's module) and name it in its spec; nothing
central changes (harc_hpc.stages.estimate.estimate collects them).
"""
