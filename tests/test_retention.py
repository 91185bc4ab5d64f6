"""run.retention: intermediate stores deleted once read, recomputed when a later task needs them."""

from __future__ import annotations


import pytest

from harc_hpc.config import load_config
from harc_hpc.pipeline import records
from harc_hpc.pipeline.api import submit_run
from harc_hpc.pipeline.status import collect, format_table
from pipeline_fixtures import build_tiny_sources, final_bytes, submit_debug, write_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return build_tiny_sources(tmp_path_factory.mktemp("src"), layers=3)


@pytest.fixture(scope="module")
def kept(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("kept")
    plan = submit_debug(write_config(root, sources, name="kept", extra={"run.retention": "keep"}))
    return plan.run_dir, final_bytes(plan.run_dir)


def test_keep_leaves_the_intermediate_stores(kept):
    run_dir, _ = kept
    assert sorted(p.name for p in (run_dir / "activations").iterdir()) == [f"block-00{b}.zarr" for b in range(3)]
    # block size 1: the streamed capture keeps one store per block (the residual), no hidden states
    assert not (run_dir / "hidden").exists()
    for b in range(3):  # nothing of an input store was consumed
        assert records.verify_artifacts(run_dir, records.read_completion(
            run_dir, "capture-activations", f"block-00{b}")["artifacts"], deep=True) is None


def test_delete_intermediate_frees_scratch_with_the_same_result(sources, tmp_path, kept):
    plan = submit_debug(write_config(tmp_path, sources, name="del"))  # the default
    run_dir = plan.run_dir
    assert list((run_dir / "activations").iterdir()) == [] and not (run_dir / "hidden").exists()
    assert not any((run_dir / "partial").iterdir())
    assert final_bytes(run_dir) == kept[1]
    rec = records.read_completion(run_dir, "capture-activations", "block-001")
    assert set(rec["retired"]) == {"activations/block-001.zarr"}
    retired = rec["retired"]["activations/block-001.zarr"]
    assert retired["bytes"] > 0
    assert retired["readers"] == ["compute-statistics/layer-001/task-math", "compute-statistics/layer-001/task-code",
                                  "solve-router/layer-001", "capture-activations/block-002"]
    # retired when capture 2 began consuming it chunk by chunk
    assert retired["consumed_by"]["key"] == "block-002" and retired["consumed_by"]["partial"] == \
        "partial/capture-block-002"
    assert "activations/block-001.zarr" not in rec["artifacts"]
    rows = collect(run_dir)
    assert all(r.state == "done" for r in rows)
    table = format_table(rows)
    assert "capture-activations: done 3; on disk" in table and "deleted after use" in table, table
    # the report's stage table shows the same bytes as status
    from harc_hpc.report.metrics import stage_statistics

    stages = stage_statistics(run_dir)
    cap = [r for r in rows if r.stage == "capture-activations"]
    assert stages["capture-activations"]["retired_bytes"] == sum(r.retired_bytes for r in cap) > 0
    assert stages["capture-activations"]["disk_bytes"] == sum(r.disk_bytes for r in cap) > 0
    assert stages["solve-router"]["retired_bytes"] == 0 and stages["solve-router"]["disk_bytes"] > 0
    # nothing changed: nothing reruns, nothing is recomputed
    lines: list[str] = []
    submit_run(load_config(plan.run_dir / "config.yaml"), executor="debug", echo=lines.append)
    assert any("nothing to do" in l for l in lines), lines


def test_a_rerun_that_needs_a_deleted_store_recomputes_it(sources, tmp_path, kept):
    config = write_config(tmp_path, sources, name="restore")
    plan = submit_debug(config)
    router = plan.run_dir / "routers/layer-002.safetensors"
    router.unlink()
    lines: list[str] = []
    submit_debug(config, lines)
    text = "\n".join(lines)
    # solve 2 reads activations 2 -> capture 2 reads activations 1 -> capture 1 reads activations 0
    assert "rerunning capture-activations/block-002: solve-router/layer-002 needs activations/block-002.zarr" in text
    assert "rerunning capture-activations/block-000: capture-activations/block-001 needs activations/block-000.zarr" \
        in text
    ran = [l.split()[1] for l in lines if l.startswith("running ")]
    assert ran == ["capture-activations/block-000", "capture-activations/block-001",
                   "capture-activations/block-002", "solve-router/layer-002"], ran
    assert final_bytes(plan.run_dir) == kept[1]
    assert list((plan.run_dir / "activations").iterdir()) == []
