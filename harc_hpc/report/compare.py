"""Compare the reports of two runs: which metrics moved, and whether artifacts that should be
byte-identical are.

Checked metrics are the held-out losses and every routing number (per task and layer); they fail
when ``|a - b| > atol + rtol * max(|a|, |b|)`` or when run B lacks a metric of run A (the
reference); metrics new in B are listed without failing. Artifact
digests (routers, assembled and merged model) must agree when both runs were computed from the same
results-relevant configuration (same ``results_config_digest``: run name, output place, executor and
report options aside) with the same package versions, torch thread count and device; otherwise their
differences are listed as expected. Timings are shown, never checked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harc_hpc.errors import UsageError

# held-out losses, routing per layer, the router-swap matrix, expert usage and lm-eval task scores
CHECKED_SECTIONS = ("loss", "routing", "router_swap", "expert_usage", "lm_eval")
_VERSION_KEYS = ("torch", "transformers", "harc-hpc")


class CompareError(UsageError):
    pass


def load_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / "report" / "metrics.json"
    if not path.is_file():
        raise CompareError(f"{path}: no report metrics (run `harc-hpc report {run_dir}` first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not valid JSON ({exc.msg})") from None


def flatten(tree, prefix: str = "") -> dict[str, float]:
    """Numeric leaves as dotted keys; list elements of per-layer values get ``.L<index>``."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.L{i}"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix] = float(tree)
    return out


@dataclass
class Row:
    key: str
    a: Optional[float]
    b: Optional[float]
    status: str  # "ok", "moved", "missing" (in B), "new" (in B), "info"

    @property
    def rel(self) -> Optional[float]:
        if self.a is None or self.b is None:
            return None
        scale = max(abs(self.a), abs(self.b))
        return 0.0 if scale == 0 else abs(self.a - self.b) / scale


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= atol + rtol * max(abs(a), abs(b))


@dataclass
class Comparison:
    rows: list[Row]
    digest_rows: list[tuple[str, Optional[str], Optional[str]]]
    digests_must_match: bool
    reason: str
    compared: int

    @property
    def failed_metrics(self) -> list[Row]:
        return [r for r in self.rows if r.status in ("moved", "missing")]

    @property
    def failed_digests(self) -> bool:
        return self.digests_must_match and bool(self.digest_rows)

    @property
    def ok(self) -> bool:
        return not self.failed_metrics and not self.failed_digests


def compare_metrics(a: dict, b: dict, rtol: float = 1e-3, atol: float = 1e-6) -> Comparison:
    fa = {k: v for s in CHECKED_SECTIONS for k, v in flatten(a.get(s, {}), s).items()}
    fb = {k: v for s in CHECKED_SECTIONS for k, v in flatten(b.get(s, {}), s).items()}
    rows = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key), fb.get(key)
        if va is None:
            # A metric the reference run did not have (a newer report): shown, not a failure.
            rows.append(Row(key, va, vb, "new"))
        elif vb is None:
            rows.append(Row(key, va, vb, "missing"))
        elif va != vb:
            rows.append(Row(key, va, vb, "ok" if _close(va, vb, rtol, atol) else "moved"))
    # Timings: informative only.
    for stage in sorted(set(a.get("stages", {})) | set(b.get("stages", {}))):
        ta = a.get("stages", {}).get(stage, {}).get("wall_s_total")
        tb = b.get("stages", {}).get(stage, {}).get("wall_s_total")
        if ta is not None or tb is not None:
            rows.append(Row(f"stages.{stage}.wall_s_total", ta, tb, "info"))

    ma, mb = a.get("manifest", {}), b.get("manifest", {})
    arts_a, arts_b = ma.get("artifacts", {}), mb.get("artifacts", {})
    digest_rows = [(k, arts_a.get(k), arts_b.get(k)) for k in sorted(set(arts_a) | set(arts_b))
                   if arts_a.get(k) != arts_b.get(k)]
    same_config = ma.get("results_config_digest") is not None and \
        ma.get("results_config_digest") == mb.get("results_config_digest")
    pa, pb = ma.get("packages", {}), mb.get("packages", {})
    version_diff = [k for k in _VERSION_KEYS if pa.get(k) != pb.get(k)]
    env_diff = [k for k in ("torch_threads", "device") if ma.get(k) != mb.get(k)]
    if not same_config:
        must, reason = False, "configurations differ: artifact differences expected"
    elif version_diff:
        must, reason = False, f"package versions differ ({', '.join(version_diff)}): artifact differences expected"
    elif env_diff:
        # Floating-point reductions depend on the thread count and the device: same numbers within
        # tolerance, not the same bits.
        must, reason = False, f"{' and '.join(env_diff)} differ: artifact differences expected"
    else:
        must, reason = True, "same configuration and versions: artifacts must be identical"
    return Comparison(rows, digest_rows, must, reason, compared=len(set(fa) & set(fb)))


def _num(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.6g}"


def format_comparison(c: Comparison, name_a: str, name_b: str, show_all: bool = False) -> str:
    rows = [r for r in c.rows if show_all or r.status != "ok"]
    lines = []
    if rows:
        width = max(len("metric"), *(len(r.key) for r in rows))
        lines.append(f"{'metric':<{width}}  {'A':>12}  {'B':>12}  {'rel.diff':>9}  status")
        lines.append("-" * (width + 50))
        for r in rows:
            rel = "–" if r.rel is None else f"{r.rel:.2e}"
            lines.append(f"{r.key:<{width}}  {_num(r.a):>12}  {_num(r.b):>12}  {rel:>9}  {r.status}")
    moved = len(c.failed_metrics)
    within = sum(1 for r in c.rows if r.status == "ok")
    lines.append(f"A = {name_a}\nB = {name_b}")
    lines.append(f"{c.compared} metrics compared: {moved} beyond tolerance or missing, "
                 f"{within} differ within tolerance")
    if c.digest_rows:
        lines.append(f"artifact digests differ ({c.reason}):")
        for k, da, db in c.digest_rows:
            lines.append(f"  {k}: {(da or 'missing')[:16]} vs {(db or 'missing')[:16]}")
    else:
        lines.append("artifact digests: identical")
    lines.append("RESULT: " + ("same within tolerance" if c.ok else "DIFFERENT"))
    return "\n".join(lines)
