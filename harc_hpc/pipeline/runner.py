"""What a job runs for one task: load the run's config, skip if complete, run the stage, record it.

The same ``run_task`` serves every executor: submitit's SLURM jobs (through ``StageRunner``, a
``Checkpointable`` so a timed-out or preempted task is requeued and simply runs again), the local
executor (one ``python -m harc_hpc.pipeline.runner`` subprocess per task) and the debug executor
(in-process). Stages write their artifacts atomically, so a rerun after an interruption starts clean
and produces the same result; the completion record comes last.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import platform
import resource
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import submitit

from harc_hpc.errors import format_bytes
from harc_hpc.io.atomic import write_json_atomic
from harc_hpc.pipeline import records

log = logging.getLogger("harc_hpc.pipeline")


def task_payload(plan, task, threads: Optional[int] = None, ranks: int = 1) -> dict:
    """Everything a job needs to know about its task, fixed at submission (digest included).

    ``threads`` (the task's ``cpus``) pins torch's intra-op threads: the same config then computes
    with the same reduction order on any machine, and small models are not slowed by threads
    fighting over cores the job was not given. ``ranks`` > 1: the task runs as that many processes
    of one job (a distributed stage).
    """
    from harc_hpc.pipeline.planner import format_templates

    spec = plan.specs[task.stage]
    return {
        "stage": task.stage,
        "key": task.key,
        "id": task.id,
        "index": task.index,
        "digest": task.digest,
        "function": spec.function,
        "writes": format_templates(spec.writes, task.template_values()),
        "upstream": {u: plan.tasks[u].digest for u in task.needs},
        "config_digest": _short(task.inputs.get("config")),
        "config_slice": task.inputs.get("config", {}),
        "files": task.inputs.get("files", {}),
        "config": str(plan.config_path) if plan.config_path else None,
        "threads": threads,
        "ranks": int(ranks),
        "retire": _retire_entries(plan, task),
    }


def _retire_entries(plan, task) -> list[dict]:
    """Under run.retention delete-intermediate: the scratch artifacts this task writes or reads, each
    with its producer and every task that reads it (deleted once all of them are complete)."""
    if plan.retention != "delete-intermediate":
        return []
    out = []
    for producer in plan.tasks.values():
        if not plan.specs[producer.stage].scratch:
            continue
        for rel, readers in plan.scratch_of(producer).items():
            if producer is task or any(r is task for r in readers):
                out.append({"stage": producer.stage, "key": producer.key, "digest": producer.digest,
                            "artifact": rel, "readers": [[r.stage, r.key, r.digest] for r in readers]})
    return out


def _input_claimer(run_dir: Path, payload: dict):
    """``claim(artifact, partial) -> bool`` for a stage that consumes an intermediate artifact it
    reads last (capture-activations, block size 1): under run.retention delete-intermediate, when this
    task reads ``artifact`` (a path relative to the run directory), retire it in its producer's
    record as consumed by this task, resumable from ``partial``
    (records.claim_for_consumption); True: the stage may delete the artifact as it goes."""
    me = [payload["stage"], payload["key"], payload["digest"]]

    def claim(artifact: str, partial: Path) -> bool:
        for entry in payload.get("retire", []):
            if entry["artifact"] == artifact and any(list(r) == me for r in entry["readers"]):
                return records.claim_for_consumption(run_dir, entry, tuple(me), partial)
        return False

    return claim


def _short(obj: Any) -> str:
    from harc_hpc.pipeline.planner import digest_of

    return digest_of(obj)


_CONFIG_CACHE: dict[str, Any] = {}


def load_run_config(run_dir: Path, path: Optional[str] = None):
    """The config snapshot of the submission (``path``), else ``run_dir/config.yaml``."""
    from harc_hpc.config import load_config

    path = Path(path) if path else Path(run_dir) / "config.yaml"
    key = f"{path}:{path.stat().st_mtime_ns}"
    if key not in _CONFIG_CACHE:
        _CONFIG_CACHE[key] = load_config(path)
    return _CONFIG_CACHE[key]


def _job_info() -> dict:
    env = os.environ
    info = {"host": platform.node(), "pid": os.getpid()}
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
                 "SUBMITIT_EXECUTOR", "CUDA_VISIBLE_DEVICES"):
        if name in env:
            info[name.lower()] = env[name]
    return info


def _torch_threads() -> Optional[int]:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Start this task's peak-RSS window: a forked local worker or the debug executor's one process
    would otherwise report the high-water mark of everything that ran before it (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _reset_peak_gpu() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _device_used() -> str:
    """What computed the task: ``cpu``, or the CUDA device it used (index as this process numbers it,
    the name, and the physical GPU list it was given)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return "cpu"
    index = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"cuda:{index} ({torch.cuda.get_device_name(index)}"
            + (f", CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ")"))


def _peak_gpu_mb() -> Optional[float]:
    """Peak GPU memory the task's tensors took (None when the task never used CUDA)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _peak_rss_mb(window: bool = False) -> float:
    if window:
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            return round(hwm / 1024.0, 1)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024.0, 1)  # Linux reports KiB


@contextmanager
def _task_log(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def run_task(run_dir, payload: dict, force: bool = False, cfg=None) -> dict:
    """Run one task unless its completion record matches; returns the stage's stats dict.

    The task's lock is held throughout: a second runner of the same task waits, then finds it done.
    """
    from harc_hpc.pipeline.lock import TaskLock

    if int(payload.get("ranks", 1)) > 1:
        return _run_task_distributed(Path(run_dir), payload, force, cfg)
    with TaskLock(run_dir, payload["stage"], payload["key"]) as lock:
        if lock.waited_s > 1.0:
            log.info("%s: waited %.1fs for another runner of this task", payload["id"], lock.waited_s)
        return _run_task_locked(Path(run_dir), payload, force, cfg)


def _run_task_distributed(run_dir: Path, payload: dict, force: bool, cfg) -> dict:
    """One task as the ranks of a multi-process SLURM job (``srun`` started them; submitit's
    TorchDistributedEnvironment gives the rendezvous). Rank 0 is the task as usual: it holds the
    task lock, decides whether to run, writes every artifact and the record. It tells the other
    ranks its decision, and they call the stage function with the same process group, holding
    their shard of the data and writing nothing. A rank that dies makes the others fail in their
    next collective, so the task fails as a whole and a resubmit runs it again."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from harc_hpc.devices import init_rank_process_group
    from harc_hpc.pipeline.lock import TaskLock

    ranks = int(payload["ranks"])
    env = submitit.helpers.TorchDistributedEnvironment()
    if env.world_size != ranks:
        raise RuntimeError(f"{payload['id']}: planned as {ranks} processes, the job has {env.world_size} "
                           f"(SLURM_NTASKS); submit it again")
    # The rendezvous variables only: CUDA_VISIBLE_DEVICES is left as the step set it, and each rank
    # takes GPU LOCAL_RANK of it before anything initialises CUDA (harc_hpc.devices).
    env.export(set_cuda_visible_devices=False, overwrite=True)
    cfg = cfg if cfg is not None else load_run_config(run_dir, payload.get("config"))
    placement = init_rank_process_group(cfg.harc.device, cfg.executor.distributed_backend,
                                        timeout=timedelta(minutes=30))
    if placement.note and env.rank == 0:
        log.warning("%s: %s", payload["id"], placement.note)
    log.info("%s: %s", payload["id"], placement.describe())
    backend = placement.backend
    group = dist.group.WORLD
    try:
        if env.rank == 0:
            def tell(run: bool) -> None:
                dist.broadcast_object_list([run], src=0)

            with TaskLock(run_dir, payload["stage"], payload["key"]) as lock:
                if lock.waited_s > 1.0:
                    log.info("%s: waited %.1fs for another runner of this task", payload["id"], lock.waited_s)
                return _run_task_locked(run_dir, payload, force, cfg, process_group=group, decided=tell)
        decision = [None]
        dist.broadcast_object_list(decision, src=0)
        if not decision[0]:
            return {}
        if payload.get("threads"):
            torch.set_num_threads(int(payload["threads"]))
        from harc_hpc.pipeline.planner import StageSpec

        fn = StageSpec.model_construct(function=payload["function"]).load_function()
        log.info("%s: rank %d of %d (%s)", payload["id"], env.rank, ranks, backend)
        return fn(cfg, run_dir, **payload["index"], process_group=group) or {}
    finally:
        dist.destroy_process_group()


def _run_task_locked(run_dir: Path, payload: dict, force: bool, cfg, process_group=None, decided=None) -> dict:
    """``process_group`` (a distributed task's rank 0): passed on to the stage function;
    ``decided(run)`` is called once it is known whether the task runs (before running it)."""
    stage, key, digest = payload["stage"], payload["key"], payload["digest"]
    why = None if force else records.why_incomplete(run_dir, stage, key, digest)
    if not force and why is None:
        why = records.restore_reason(run_dir, stage, key, payload.get("retire", []))
    if decided is not None:
        decided(force or why is not None)
    if not force and why is None:
        rec = records.read_completion(run_dir, stage, key) or {}
        log.info("%s: already complete, skipping", payload["id"])
        return rec.get("result", {})
    if why and why.startswith("artifact"):
        log.warning("%s: its completion record is not trusted (%s); running it again", payload["id"], why)
    # An old record (other inputs, or forced) must not outlive a rerun that fails half-way.
    records.remove_completion(run_dir, stage, key)
    cfg = cfg if cfg is not None else load_run_config(run_dir, payload.get("config"))
    log_file = records.log_path(run_dir, stage, key)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    job = _job_info()
    if payload.get("threads"):
        import torch

        torch.set_num_threads(int(payload["threads"]))
    job["torch_threads"] = _torch_threads()
    windowed = _reset_peak_rss()
    _reset_peak_gpu()
    with _task_log(log_file):
        log.info("%s: start (digest %s, %s)", payload["id"], digest[:12], json.dumps(job, sort_keys=True))
        try:
            from harc_hpc.pipeline.planner import StageSpec

            fn = StageSpec.model_construct(function=payload["function"]).load_function()
            extra = {} if process_group is None else {"process_group": process_group}
            if "task_digest" in inspect.signature(fn).parameters:
                extra["task_digest"] = digest  # lets a long task checkpoint and resume its own work
            if "claim_input" in inspect.signature(fn).parameters:
                # lets a task that reads an intermediate artifact last delete it as it consumes it
                extra["claim_input"] = _input_claimer(run_dir, payload)
            result = fn(cfg, run_dir, **payload["index"], **extra)
            if result is None:
                result = {}
            if not isinstance(result, dict):
                raise TypeError(f"{payload['function']} returned {type(result).__name__}, not a dict")
            missing = [w for w in payload["writes"] if not (run_dir / w).exists()]
            if missing:
                raise RuntimeError(f"{payload['id']}: the stage finished but did not write {missing}")
        except BaseException as exc:
            wall = time.perf_counter() - t0
            # SystemExit/KeyboardInterrupt: stopped from outside (submitit exits this way after requeueing
            # a timed-out or preempted job), not a failure of the stage.
            interrupted = isinstance(exc, (SystemExit, KeyboardInterrupt))
            if interrupted:
                log.warning("%s: interrupted after %.1fs (%s)", payload["id"], wall, type(exc).__name__)
            else:
                log.error("%s: failed after %.1fs: %s\n%s", payload["id"], wall, exc, traceback.format_exc())
            corrupt = _corrupt_artifact(exc)
            if corrupt is not None:
                # An upstream artifact failed its checksum on read: its producer must run again.
                for tid in records.invalidate_producers(run_dir, corrupt.path):
                    log.error("%s: %s wrote %s; its completion record is removed, so the next submit "
                              "reruns it", payload["id"], tid, corrupt.path)
            write_json_atomic(records.stats_path(run_dir, stage, key), {
                "id": payload["id"], "status": "interrupted" if interrupted else "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "started": started.isoformat(), "wall_s": round(wall, 3), "peak_rss_mb": _peak_rss_mb(windowed),
                "job": job, "log": str(log_file),
            })
            raise
        wall = time.perf_counter() - t0
        artifacts = {w: records.artifact_manifest(run_dir / w) for w in payload["writes"]}
        stats = {
            "id": payload["id"], "status": "done", "result": result,
            "started": started.isoformat(), "finished": datetime.now(timezone.utc).isoformat(),
            "wall_s": round(wall, 3), "peak_rss_mb": _peak_rss_mb(windowed), "job": job, "log": str(log_file),
        }
        stats["device"] = _device_used()
        gpu = _peak_gpu_mb()
        if gpu is not None:
            stats["peak_gpu_mb"] = gpu
        write_json_atomic(records.stats_path(run_dir, stage, key), stats)
        import harc_hpc

        write_json_atomic(records.completion_path(run_dir, stage, key), {
            **stats,
            "stage": stage, "key": key, "index": payload["index"], "digest": digest,
            "function": payload["function"], "package_version": harc_hpc.__version__,
            "inputs": {"config_digest": payload.get("config_digest"), "config": payload.get("config_slice", {}),
                       "files": payload.get("files", {}), "upstream": payload.get("upstream", {})},
            "artifacts": artifacts,
            "verification": records.verification_summary(artifacts),
        })
        log.info("%s: done in %.1fs (peak RSS %.0f MB)", payload["id"], wall, stats["peak_rss_mb"])
        for entry in payload.get("retire", []):
            own = (entry["stage"], entry["key"]) == (stage, key)
            freed = records.retire_if_consumed(run_dir, entry, holding_lock=own)
            if freed is not None:
                log.info("%s: deleted %s (%s), which every task reading it has used (run.retention)",
                         payload["id"], entry["artifact"], format_bytes(freed))
    return result


def _corrupt_artifact(exc: BaseException):
    from harc_hpc.errors import CorruptArtifactError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, CorruptArtifactError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class StageRunner(submitit.helpers.Checkpointable):
    """The callable an array job runs: ``runner(key)`` runs the task ``key`` of one (stage, block) group.

    Being Checkpointable, submitit requeues it on timeout or preemption with the same argument;
    the requeued task either finds its completion record or runs the stage again from scratch.
    """

    def __init__(self, run_dir: str, payloads: dict[str, dict], force: bool = False):
        self.run_dir = str(run_dir)
        self.payloads = payloads
        self.force = force

    def __call__(self, key: str) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_task(self.run_dir, self.payloads[key], force=self.force)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run one harc-hpc task (used by the local executor)")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--payload", required=True, help="task payload as JSON, or @file")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    text = Path(args.payload[1:]).read_text() if args.payload.startswith("@") else args.payload
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_task(args.run_dir, json.loads(text), force=args.force)
    except Exception:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
