"""The planner: DAG shape per block size, Merkle digests, skip/resume logic, and what a config change
invalidates; plus the local/debug executors, resources and the CLI's dry run (no SLURM needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TOY_STAGES_DIR, write_toy_config
from harc_hpc.config import load_config
from harc_hpc.pipeline import build_plan, load_specs, records
from harc_hpc.pipeline import planner as planner_mod
from harc_hpc.pipeline.api import submit_run
from harc_hpc.pipeline.status import collect
from harc_hpc.pipeline.executors.base import resolve_resources

REAL_STAGES = {
    "merge-statistics": ("harc_hpc.stages.merge_statistics:run", "none"),
    "merge-experts": ("harc_hpc.stages.merge_experts:run", "none"),
    "capture-activations": ("harc_hpc.stages.capture_activations:run", "block"),
    "compute-statistics": ("harc_hpc.stages.compute_statistics:run", "layer_task"),
    "solve-router": ("harc_hpc.stages.solve_router:run", "layer"),
    "assemble-model": ("harc_hpc.stages.assemble_model:run", "none"),
    "report": ("harc_hpc.stages.report:run", "none"),
    "router-distill": ("harc_hpc.stages.router_distill:run", "layer"),
    "router-distill-model": ("harc_hpc.stages.router_distill:assemble", "none"),
    "finetune": ("harc_hpc.stages.finetune:run", "none"),
}
LAYERS = [0, 1, 2, 3]


def cfg_of(tmp_path, overrides=None, **harc):
    return load_config(write_toy_config(tmp_path, **harc), overrides=overrides)


def plan_of(cfg, layers=LAYERS, specs_dir=None):
    return build_plan(cfg, specs_dir=specs_dir, layers=layers)


def ids(plan, stage):
    return [t.key for t in plan.tasks.values() if t.stage == stage]


def changed(a, b):
    return sorted(t for t in a.tasks if a.tasks[t].digest != b.tasks[t].digest)


def test_real_specs_are_valid_and_name_the_stage_modules():
    specs = load_specs()
    assert {n: (s.function, s.split) for n, s in specs.items()} == REAL_STAGES
    assert planner_mod.default_specs_dir() == Path(__file__).resolve().parent.parent / "stages"
    stats = specs["compute-statistics"]
    assert not any("alpha" in c for c in stats.config_sections)  # statistics are alpha-independent
    assert "harc.alpha" in specs["solve-router"].config_sections
    assert not any("calibration" in c for c in specs["merge-experts"].config_sections)


def test_specs_dir_from_environment(monkeypatch):
    monkeypatch.setenv("HARC_HPC_STAGES", str(TOY_STAGES_DIR))
    assert planner_mod.default_specs_dir() == TOY_STAGES_DIR
    assert load_specs()["solve-router"].function == "harc_toy_stages:solve"


def test_a_wheel_install_finds_its_stage_specs(tmp_path):
    """A non-editable install has no source checkout beside the package: the wheel carries the specs
    as data and the planner finds them there."""
    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(repo),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("harc_hpc-*.whl")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # the dependencies come from this environment, appended after the new site-packages
    import sysconfig
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    probe = ("import harc_hpc, json; from harc_hpc.pipeline import default_specs_dir, load_specs; "
             "print(json.dumps([harc_hpc.__file__, str(default_specs_dir()), sorted(load_specs())]))")
    env = {k: v for k, v in os.environ.items() if k != "HARC_HPC_STAGES"}
    out = subprocess.run([py, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    package_file, specs_dir, names = json.loads(out.stdout)
    assert Path(package_file).is_relative_to(env_dir)
    assert Path(specs_dir) == env_dir / "share" / "harc-hpc" / "stages"
    assert names == sorted(REAL_STAGES)


def test_dag_sequential_block_size_1(tmp_path):
    plan = plan_of(cfg_of(tmp_path, block_size=1))
    assert ids(plan, "capture-activations") == [f"block-{b:03d}" for b in range(4)]
    assert ids(plan, "compute-statistics")[:2] == ["layer-000/task-a", "layer-000/task-b"]
    assert len(ids(plan, "compute-statistics")) == 8 and len(ids(plan, "solve-router")) == 4
    cap2 = plan.tasks["capture-activations/block-002"]
    assert sorted(cap2.needs) == ["capture-activations/block-001", "merge-experts/all", "solve-router/layer-001"]
    assert plan.tasks["capture-activations/block-000"].needs == ["merge-experts/all"]
    assert plan.tasks["solve-router/layer-003"].needs == [
        "compute-statistics/layer-003/task-a", "compute-statistics/layer-003/task-b"]
    assert plan.tasks["compute-statistics/layer-002/task-b"].needs == ["capture-activations/block-002"]
    assert plan.tasks["assemble-model/all"].needs == [f"solve-router/layer-{l:03d}" for l in LAYERS]
    assert plan.tasks["report/all"].needs == ["assemble-model/all"]
    # Tasks come in a dependency order: every need is listed before its task.
    seen = set()
    for t in plan.tasks.values():
        assert set(t.needs) <= seen
        seen.add(t.id)
    groups = [g.name for g in plan.groups()]
    assert len(groups) == 1 + 3 * 4 + 2
    assert groups[:4] == ["merge-experts", "capture-activations/block-000", "compute-statistics/block-000",
                          "solve-router/block-000"]


def test_dag_block_size_2(tmp_path):
    plan = plan_of(cfg_of(tmp_path, block_size=2))
    assert plan.blocks == [[0, 1], [2, 3]]
    assert ids(plan, "capture-activations") == ["block-000", "block-001"]
    assert sorted(plan.tasks["capture-activations/block-001"].needs) == [
        "capture-activations/block-000", "merge-experts/all", "solve-router/layer-000", "solve-router/layer-001"]
    g = {g.name: g for g in plan.groups()}
    assert [t.key for t in g["solve-router/block-001"].tasks] == ["layer-002", "layer-003"]
    assert len(g["compute-statistics/block-000"].tasks) == 4
    needs = plan.group_needs(g["capture-activations/block-001"], plan.groups())
    assert sorted(n.name for n in needs) == ["capture-activations/block-000", "merge-experts",
                                             "solve-router/block-000"]


def test_dag_one_block_is_fully_parallel(tmp_path):
    plan = plan_of(cfg_of(tmp_path, block_size=4))
    assert ids(plan, "capture-activations") == ["block-000"]
    assert plan.tasks["capture-activations/block-000"].needs == ["merge-experts/all"]
    assert [g.name for g in plan.groups()] == [
        "merge-experts", "capture-activations/block-000", "compute-statistics/block-000",
        "solve-router/block-000", "assemble-model", "report"]
    # A block size larger than the layer count is one block too.
    assert plan_of(cfg_of(tmp_path, block_size=16)).blocks == [LAYERS]


def test_digests_are_stable_and_ignore_runtime_settings(tmp_path):
    base = plan_of(cfg_of(tmp_path))
    assert changed(base, plan_of(cfg_of(tmp_path))) == []
    same = cfg_of(tmp_path, overrides={"harc.device": "cuda:1", "executor.cpus": 64, "executor.partition": "x"})
    assert changed(base, plan_of(same)) == []


@pytest.mark.parametrize("block_size", [1, 4])
def test_alpha_change_invalidates(tmp_path, block_size):
    a = plan_of(cfg_of(tmp_path, block_size=block_size, alpha=0.9))
    b = plan_of(cfg_of(tmp_path, block_size=block_size, alpha=0.5))
    diff = changed(a, b)
    if block_size == 4:  # B = L: the statistics are reused, only the solves and what follows rerun
        assert diff == ["assemble-model/all", "report/all"] + [f"solve-router/layer-{l:03d}" for l in LAYERS]
    else:  # B = 1: block b >= 1 is captured through the new routers of block b-1
        assert "merge-experts/all" not in diff
        assert "capture-activations/block-000" not in diff
        assert "compute-statistics/layer-000/task-a" not in diff
        assert "capture-activations/block-001" in diff and "compute-statistics/layer-003/task-b" in diff
        assert len(diff) == len(a.tasks) - 4  # all but merge, capture-0 and statistics of layer 0


def test_hessian_change_keeps_the_capture(tmp_path):
    a = plan_of(cfg_of(tmp_path, block_size=4))
    b = plan_of(cfg_of(tmp_path, block_size=4, hessian="diag"))
    assert set(changed(a, b)) == {t for t in a.tasks if not t.startswith(("merge", "capture"))}


def test_calibration_change_reruns_from_capture(tmp_path):
    cfg = cfg_of(tmp_path, block_size=2)
    a = plan_of(cfg)
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "other calibration text"}\n')  # same path, new content
    b = plan_of(cfg)
    assert set(changed(a, b)) == set(a.tasks) - {"merge-experts/all"}
    c = plan_of(cfg_of(tmp_path, block_size=2, overrides={"calibration.max_length": 64}))
    assert set(changed(b, c)) == set(a.tasks) - {"merge-experts/all"}
    d = plan_of(cfg_of(tmp_path, block_size=2, overrides={"merge.method": "ties"}))
    assert set(changed(b, d)) == set(a.tasks)


def test_a_source_model_changed_in_place_reruns_everything(tmp_path):
    src = tmp_path / "toy" / "source-b"  # the toy config's source b, now a local directory
    src.mkdir(parents=True)
    cfg = cfg_of(tmp_path, block_size=2)
    assert Path(cfg.models.sources[1].path) == src
    (src / "config.json").write_text('{"model_type": "olmoe"}')
    (src / "model.safetensors").write_bytes(b"weights v1")
    a = plan_of(cfg)
    assert changed(a, plan_of(cfg)) == []
    (src / "model.safetensors").write_bytes(b"weights v2")  # re-exported to the same path
    b = plan_of(cfg)
    assert set(changed(a, b)) == set(a.tasks)
    assert str(src) in b.tasks["merge-experts/all"].inputs["files"]


def test_per_task_config_slices(tmp_path):
    """compute-statistics[l, t] reads source t's path only; solve-router every source's."""
    plan = plan_of(cfg_of(tmp_path, block_size=4))
    stats_a = plan.tasks["compute-statistics/layer-001/task-a"].inputs["config"]
    assert stats_a["models.sources.{task}.path"].endswith("toy/source-a")
    assert "toy/source-b" not in json.dumps(stats_a)
    solve = plan.tasks["solve-router/layer-001"].inputs["config"]
    assert [Path(p).name for p in solve["models.sources.*.path"]] == ["source-a", "source-b"]
    assert solve["harc.alpha"] == 0.9
    capture = plan.tasks["capture-activations/block-000"].inputs
    assert sorted(Path(f).name for f in capture["files"]) == ["a.jsonl", "b.jsonl"]
    assert all(v.startswith("sha256:") for v in capture["files"].values())


def test_layer_list_is_injectable_and_defaults_to_layout(tmp_path, monkeypatch):
    cfg = cfg_of(tmp_path)
    with pytest.raises(planner_mod.PlanError):
        build_plan(cfg, layers=[])
    monkeypatch.setattr(planner_mod, "default_layers", lambda c: [5, 7])
    plan = build_plan(cfg)
    assert plan.layers == [5, 7] and ids(plan, "solve-router") == ["layer-005", "layer-007"]


def test_debug_executor_records_and_skips(tmp_path):
    cfg = cfg_of(tmp_path, block_size=2)
    out: list[str] = []
    plan, outcome = submit_run(cfg, executor="debug", specs_dir=TOY_STAGES_DIR, layers=[0, 1, 2], echo=out.append)
    assert outcome.ok and len(outcome.completed) == len(plan.tasks) == 1 + 2 + 6 + 3 + 1 + 1
    run = plan.run_dir
    assert (run / "config.yaml").is_file() and (run / "plan.json").is_file()
    rec = records.read_completion(run, "solve-router", "layer-001")
    assert rec["digest"] == plan.tasks["solve-router/layer-001"].digest
    assert rec["result"]["converged"] is True and rec["wall_s"] >= 0 and rec["peak_rss_mb"] > 0
    art = rec["artifacts"]["routers/layer-001.json"]
    body = (run / "routers/layer-001.json").read_bytes()
    assert art["type"] == "file" and art["size"] == len(body)
    assert art["sha256"] == __import__("hashlib").sha256(body).hexdigest()
    assert rec["inputs"]["config"]["harc.alpha"] == 0.9 and rec["package_version"]
    assert set(rec["inputs"]["upstream"]) == {"compute-statistics/layer-001/task-a",
                                              "compute-statistics/layer-001/task-b"}
    assert (run / "logs/solve-router/layer-001.log").read_text().count("done in") == 1
    assert json.loads((run / "stats/compute-statistics/layer-002/task-b.json").read_text())["status"] == "done"
    assert all(r.state == "done" for r in collect(run))

    # A second submit finds everything complete.
    plan2, outcome2 = submit_run(cfg, executor="debug", specs_dir=TOY_STAGES_DIR, layers=[0, 1, 2], echo=out.append)
    assert outcome2.completed == [] and len(outcome2.already_complete) == len(plan2.tasks)

    # A lost artifact reruns that task only (its digest, hence its dependents', is unchanged).
    (run / "routers/layer-000.json").unlink()
    _, outcome3 = submit_run(cfg, executor="debug", specs_dir=TOY_STAGES_DIR, layers=[0, 1, 2], echo=out.append)
    assert outcome3.completed == ["solve-router/layer-000"]

    # B=L alpha change: only the solves, assemble and report run again; the statistics are reused.
    cfg_alpha = cfg_of(tmp_path, block_size=3, alpha=0.5)
    submit_run(cfg_of(tmp_path, block_size=3), executor="debug", specs_dir=TOY_STAGES_DIR, layers=[0, 1, 2],
               echo=out.append)
    _, outcome4 = submit_run(cfg_alpha, executor="debug", specs_dir=TOY_STAGES_DIR, layers=[0, 1, 2],
                             echo=out.append)
    assert sorted(outcome4.completed) == ["assemble-model/all", "report/all", "solve-router/layer-000",
                                          "solve-router/layer-001", "solve-router/layer-002"]


def test_task_peak_rss_is_its_own_not_the_process_high_water_mark(tmp_path):
    import resource

    import numpy as np

    big = np.ones(400 * 2**20 // 8)  # 400 MB resident in this (the debug executor's) process, then freed
    del big
    process_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    plan, outcome = submit_run(cfg_of(tmp_path, block_size=3), executor="debug", specs_dir=TOY_STAGES_DIR,
                               layers=[0])
    assert outcome.ok
    for t in plan.tasks.values():
        rss = records.read_completion(plan.run_dir, t.stage, t.key)["peak_rss_mb"]
        assert 0 < rss < process_peak_mb - 300, (t.id, rss, process_peak_mb)


def test_local_executor_failure_blocks_dependents_then_resumes(tmp_path):
    cfg = cfg_of(tmp_path, block_size=1)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    (run / "fail-statistics-layer0-taskb").write_text("")
    out: list[str] = []
    plan, outcome = submit_run(cfg, executor="local", specs_dir=TOY_STAGES_DIR, layers=[0], echo=out.append)
    assert outcome.failed == ["compute-statistics/layer-000/task-b"]
    assert outcome.skipped == ["solve-router/layer-000", "assemble-model/all", "report/all"]
    assert not (run / "routers/layer-000.json").exists()
    rows = {r.id: r for r in collect(run)}
    bad = rows["compute-statistics/layer-000/task-b"]
    assert bad.state == "failed" and "injected failure" in bad.error and bad.log.endswith("task-b.log")
    assert "injected failure" in Path(bad.log).read_text()
    assert rows["compute-statistics/layer-000/task-a"].state == "done"

    (run / "fail-statistics-layer0-taskb").unlink()
    _, outcome2 = submit_run(cfg, executor="local", specs_dir=TOY_STAGES_DIR, layers=[0], echo=out.append)
    assert outcome2.ok
    assert outcome2.completed == ["compute-statistics/layer-000/task-b", "solve-router/layer-000",
                                  "assemble-model/all", "report/all"]
    assert all(r.state == "done" for r in collect(run))


def test_resources_precedence(tmp_path):
    specs = load_specs()
    cfg = load_config(write_toy_config(tmp_path), overrides={
        "executor.stages": {"solve-router": {"gpus": 1, "time_min": 7, "partition": "gpu"}},
        "executor.mem_gb": 100, "executor.qos": "high", "executor.extra_sbatch": {"constraint": "a100"},
    })
    solve = resolve_resources(cfg, specs["solve-router"])
    assert (solve["gpus"], solve["time_min"], solve["partition"], solve["qos"]) == (1, 7, "gpu", "high")
    assert solve["mem_gb"] == 100  # set explicitly in the executor section: beats the spec default
    assert solve["cpus"] == specs["solve-router"].resources.cpus  # not set explicitly: the spec's default
    assert solve["extra_sbatch"] == {"constraint": "a100"}
    merge = resolve_resources(cfg, specs["merge-experts"])
    assert merge["partition"] == "debug" and merge["gpus"] == specs["merge-experts"].resources.gpus


def test_cli_dry_run_prints_dag_and_sbatch_without_writing(tmp_path, monkeypatch):
    from harc_hpc.cli import main

    monkeypatch.setattr(planner_mod, "default_layers", lambda c: [0, 1])
    config = write_toy_config(tmp_path)
    res = CliRunner().invoke(main, ["submit", str(config), "--dry-run", "--stages-dir", str(TOY_STAGES_DIR)])
    assert res.exit_code == 0, res.output
    assert "capture-activations/block-001" in res.output
    assert "after: merge-experts, solve-router/block-000, capture-activations/block-000" in res.output
    assert "--dependency=afterok:<compute-statistics/block-001>" in res.output
    assert "--partition=debug" in res.output and "--array=0-1%2" in res.output
    assert not (tmp_path / "runs").exists()


def test_cli_stage_and_status(tmp_path, monkeypatch):
    from harc_hpc.cli import main

    monkeypatch.setattr(planner_mod, "default_layers", lambda c: [0])
    config = str(write_toy_config(tmp_path))
    run_dir = tmp_path / "elsewhere"
    cli = CliRunner()
    common = ["--stages-dir", str(TOY_STAGES_DIR), "--run-dir", str(run_dir)]
    res = cli.invoke(main, ["stage", "merge-experts", config, *common])
    assert res.exit_code == 0, res.output
    res = cli.invoke(main, ["stage", "compute-statistics", config, "--layer", "0", "--task", "a", *common])
    assert "upstream task(s) not complete: capture-activations/block-000" in res.output
    res = cli.invoke(main, ["stage", "no-such-stage", config, *common])
    assert res.exit_code == 2 and "unknown stage" in res.output
    res = cli.invoke(main, ["submit", config, "--executor", "debug", *common])
    assert res.exit_code == 0, res.output
    res = cli.invoke(main, ["status", str(run_dir)])
    assert res.exit_code == 0 and "solve-router: done 1" in res.output
    # --force reruns a complete task.
    res = cli.invoke(main, ["stage", "solve-router", config, "--layer", "0", "--force", *common])
    assert res.exit_code == 0 and "running solve-router/layer-000" in res.output


def test_prepare_hook_runs_before_planning(tmp_path, monkeypatch):
    demo = types.ModuleType("harc_hpc.demo")

    def prepare_config(cfg):
        cfg = cfg.model_copy(deep=True)
        cfg.models.sources[0].path = "./demo/prepared-a"
        return cfg

    demo.prepare_config = prepare_config
    monkeypatch.setitem(sys.modules, "harc_hpc.demo", demo)
    plan, _ = submit_run(cfg_of(tmp_path), executor="debug", specs_dir=TOY_STAGES_DIR, layers=[0], echo=lambda m: None)
    saved = load_config(plan.run_dir / "config.yaml")
    assert saved.models.sources[0].path.endswith("demo/prepared-a")


def test_disabled_report_is_left_out_and_layer_selects_its_block(tmp_path):
    plan = plan_of(cfg_of(tmp_path, block_size=2, overrides={"report.enabled": False}))
    assert "report/all" not in plan.tasks and "assemble-model/all" in plan.tasks
    assert [t.id for t in plan.select("capture-activations", layer=3)] == ["capture-activations/block-001"]
    assert [t.id for t in plan.select("compute-statistics", layer=1, task="b")] == [
        "compute-statistics/layer-001/task-b"]
    with pytest.raises(planner_mod.PlanError, match="no task"):
        plan.select("solve-router", layer=9)


def test_unreadable_model_config_is_a_plan_error(tmp_path):
    cfg = cfg_of(tmp_path)
    for src in cfg.models.sources:
        src.path = str(tmp_path)  # a directory without config.json
    with pytest.raises(planner_mod.PlanError, match="cannot determine the MoE layers.*no config.json"):
        build_plan(cfg)
