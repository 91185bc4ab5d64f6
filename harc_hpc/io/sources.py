"""Model sources given as hub ids: ``owner/name@rev`` parsed, pinned to a commit once per run, and
fetched through huggingface_hub's own cache with only the files the stages read.

A ``models.*.path`` that is not a local directory may be a hub id with a revision (a branch, a tag or
a commit hash after ``@``; none: the default branch, or ``models.revision`` when set). ``submit``
pins every hub source once (:func:`pin_sources`, called as the run's config is saved): the revision
becomes a commit hash, written into the run's config (``owner/name@<commit>``) and into
``<run>/sources.json``, and the snapshot is downloaded (or found) in the hub cache. A later submit of
the same run reuses the recorded commit even after the branch has moved, so a rerun reads the same
bytes; every job reads the snapshot of that commit, offline when the cache has it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Callable, Optional

from harc_hpc.errors import InputDataError

COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
RECORD = "sources.json"  # in the run directory: each hub source's requested revision and its commit

# What the stages read from a model repository (its top level only: ``original/`` copies of the
# weights, consolidated checkpoints and the like are never fetched).
CONFIG_FILES = ["config.json", "generation_config.json"]
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json"]
TOKENIZER_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
    # multimodal wrappers: their processors
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
]
CODE_FILES = ["*.py"]  # a checkpoint's modeling code: only with models.trust_remote_code
IGNORE = ["*/*"]  # nothing below the top level


_HUB_ID = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?")
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_hub_id(text: str) -> bool:
    """``text`` has the form of a hub id (``owner/name`` or a bare ``name``)."""
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return bool(_HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def looks_local(text: str) -> bool:
    """A model source that can only mean a local directory (so a missing one is not looked up on
    the hub): ./x, /x, ~/x, a path of more than two parts, one whose parent directory exists here,
    or anything that is not a well-formed hub id."""
    if text.startswith((".", "/", "~")) or os.path.isabs(text):
        return True
    if max(text.count("/"), text.count(os.sep)) > 1:
        return True
    if ("/" in text or os.sep in text) and Path(text).expanduser().parent.is_dir():
        return True
    return not is_hub_id(text)


def hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    # also when set after huggingface_hub was imported (its constants are read once at import)
    return any(os.environ.get(var, "").strip().upper() in _TRUE
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_timeout_s() -> float:
    """How long to wait for the hub to answer (HF_HUB_ETAG_TIMEOUT, 8 s by default)."""
    try:
        return max(float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 8), 0.1)
    except ValueError:
        return 8.0


class HubSourceError(InputDataError):
    """A hub source that cannot be resolved or fetched; the message names the config key and the id."""


def allow_patterns(trust_remote_code: bool = False) -> list[str]:
    """``allow_patterns`` of a snapshot download: configs, safetensors weights and their index,
    tokenizer and processor files, and ``*.py`` only when the checkpoint's code is trusted."""
    return CONFIG_FILES + WEIGHT_FILES + TOKENIZER_FILES + (CODE_FILES if trust_remote_code else [])


def split_revision(text: str) -> tuple[str, Optional[str]]:
    """``"owner/name@rev"`` -> ``("owner/name", "rev")``; anything else (a local path, even one
    with an ``@`` in it, or a hub id without one) -> ``(text, None)``. A revision may contain
    ``/`` (``refs/pr/3``); a repository id never contains ``@``."""
    head, sep, rev = str(text).partition("@")
    if not sep or not rev or Path(str(text)).expanduser().exists() or looks_local(head):
        return str(text), None
    return head, rev


def hub_source(text: str) -> Optional[tuple[str, Optional[str]]]:
    """``(repo_id, revision)`` when ``text`` names a hub model (not an existing local directory, and
    of the hub-id form), else None."""
    text = str(text)
    if Path(text).expanduser().exists():
        return None
    repo, rev = split_revision(text)
    if looks_local(repo):
        return None
    return repo, rev


def _hub_hint(repo: str, rev: Optional[str]) -> str:
    shown = f"{repo}@{rev}" if rev else repo
    return (f"fill the hub cache where the hub is reachable (hf download {repo}"
            f"{' --revision ' + rev if rev else ''}), point HF_HOME or HF_HUB_CACHE at it on every node, or give a "
            f"local directory instead of {shown}")


