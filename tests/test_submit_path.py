"""One submit path: a run and each cell of a sweep take submit.submit_plan (lock, active jobs, stale
temporaries, config snapshot, execute)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harc_hpc.pipeline import api, submit
from harc_hpc.pipeline.submit import ActiveJobsError, refuse_active_jobs


def test_active_jobs_are_named_and_refused(monkeypatch, tmp_path):
    jobs = {tmp_path / "a": ["11", "12"], tmp_path / "b": []}
    monkeypatch.setattr(submit.status_mod, "active_jobs", lambda d: jobs[Path(d)])
    assert refuse_active_jobs({"cell b": tmp_path / "b"}) == {}
    with pytest.raises(ActiveJobsError, match=r"cell a has 2 queued/running job\(s\) \(11, 12\); wait for them"):
        refuse_active_jobs({"cell a": tmp_path / "a", "cell b": tmp_path / "b"}, where="sweep")
    assert api.ActiveJobsError is ActiveJobsError

