"""Completion records, per-task stats and log paths in a run directory, and artifact manifests.

A completion record (``completions/<stage>/<key>.json``) is written only after a task succeeded and
its declared artifacts exist; a crashed, cancelled or timed-out task leaves none and runs again.

The record holds a manifest of every artifact the task wrote, and a record is trusted only while
its artifacts still match it (``verify_artifacts``): every file present with its recorded size, and
every file up to ``ARTIFACT_FULL_HASH_BYTES`` (routers, statistics, metadata, configs) with its
recorded sha256. That costs a stat per file and a hash of the small ones: cheap on every submit even
when the artifacts are hundreds of GB. Zarr chunks are checked by size here and by their own CRC32C
(written with each chunk) whenever a stage decodes them; larger plain files by size and their first
and last 64 KiB; ``status --verify`` decodes every chunk as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional


# Input files (calibration data) up to this size are hashed in full; larger ones by size, mtime and
# their first and last MiB, which is what a rerun can afford to read on every submit.
INPUT_FULL_HASH_BYTES = 256 << 20
# Artifact files up to this size are hashed in full when recorded and whenever the record is checked.
ARTIFACT_FULL_HASH_BYTES = 64 << 20
ARTIFACT_EDGE_BYTES = 64 << 10
MANIFEST_FORMAT = "harc-manifest/1"


def completion_path(run_dir: Path, stage: str, key: str) -> Path:
    return Path(run_dir) / "completions" / stage / f"{key}.json"


def log_path(run_dir: Path, stage: str, key: str) -> Path:
    return Path(run_dir) / "logs" / stage / f"{key}.log"


def stats_path(run_dir: Path, stage: str, key: str) -> Path:
    return Path(run_dir) / "stats" / stage / f"{key}.json"


FAILURE_LINE_MAX_CHARS = 500


def failure_line(run_dir: Path, stage: str, key: str, since: Optional[float] = None) -> Optional[str]:
    """The error of a task's last failed attempt ("TypeName: message", on one line), from its stats file.

    None when the task has no failure on record: no stats file, a successful last attempt, or (with
    ``since``, a ``time.time()``) a record of an attempt that started before ``since``, i.e. left by an
    earlier run, which is what a task killed from outside (OOM, signal) leaves behind.
    """
    stats = read_json(stats_path(run_dir, stage, key))
    if not isinstance(stats, dict) or stats.get("status") not in ("failed", "interrupted"):
        return None
    if since is not None:
        try:
            from datetime import datetime

            if datetime.fromisoformat(str(stats.get("started"))).timestamp() < since - 1.0:
                return None
        except ValueError:
            return None
    error = " ".join(part.strip() for part in str(stats.get("error") or "").splitlines() if part.strip())
    if not error:
        error = "no error message recorded"
    if stats.get("status") == "interrupted":
        error = f"interrupted ({error})"
    if len(error) > FAILURE_LINE_MAX_CHARS:
        error = error[: FAILURE_LINE_MAX_CHARS - 4] + " ..."
    return error


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_completion(run_dir: Path, stage: str, key: str) -> Optional[dict]:
    return read_json(completion_path(run_dir, stage, key))


def is_complete(run_dir: Path, stage: str, key: str, digest: str) -> bool:
    """Done with these exact inputs, and every artifact it wrote still matches its record."""
    return why_incomplete(run_dir, stage, key, digest) is None


def why_incomplete(run_dir: Path, stage: str, key: str, digest: str, deep: bool = False) -> Optional[str]:
    """None when the task is complete and its artifacts verify; else why it must run (again).

    The reasons that concern an existing record (its artifacts changed) start with "artifact".
    """
    rec = read_completion(run_dir, stage, key)
    if not rec:
        return "not run yet"
    if rec.get("digest") != digest:
        return "its inputs changed"
    return verify_artifacts(run_dir, rec.get("artifacts", {}), deep=deep)


def invalidate_producers(run_dir: Path, path: Path) -> list[str]:
    """Remove the completion records of the tasks whose artifacts contain ``path``; their ids."""
    run_dir = Path(run_dir)
    try:
        rel = Path(path).resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return []
    removed = []
    for rec_path in sorted((run_dir / "completions").glob("*/*.json")):
        rec = read_json(rec_path) or {}
        # an artifact being consumed (retired, its remainder still read) counts as the producer's too
        consumed = [a for a, r in (rec.get("retired") or {}).items() if isinstance(r, dict) and r.get("consumed_by")]
        for art in [*rec.get("artifacts", {}), *consumed]:
            art = art.rstrip("/")
            if rel == art or rel.startswith(art + "/"):
                rec_path.unlink(missing_ok=True)
                removed.append(f"{rec.get('stage', rec_path.parent.name)}/{rec.get('key', rec_path.stem)}")
                break
    return removed


def remove_completion(run_dir: Path, stage: str, key: str) -> None:
    completion_path(run_dir, stage, key).unlink(missing_ok=True)


def _sha_file(path: Path, limit: int, edge: int, with_mtime: bool) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= limit:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
            return "sha256:" + h.hexdigest()
        h.update(fh.read(edge))
        fh.seek(max(size - edge, 0))
        h.update(fh.read(edge))
    extra = f":mtime={path.stat().st_mtime_ns}" if with_mtime else ""
    return f"edges:{h.hexdigest()}:size={size}{extra}"


def fingerprint_input_file(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_dir():
        return fingerprint_tree(path, INPUT_FULL_HASH_BYTES, 1 << 20, with_mtime=True)
    return _sha_file(path, INPUT_FULL_HASH_BYTES, 1 << 20, with_mtime=True)


def fingerprint_tree(root: Path, limit: int, edge: int, with_mtime: bool) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            h.update(f"{rel}\0{_sha_file(p, limit, edge, with_mtime)}\n".encode())
    return "tree:" + h.hexdigest()


# -- artifact manifests ----------------------------------------------------------------------------

def _is_zarr_chunk(root: Path, rel: str) -> bool:
    # Zarr v3 keeps metadata in zarr.json files and chunks under <array>/c/...; chunks carry a CRC32C.
    return (root / "zarr.json").is_file() and Path(rel).name != "zarr.json"


def _file_entry(path: Path, chunk: bool) -> dict:
    size = path.stat().st_size
    if chunk:
        return {"size": size}
    if size <= ARTIFACT_FULL_HASH_BYTES:
        return {"size": size, "sha256": _sha_file(path, size, 0, False).split(":", 1)[1]}
    return {"size": size, "edges": _sha_file(path, 0, ARTIFACT_EDGE_BYTES, False)}


def artifact_manifest(path: Path) -> dict:
    """What ``verify_artifacts`` checks later: a file's size and hash, or every file of a tree."""
    path = Path(path)
    if path.is_dir():
        files = {}
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                rel = p.relative_to(path).as_posix()
                files[rel] = _file_entry(p, _is_zarr_chunk(path, rel))
        return {"format": MANIFEST_FORMAT, "type": "tree", "files": files}
    return {"format": MANIFEST_FORMAT, "type": "file", **_file_entry(path, False)}


