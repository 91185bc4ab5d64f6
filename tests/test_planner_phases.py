"""build_plan's named phases: one cycle check naming the cycle, optional config keys said once."""

from __future__ import annotations

import pytest

from harc_hpc.pipeline import planner
from harc_hpc.pipeline.planner import ConfigKey, Need, PlanError, StageSpec, Task, config_keys


def _spec(name, split="layer", needs=(), sections=()):
    return StageSpec(name=name, function="m:f", split=split, needs=[Need(**n) for n in needs],
                     config_sections=list(sections))


def test_optional_config_keys_are_marked_by_a_trailing_question_mark():
    spec = _spec("s", sections=["harc.alpha", "mergeme?"])
    assert config_keys(spec) == [ConfigKey("harc.alpha"), ConfigKey("mergeme", optional=True)]


def test_a_stage_cycle_is_refused_naming_it():
    specs = {"a": _spec("a", needs=[{"stage": "b"}]), "b": _spec("b", needs=[{"stage": "a"}])}
    with pytest.raises(PlanError, match="stage specs: dependency cycle a -> b -> a"):
        planner._stage_order(specs)


def test_a_task_cycle_through_previous_is_refused_by_the_same_check():
    # a[k] needs b[k-1]; every b needs every a: no stage cycle, but a[1] -> b[0] -> a[1]
    specs = {"a": _spec("a", "block", needs=[{"stage": "b", "where": {"block": "previous"}}]),
             "b": _spec("b", "block", needs=[{"stage": "a"}])}
    assert planner._stage_order(specs) == ["a", "b"]
    by_stage = planner.expand_tasks(specs, [0, 1], [[0], [1]], ["t"], {})
    planner.link_needs(specs, by_stage)
    with pytest.raises(PlanError, match="task dependency cycle"):
        planner.dependency_order(by_stage)


def test_expand_tasks_by_split():
    specs = {"n": _spec("n", "none"), "l": _spec("l", "layer"), "lt": _spec("lt", "layer_task")}
    by_stage = planner.expand_tasks(specs, [3, 5], [[3, 5]], ["x", "y"], {"v": 1})
    assert [t.key for t in by_stage["n"]] == ["all"]
    assert [t.key for t in by_stage["l"]] == ["layer-003", "layer-005"]
    assert [t.id for t in by_stage["lt"]][:2] == ["lt/layer-003/task-x", "lt/layer-003/task-y"]
    assert all(isinstance(t, Task) and t.extra_values == {"v": 1} for ts in by_stage.values() for t in ts)