def _ask_hub(repo: str, rev: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(commit, None) from the hub, or (None, why not); the hub has HF_HUB_ETAG_TIMEOUT to answer."""
    from huggingface_hub import HfApi

    timeout = hub_timeout_s()
    outcome: dict = {}

    def ask() -> None:
        try:
            outcome["sha"] = HfApi().repo_info(repo, revision=rev, timeout=timeout).sha
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    probe = threading.Thread(target=ask, name="harc-hub-revision", daemon=True)
    probe.start()
    probe.join(timeout + 0.5)
    if probe.is_alive():
        return None, f"the hub did not answer within {timeout:g} s"
    if "error" in outcome:
        exc = outcome["error"]
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"the hub answered {type(exc).__name__}{': ' + first if first else ''}"
    return outcome.get("sha"), None


def _cached_commit(repo: str, rev: Optional[str]) -> Optional[str]:
    """The commit the local hub cache records for ``rev`` (its ``refs/``), or None."""
    from huggingface_hub import HfApi

    try:
        return str(HfApi().resolve_revision(repo, revision=rev, local_files_only=True).resolved)
    except Exception:  # not cached (RevisionResolutionError and kin)
        return None


def resolve_commit(repo: str, rev: Optional[str], key: str,
                   echo: Callable[[str], None] = print) -> str:
    """The commit hash of ``repo`` at ``rev`` (default branch when None): a commit hash as is; else
    the hub's answer, or with HF_HUB_OFFLINE (or the hub unreachable) the local cache's ``refs/``."""
    if rev is not None and COMMIT_HASH.fullmatch(rev):
        return rev
    shown = f"{repo}@{rev}" if rev else f"{repo} (default branch)"
    why = "HF_HUB_OFFLINE is set" if hub_offline() else None
    if why is None:
        sha, why = _ask_hub(repo, rev)
        if sha:
            return sha
    cached = _cached_commit(repo, rev)
    if cached is None:
        raise HubSourceError(f"the hub id {shown} cannot be resolved to a commit: {why}, and the local hub "
                             "cache has no record of that revision", where=key, hint=_hub_hint(repo, rev))
    if not hub_offline():
        echo(f"warning: {key}: {why}; using the commit the local hub cache records for {shown}: {cached}")
    return cached


def fetch_snapshot(repo: str, commit: str, key: str, trust_remote_code: bool = False,
                   echo: Callable[[str], None] = print) -> Path:
    """The snapshot directory of ``repo`` at ``commit`` in the hub cache; downloaded (only
    :func:`allow_patterns`) when it is not there and the hub may be asked."""
    from huggingface_hub import snapshot_download

    patterns = allow_patterns(trust_remote_code)
    try:
        return Path(snapshot_download(repo_id=repo, revision=commit, allow_patterns=patterns,
                                      ignore_patterns=IGNORE, local_files_only=True))
    except Exception as exc:  # not cached, or cached incompletely
        cached = f"the hub cache lacks it ({type(exc).__name__})"
    if hub_offline():
        raise HubSourceError(f"{repo}@{commit} cannot be fetched: {cached} and HF_HUB_OFFLINE is set",
                             where=key, hint=_hub_hint(repo, commit))
    echo(f"{key}: downloading {repo}@{commit[:12]} into the hub cache ({', '.join(patterns)})")
    try:
        return Path(snapshot_download(repo_id=repo, revision=commit, allow_patterns=patterns,
                                      ignore_patterns=IGNORE))
    except Exception as exc:  # the hub client raises many types
        raise HubSourceError(f"downloading {repo}@{commit} failed ({type(exc).__name__}: {exc})",
                             where=key, hint=_hub_hint(repo, commit)) from None


def source_fields(cfg) -> list[tuple[str, str]]:
    """(config key, text) of every model path of a config: ``models.base`` and each source's."""
    out = [("models.base", cfg.models.base)] if cfg.models.base is not None else []
    return out + [(f"models.sources[{s.name}].path", s.path) for s in cfg.models.sources]


def _set_field(cfg, key: str, value: str) -> None:
    if key == "models.base":
        cfg.models.base = value
        return
    name = key[len("models.sources["):-len("].path")]
    next(s for s in cfg.models.sources if s.name == name).path = value


def pin_sources(cfg, run_dir: os.PathLike, echo: Callable[[str], None] = print, download: bool = True) -> dict:
    """Pin every hub source of ``cfg`` (in place) to a commit: ``owner/name@<commit>``.

    The run's ``sources.json`` decides first: a source whose requested text and ``models.revision``
    are what they were at an earlier submit of the run keeps its recorded commit (a branch that moved
    since is not followed). The rest is resolved now (:func:`resolve_commit`) and recorded. With
    ``download``, each snapshot is found or fetched in the hub cache (:func:`fetch_snapshot`).
    Local directories and ``demo:`` placeholders are left alone. Returns the record's entries.
    """
    from harc_hpc.io.atomic import write_json_atomic

    path = Path(run_dir) / RECORD
    try:
        old = json.loads(path.read_text()).get("sources", {}) if path.is_file() else {}
    except (OSError, ValueError):
        old = {}
    entries: dict = {}
    for key, text in source_fields(cfg):
        if str(text).startswith("demo:"):
            continue
        parsed = hub_source(text)
        if parsed is None:
            continue
        repo, rev = parsed
        rev = rev if rev is not None else cfg.models.revision
        prev = old.get(key) or {}
        if (prev.get("requested") == text and prev.get("models_revision") == cfg.models.revision
                and COMMIT_HASH.fullmatch(str(prev.get("commit", "")))):
            commit = prev["commit"]
        elif prev.get("path") == text:  # the run's own pinned config submitted again
            commit, text = prev["commit"], prev["requested"]
        else:
            commit = resolve_commit(repo, rev, key, echo)
        if download:
            fetch_snapshot(repo, commit, key, cfg.models.trust_remote_code, echo)
        pinned = f"{repo}@{commit}"
        entries[key] = {"requested": text, "models_revision": cfg.models.revision, "repo_id": repo,
                        "revision": rev or "default branch", "commit": commit, "path": pinned,
                        "allow_patterns": allow_patterns(cfg.models.trust_remote_code)}
        _set_field(cfg, key, pinned)
    if entries and entries != old:
        write_json_atomic(path, {"sources": entries})
    return entries


def source_record(run_dir: os.PathLike) -> dict:
    """The run's pinned hub sources (``sources.json``), keyed by config key; {} when none."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("sources", {})