def verification_summary(artifacts: dict) -> dict:
    """What a resume will check of these manifests, in numbers (the record says it)."""
    counts = {"files": 0, "sha256": 0, "edges": 0, "size_only": 0, "bytes": 0}
    for manifest in artifacts.values():
        entries = manifest.get("files", {}).values() if manifest.get("type") == "tree" else [manifest]
        for e in entries:
            counts["files"] += 1
            counts["bytes"] += int(e.get("size", 0))
            key = "sha256" if "sha256" in e else "edges" if "edges" in e else "size_only"
            counts[key] += 1
    return {"format": MANIFEST_FORMAT,
            "on_resume": "presence and size of every file; sha256 of files <= "
                         f"{ARTIFACT_FULL_HASH_BYTES >> 20} MiB; first/last {ARTIFACT_EDGE_BYTES >> 10} KiB of larger "
                         "plain files; Zarr chunks by size here and by CRC32C when decoded",
            **counts}


def _check_entry(path: Path, entry: dict) -> Optional[str]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != entry.get("size"):
        return f"has {size} bytes, {entry.get('size')} were recorded"
    if "sha256" in entry and _sha_file(path, size, 0, False).split(":", 1)[1] != entry["sha256"]:
        return "changed since it was written (sha256 differs)"
    if "edges" in entry and _sha_file(path, 0, ARTIFACT_EDGE_BYTES, False) != entry["edges"]:
        return "changed since it was written (its first/last 64 KiB differ)"
    return None


def verify_artifacts(run_dir: Path, artifacts: dict, deep: bool = False) -> Optional[str]:
    """None when every recorded artifact matches its manifest; else the first mismatch, in words.

    ``deep`` also decodes every Zarr chunk (each checked against its CRC32C).
    """
    run_dir = Path(run_dir)
    for rel, manifest in sorted(artifacts.items()):
        path = run_dir / rel
        if not path.exists():
            return f"artifact {rel} is missing"
        if not isinstance(manifest, dict):  # a record of an earlier version: presence only
            continue
        if manifest.get("type") == "file":
            problem = _check_entry(path, manifest)
            if problem:
                return f"artifact {rel} {problem}"
            continue
        recorded = manifest.get("files", {})
        for frel, entry in recorded.items():
            problem = _check_entry(path / frel, entry)
            if problem:
                return f"artifact {rel}: {frel} {problem}"
        if deep and (path / "zarr.json").is_file():
            problem = verify_zarr_chunks(path)
            if problem:
                return f"artifact {rel}: {problem}"
    return None


def verify_zarr_chunks(store: Path) -> Optional[str]:
    """Decode every chunk of every array of a Zarr store; the first one that fails its checksum."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        problem = _verify_array(arr, name)
        if problem:
            return problem
    for name, sub in sorted(group.groups(), key=lambda kv: kv[0]):
        for aname, arr in sorted(sub.arrays(), key=lambda kv: kv[0]):
            problem = _verify_array(arr, f"{name}/{aname}")
            if problem:
                return problem
    return None


def _verify_array(arr, name: str) -> Optional[str]:
    if arr.nchunks_initialized != arr.nchunks:
        return f"array {name}: {arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunks missing"
    step = arr.chunks[0]
    for start in range(0, arr.shape[0], step):
        try:
            arr[start:start + step]
        except Exception as exc:  # noqa: BLE001 - a checksum or codec failure: the chunk is corrupt
            return f"array {name}: chunk at row {start} cannot be read ({exc})"
    return None


# -- intermediate artifacts (run.retention) ------------------------------------------------------


def artifact_bytes(manifest) -> int:
    if not isinstance(manifest, dict):
        return 0
    if manifest.get("type") == "file":
        return int(manifest.get("size", 0))
    return sum(int(e.get("size", 0)) for e in manifest.get("files", {}).values())


def disk_bytes(rec: dict) -> int:
    """What a completion record's artifacts occupy (as recorded; a retired one has left the list)."""
    return sum(artifact_bytes(m) for m in (rec.get("artifacts") or {}).values())


def retired_bytes(rec: dict) -> int:
    """The bytes of a record's artifacts deleted after use (run.retention)."""
    return sum(int(r.get("bytes", 0)) for r in (rec.get("retired") or {}).values())


def resumes_consumption(run_dir: Path, retired_entry: dict, r_stage: str, r_key: str, r_digest: str) -> bool:
    """Whether reader ``r_stage/r_key`` (digest ``r_digest``) is the task that was consuming this
    retired artifact while deleting it, with these same inputs, and its partial work is still there
    to resume from: it needs only what it has not consumed yet, which is still on disk, so the
    producer need not run again."""
    consumer = (retired_entry or {}).get("consumed_by")
    if not consumer or [consumer.get(k) for k in ("stage", "key", "digest")] != [r_stage, r_key, r_digest]:
        return False
    manifest = read_json(Path(run_dir) / consumer.get("partial", "") / "manifest.json") or {}
    return manifest.get("digest") == r_digest


def restore_reason(run_dir: Path, stage: str, key: str, entries: list[dict]) -> Optional[str]:
    """Why a complete task must run again: an artifact of it was deleted after use and a task that
    reads it is not complete (``entries``: the payload's retire list), unless that task is resuming
    its consumption of it (``resumes_consumption``)."""
    rec = read_completion(run_dir, stage, key) or {}
    retired = rec.get("retired") or {}
    for e in entries:
        if (e["stage"], e["key"]) != (stage, key) or e["artifact"] not in retired:
            continue
        for r_stage, r_key, r_digest in e["readers"]:
            if not is_complete(run_dir, r_stage, r_key, r_digest) and \
                    not resumes_consumption(run_dir, retired[e["artifact"]], r_stage, r_key, r_digest):
                return f"{r_stage}/{r_key} needs {e['artifact']}, which was deleted after use (run.retention)"
    return None


def claim_for_consumption(run_dir: Path, entry: dict, consumer: tuple[str, str, str], partial: Path) -> bool:
    """Before a task (``consumer``: stage, key, digest) that reads an intermediate artifact last
    starts deleting it piece by piece as it goes: record the artifact in its producer's completion
    record as retired, consumed by that task (``partial``: where it keeps its resumable progress),
    so no later submit trusts the half-deleted artifact. Only when every *other* reader is complete
    and the producer's record still lists the artifact (or already names this consumer: a resume).
    Returns whether the consumer may delete."""
    from harc_hpc.io.atomic import write_json_atomic
    from harc_hpc.pipeline.lock import TaskLock

    run_dir = Path(run_dir)
    for r_stage, r_key, r_digest in entry["readers"]:
        if [r_stage, r_key, r_digest] != list(consumer) and not is_complete(run_dir, r_stage, r_key, r_digest):
            return False
    with TaskLock(run_dir, entry["stage"], entry["key"]):
        rec = read_completion(run_dir, entry["stage"], entry["key"])
        rel = entry["artifact"]
        if not rec or rec.get("digest") != entry["digest"]:
            return False
        claimed = {"stage": consumer[0], "key": consumer[1], "digest": consumer[2],
                   "partial": Path(partial).resolve().relative_to(run_dir.resolve()).as_posix()}
        retired = rec.get("retired") or {}
        if rel in retired:
            return retired[rel].get("consumed_by") == claimed
        if rel not in rec.get("artifacts", {}):
            return False
        manifest = rec["artifacts"].pop(rel)
        rec.setdefault("retired", {})[rel] = {
            "bytes": artifact_bytes(manifest), "retired_at": datetime.now(timezone.utc).isoformat(),
            "readers": [f"{s}/{k}" for s, k, _ in entry["readers"]], "consumed_by": claimed,
        }
        rec["verification"] = verification_summary(rec["artifacts"])
        write_json_atomic(completion_path(run_dir, entry["stage"], entry["key"]), rec)
    return True


def _delete_artifact(path: Path) -> None:
    """Rename to a temporary name, then delete: a kill mid-delete leaves a temporary the next submit sweeps."""
    from harc_hpc.io.atomic import discard

    discard(path)


def retire_if_consumed(run_dir: Path, entry: dict, holding_lock: bool = False) -> Optional[int]:
    """Delete an intermediate artifact once every task that reads it is complete, and record it in
    its producer's completion record as retired (size, when). Returns the bytes freed, or None.

    The record is updated under the producer's task lock, so two readers finishing at once retire
    it once; the artifact is first renamed to a temporary name, so a kill mid-delete leaves only a
    temporary that the next submit sweeps.
    """
    from harc_hpc.io.atomic import write_json_atomic
    from harc_hpc.pipeline.lock import TaskLock

    run_dir = Path(run_dir)
    for r_stage, r_key, r_digest in entry["readers"]:
        if not is_complete(run_dir, r_stage, r_key, r_digest):
            return None
    lock = contextlib.nullcontext() if holding_lock else TaskLock(run_dir, entry["stage"], entry["key"])
    with lock:
        rec = read_completion(run_dir, entry["stage"], entry["key"])
        rel = entry["artifact"]
        if not rec or rec.get("digest") != entry["digest"]:
            return None
        consumed = (rec.get("retired") or {}).get(rel, {}).get("consumed_by")
        if consumed and rel not in rec.get("artifacts", {}):
            # Retired when its last reader began consuming it: delete what that reader left.
            _delete_artifact(run_dir / rel)
            return int(rec["retired"][rel].get("bytes", 0))
        if rel not in rec.get("artifacts", {}):
            return None
        manifest = rec["artifacts"].pop(rel)
        size = artifact_bytes(manifest)
        _delete_artifact(run_dir / rel)
        rec.setdefault("retired", {})[rel] = {
            "bytes": size, "retired_at": datetime.now(timezone.utc).isoformat(),
            "readers": [f"{s}/{k}" for s, k, _ in entry["readers"]],
        }
        rec["verification"] = verification_summary(rec["artifacts"])
        write_json_atomic(completion_path(run_dir, entry["stage"], entry["key"]), rec)
    return size
