"""The GPU benchmark: one command that answers in <= 10 minutes on one H100, row by row.

    python benchmarks/bench_gpu.py                          # on a CUDA node (srun --gpus=1 ...)
    python benchmarks/bench_gpu.py --time-limit-s 300       # a shorter guard
    python benchmarks/bench_gpu.py --device cpu --quick --out /tmp/x   # the same code path at toy sizes

Rows, in the order they run (each written to ``<out>/gpu.json`` and ``gpu.md`` as it finishes, the
files rewritten atomically, the device's name in the header):

* ``solve default``: one OLMoE-shaped layer (d 2048, K 64, 2 tasks x ``--solve-tokens``, default the
  paper's 2.8 M) with its router inputs resident on the device in bf16, solved with the pipeline's
  defaults, taken from the config's own defaults (``harc``: pcg, expert-block preconditioner, float64
  compute, ``inner_dtype: auto`` -> bfloat16 on GPUs with fast 16-bit GEMMs, tol 1e-6;
  ``calibration.chunk_tokens`` 8192; residency and memory budget as ``solve-router`` chooses them).
  Iterations, ms per iteration, setup seconds (everything before the first CG iteration: probabilities,
  statistics, preconditioner), peak memory (reset before every row) and the H100 projection that
  ``bench_scale.py`` wrote into ``benchmarks/results/scale.json`` beside each.
* ``distributed 1-rank``: ``init_process_group`` with world size 1 (NCCL on a GPU after
  ``torch.cuda.set_device``, gloo on the CPU; MASTER_ADDR 127.0.0.1, a free port), an all_reduce of a
  tensor on the rank's device, and the default solve on a prefix of the tokens through
  ``ProcessGroupReducer`` against the same solve in one process (must be equal).
* ``solve jacobi``, ``solve inner ...`` (bfloat16 inner vs none, whichever is not the default here),
  ``solve chunk N``: the default with one setting changed.
* ``paper-style``: the published code's operator (``bench_solver.paper_style_solve``: per 512-token
  sequence on every matvec, float32 activations) on the same device inputs for 20 CG iterations.
* ``capture onloaded`` / ``capture whole``: the synthetic Mixtral-shaped checkpoint of
  ``bench_scale.py`` (24 layers, d 1024, 8 experts, bf16) over ``--tokens`` (default 1 M), each path in
  its own process: load time and forward time apart, tokens/s, peak device memory and host RSS, and
  the router inputs of the two paths compared.

The time guard (``--time-limit-s``, default 540 s, counted from the start of the command): before each
row, a row whose estimate (from what the earlier rows measured) does not fit the time left is
recorded as ``skipped`` with the reason; a row that runs past the limit is stopped at its next CG
iteration (or its subprocess killed) and recorded as ``stopped`` with what it had measured. A row
that fails is recorded as ``error`` (exit status 1 at the end); skipped and stopped rows are not
errors. Synthetic weights and inputs; nothing is downloaded. ``--device cuda`` without a CUDA device
is refused. A CPU or ``--quick`` run is not a GPU figure: it never writes into
``benchmarks/results`` (give ``--out``; without it the files go to a temporary directory).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the guard counts from here: imports included

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

PAPER_SEQ = 512  # the paper-style operator works per sequence of this many tokens
PAPER_ITERATIONS = 20
# Used before a row has measured anything of its own (the in-row guard catches a wrong guess).
JACOBI_OVER_EXPERT_BLOCK_ITERATIONS = 343 / 97  # benchmarks/results/scale.json, OLMoE-shaped layer


class OutOfTime(Exception):
    """Raised inside a row when the time limit passes; carries what the row had measured."""

    def __init__(self, reason: str, partial: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.partial = partial or {}


# -- devices, memory ------------------------------------------------------------------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(device) -> int:
    """Reset the peak-memory counter of ``device`` (on the host: this process's VmHWM, where the
    kernel lets it); returns what is allocated now (the row's baseline)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _proc_status("VmRSS")


def peak_memory(device, baseline: int) -> dict:
    import torch

    if device.type == "cuda":
        return {"memory": "device", "peak_bytes": int(torch.cuda.max_memory_allocated(device)),
                "allocated_before_bytes": baseline}
    return {"memory": "host RSS", "peak_bytes": _proc_status("VmHWM"), "allocated_before_bytes": baseline}


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "CPU"


def fast_16bit(device) -> bool:
    """Whether solve-router's ``inner_dtype: auto`` picks bfloat16 on ``device`` (its own test)."""
    if device.type != "cuda":
        return False
    try:
        from harc_hpc.stages.solve_router import _fast_16bit
    except ImportError:
        import torch

        return torch.cuda.get_device_capability(device)[0] >= 8
    return bool(_fast_16bit(device))


def _restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- projections (benchmarks/results/scale.json, written by bench_scale.py) -----------------------

def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (projections span toy and paper sizes)."""
    return float(f"{x:.{digits}g}")


def load_scale() -> dict:
    path = RESULTS / "scale.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _scale_constants() -> dict:
    try:
        from scale_solve import H100, OLMOE, PAPER_TOKENS
    except Exception:  # noqa: BLE001 - the projections are an extra, never a reason to fail
        return {}
    return {"H100": H100, "OLMOE": OLMOE, "PAPER_TOKENS": PAPER_TOKENS, "PAPER_D": 2048, "PAPER_K": 64}


def solve_projection(scale: dict, consts: dict, *, tokens: int, d: int, k: int, preconditioner: str,
                     mixed: bool) -> dict:
    """The H100 projection of one solve row: ms per iteration (scaled from the paper's 2 x 2.8 M tokens,
    d 2048, K 64 to this row's shape: float32 GEMMs by N d K flops, bf16 GEMMs by N d bytes),
    iterations (measured on the CPU at the OLMoE shape) and the solve's minutes."""
    p = (scale.get("solve") or {}).get("projection")
    if not p or not consts:
        return {}
    out = {"source": "benchmarks/results/scale.json (bench_scale.py): H100 SXM datasheet peaks, not measured"}
    flops_scale = tokens * d * k / (consts["PAPER_TOKENS"] * consts["PAPER_D"] * consts["PAPER_K"])
    bytes_scale = tokens * d / (consts["PAPER_TOKENS"] * consts["PAPER_D"])
    if mixed:
        out["ms_per_iteration"] = _sig(p["h100_ms_per_iteration_bf16_gemm"] * bytes_scale)
        out["ms_per_iteration_basis"] = "bf16 GEMMs, memory-bound (X read twice)"
    else:
        out["ms_per_iteration"] = _sig(p["h100_ms_per_iteration_fp32"] * flops_scale)
        out["ms_per_iteration_basis"] = "float32 GEMMs at 67 TFLOP/s (this solve's exact operator is float64)"
    runs = (scale.get("solve") or {}).get("runs") or []
    iterations = None
    if preconditioner == "jacobi":
        iterations = next((r["iterations"] for r in runs if "jacobi" in r.get("run", "").lower()), None)
    elif mixed:
        iterations = p.get("mixed_iterations")
    elif runs:
        iterations = runs[0].get("iterations")
    if iterations is not None:
        out["iterations"] = int(iterations)
        out["solve_s"] = _sig(iterations * out["ms_per_iteration"] / 1e3)
    return out


def capture_params(layers: int, hidden: int, experts: int, intermediate: int, heads: int, kv_heads: int,
                   vocab: int = 32000) -> tuple[int, int]:
    """(all, active per token in the decoder layers) parameters of bench_scale's Mixtral-shaped model
    (top-2 of ``experts``; embeddings and head in the total only)."""
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * (hidden // heads)
    expert = 3 * hidden * intermediate
    total = layers * (attention + experts * expert + hidden * experts) + 2 * vocab * hidden
    return total, layers * (attention + 2 * expert + hidden * experts)


def capture_projection(scale: dict, consts: dict, *, layers: int, hidden: int, experts: int, intermediate: int,
                       heads: int, kv_heads: int, tokens: int, model_bytes: int) -> dict:
    """The forward at the projection's 40 % of the H100's bf16 peak (2 FLOPs per active parameter and
    token) and the load at its 2 GB/s of checkpoint I/O; the CPU's tokens/s from scale.json beside."""
    if not consts:
        return {}
    h100, olmoe = consts["H100"], consts["OLMOE"]
    _, active = capture_params(layers, hidden, experts, intermediate, heads, kv_heads)
    out = {"source": "scale_solve.py assumptions: 40 % of the H100 bf16 peak, 2 GB/s checkpoint I/O",
           "active_params": int(active),
           "forward_s": _sig(2.0 * active * tokens / (olmoe["mfu"] * h100["bf16_flops"])),
           "load_s": _sig(model_bytes / olmoe["io_bytes_per_s"])}
    cap = scale.get("capture") or {}
    for mode, key in (("whole", "whole"), ("onloaded", "onload")):
        if isinstance(cap.get(key), dict) and "tokens_per_s" in cap[key]:
            out[f"cpu_tokens_per_s_{mode}_scale_json"] = cap[key]["tokens_per_s"]
    return out


# -- capture (each path in its own process) ---------------------------------------------------------

def capture_child(mode: str, path: str, device_name_: str, tokens: int, seq: int, out: str) -> None:
    """One capture path in this process: load time and forward time apart; router inputs of 8 columns
    per layer kept for the comparison of the two paths."""
    import torch

    from harc_hpc.models.modeling import RouterInputRecorder, load_causal_lm

    # the model's code imported before the clock starts: a load is reading and placing weights
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]

    device = torch.device(device_name_)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    n_seq = max(1, tokens // seq)
    ids = torch.randint(0, 32000, (n_seq, seq))
    batch = 4
    records: dict[int, list] = {}
    load_s = 0.0
    _sync(device)
    t0 = time.perf_counter()
    if mode == "whole":
        model = load_causal_lm(path, device)
        _sync(device)
        load_s = time.perf_counter() - t0
        layers = range(model.config.num_hidden_layers)
        with RouterInputRecorder({l: model.model.layers[l].mlp.gate for l in layers}) as rec, torch.no_grad():
            for s in range(0, n_seq, batch):
                model.model(input_ids=ids[s:s + batch].to(device))
                for l in layers:
                    records.setdefault(l, []).append(rec.pop(l)[:, :8].float().cpu())
    else:
        from harc_hpc.models.onload import OnloadedModel

        om = OnloadedModel(path, device)
        _sync(device)
        load_s = time.perf_counter() - t0
        states = [om.embed(ids[s:s + batch].to(device)) for s in range(0, n_seq, batch)]
        om.release_embeddings()
        with RouterInputRecorder({l: om.layer(l).mlp.gate for l in range(om.num_layers)}) as rec:
            for l in range(om.num_layers):
                _sync(device)
                t = time.perf_counter()
                om.onload(l)
                _sync(device)
                load_s += time.perf_counter() - t
                for i, h in enumerate(states):
                    states[i] = om.run_layer(l, h)
                    records.setdefault(l, []).append(rec.pop(l)[:, :8].float().cpu())
                _sync(device)
                t = time.perf_counter()
                om.offload(l)
                load_s += time.perf_counter() - t
    _sync(device)
    seconds = time.perf_counter() - t0
    torch.save({l: torch.cat(v) for l, v in records.items()}, out + ".pt")
    figures = {"mode": mode, "seconds": seconds, "load_s": load_s, "forward_s": seconds - load_s,
               "tokens": n_seq * seq, "tokens_per_s": n_seq * seq / max(1e-9, seconds - load_s),
               "peak_rss_bytes": _proc_status("VmHWM")}
    if device.type == "cuda":
        figures["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    Path(out).write_text(json.dumps(figures))


# -- synthetic solve inputs ------------------------------------------------------------------------------

def synthetic_inputs(n: int, d: int, device, seed: int, rank: int = 256):
    """(n, d) bf16 router-input-like rows made on the device: a decaying low-rank spectrum, a common
    and a per-task mean, noise, RMS-normalised (like bench_solver.make_layer, generated in chunks)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    rank = min(rank, d)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g, device=device))[0]
    spectrum = 2.0 * torch.arange(1, rank + 1, device=device, dtype=torch.float32) ** -0.5
    mean = 0.3 * torch.randn(d, generator=g, device=device)
    out = torch.empty(n, d, dtype=torch.bfloat16, device=device)
    step = 1 << 18
    for s in range(0, n, step):
        m = min(step, n - s)
        h = (torch.randn(m, rank, generator=g, device=device) * spectrum) @ basis.T + mean
        h += 0.7 * torch.randn(m, d, generator=g, device=device)
        out[s:s + m] = (h / h.pow(2).mean(dim=1, keepdim=True).sqrt()).to(torch.bfloat16)
    return out


# -- the benchmark --------------------------------------------------------------------------------------

class Bench:
    def __init__(self, a, device):
        import torch

        from harc_hpc.config import CalibrationSection, HarcSection

        self.a = a
        self.device = device
        self.limit = float(a.time_limit_s)
        self.harc = HarcSection()  # the pipeline's defaults, from the config itself
        self.chunk_default = int(CalibrationSection().chunk_tokens)
        self.compute_dtype = getattr(torch, self.harc.dtype)
        from harc_hpc.stages.solve_router import resolve_inner_dtype

        self.inner_default = resolve_inner_dtype(self.harc.inner_dtype, fast_16bit(device))  # "bfloat16" or None
        self.scale = load_scale()
        self.consts = _scale_constants()
        self.measured: dict = {}
        self._inputs = None
        self._default_weight = None
        self._capture_tmp: tempfile.TemporaryDirectory | None = None
        self._capture_model: dict | None = None
        self._capture_inputs: dict = {}
        self.result = {
            "header": {
                "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
                "cuda": torch.version.cuda, "host": platform.node(), "commit": _git_commit(), "quick": bool(a.quick),
                "time_limit_s": self.limit, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "finished": False, "elapsed_s": None,
                "pipeline_defaults": {
                    "solver": self.harc.solver, "preconditioner": self.harc.preconditioner,
                    "expert_block_tokens": self.harc.expert_block_tokens, "alpha": self.harc.alpha,
                    "hessian": self.harc.hessian, "objective": self.harc.objective, "tol": self.harc.tol,
                    "max_iter": self.harc.max_iter, "compute_dtype": self.harc.dtype,
                    "inner_dtype": f"{self.harc.inner_dtype} -> {self.inner_default}",
                    "chunk_tokens": self.chunk_default,
                    "solve_chunk_tokens": "the store's chunk on a CPU; joined blocks on a GPU (solve_router.solve_block_tokens)"},
                "solve_shape": {"d": a.solve_d, "K": a.solve_k, "tasks": 2, "tokens_per_task": a.solve_tokens,
                                "inputs": "bfloat16, resident on the device"},
                "capture_shape": {"layers": a.layers, "hidden": a.hidden, "experts": a.experts,
                                  "intermediate": a.intermediate, "tokens": a.tokens, "seq": a.seq},
            },
            "rows": [],
        }
        if device.type == "cuda":
            self.result["header"]["device_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
            self.result["header"]["device_memory_bytes"] = int(torch.cuda.get_device_properties(device).total_memory)
        self.budget = None

    # -- time ----------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - T_START

    def remaining(self) -> float:
        return self.limit - self.elapsed()

    def deadline(self) -> float:
        return T_START + self.limit

    # -- output --------------------------------------------------------------------------------------
    def write(self) -> None:
        self.result["header"]["elapsed_s"] = round(self.elapsed(), 2)
        out = self.a.out
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu.json", json.dumps(self.result, indent=2) + "\n"),
                           ("gpu.md", "\n".join(markdown(self.result)) + "\n")):
            tmp = out / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)

    def run_row(self, kind: str, name: str, fn, estimate=None) -> dict:
        row = {"kind": kind, "name": name}
        remaining = self.remaining()
        est = None
        if remaining <= 0:
            row.update(status="skipped", reason=f"the time limit of {self.limit:.0f} s is spent "
                                                f"({self.elapsed():.1f} s elapsed)")
        else:
            try:
                est = estimate() if estimate is not None else None
            except Exception as exc:  # noqa: BLE001 - an estimate that fails is no estimate
                est = None
                row["estimate_error"] = repr(exc)
            if isinstance(est, str):  # a reason this row cannot run here (e.g. over the memory budget)
                row.update(status="skipped", reason=est)
            elif est is not None and est > remaining:
                row.update(status="skipped", reason=f"estimated {est:.1f} s, {remaining:.1f} s left of the "
                                                    f"{self.limit:.0f} s limit")
        if "status" not in row:
            if est is not None:
                row["estimated_s"] = round(est, 2)
            t0 = time.perf_counter()
            try:
                row.update(fn())
                row["status"] = "ok"
            except OutOfTime as exc:
                row.update(exc.partial)
                row.update(status="stopped", reason=exc.reason)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc(limit=6))
            row["row_s"] = round(time.perf_counter() - t0, 3)
            if self.device.type == "cuda":  # what the row cached goes back: the capture processes need it
                import torch

                torch.cuda.empty_cache()
        self.result["rows"].append(row)
        self.write()
        tag = row["status"] + ("" if row["status"] == "ok" else f" ({row.get('reason', '')})")
        print(f"[{self.elapsed():7.1f} s] {kind} {name}: {tag}", flush=True)
        return row

    # -- solve -------------------------------------------------------------------------------------------
    def solve_inputs(self):
        if self._inputs is None:
            import torch

            a, device = self.a, self.device
            self.solve_budget()
            t0 = time.perf_counter()
            xs = [synthetic_inputs(a.solve_tokens, a.solve_d, device, seed=t + 1) for t in range(2)]
            g = torch.Generator(device=device).manual_seed(0)
            d, k = a.solve_d, a.solve_k
            base = torch.randn(k, d, generator=g, device=device) / math.sqrt(d)
            base *= 2.5 / float((xs[0][:4096].float() @ base.T).std())
            sources = [base + 0.8 * float(base.norm()) / math.sqrt(k * d) * torch.randn(k, d, generator=g, device=device)
                       for _ in range(2)]
            merged = sum(sources) / 2
            _sync(device)
            self.result["header"]["solve_inputs_s"] = time.perf_counter() - t0  # in the first row that used them
            self._inputs = (xs, sources, merged)
        return self._inputs

    def solve_budget(self) -> int:
        """solve-router's memory budget: harc.memory_budget_gb, else 80 % of what the device has free
        before the layer's inputs come to it."""
        if self.budget is None:
            from harc_hpc.models.modeling import free_memory_bytes

            self.budget = int(self.harc.memory_budget_gb * 2**30) if self.harc.memory_budget_gb \
                else int(0.8 * free_memory_bytes(self.device))
            self.result["header"]["solve_budget_bytes"] = self.budget
        return self.budget

    def release_inputs(self) -> None:
        self._inputs = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _settings(self, preconditioner=None, inner="default", chunk=None) -> dict:
        inner = self.inner_default if inner == "default" else inner
        return {"preconditioner": preconditioner or self.harc.preconditioner, "inner": inner,
                "chunk": chunk or self.pipeline_chunk(inner)}

    def pipeline_chunk(self, inner) -> int:
        """The tokens per operator step solve-router uses here: the store's chunk on a CPU; on a GPU,
        with the inputs resident, the joined blocks of ``solve_block_tokens``."""
        if self.device.type != "cuda":
            return self.chunk_default
        from harc_hpc.stages.solve_router import SOLVE_BLOCK_HEADROOM_BYTES, choose_residency, solve_block_tokens

        tokens = 2 * self.a.solve_tokens
        budget = self.solve_budget()
        _, need = choose_residency(tokens, self.a.solve_d, self.a.solve_k, "bfloat16", self.harc.dtype, inner,
                                   self.chunk_default, budget)
        if need > budget:
            return self.chunk_default
        return solve_block_tokens(tokens, self.a.solve_d, self.a.solve_k, self.compute_dtype.itemsize,
                                  min(max(budget - need, 0), SOLVE_BLOCK_HEADROOM_BYTES), self.chunk_default)

    def _residency(self, tokens: int, s: dict) -> tuple[bool, int]:
        from harc_hpc.stages.solve_router import choose_residency

        return choose_residency(tokens, self.a.solve_d, self.a.solve_k, "bfloat16", self.harc.dtype, s["inner"],
                                s["chunk"], self.solve_budget())

    def timed_solve(self, xs, sources, merged, s: dict, process_group=None) -> dict:
        """One solve_router call as solve-router makes it; figures, and the router (key ``weight``)."""
        import torch

        from harc_hpc.math import solve_router

        h, device = self.harc, self.device
        tokens = sum(int(x.shape[0]) for x in xs)
        keep, need = self._residency(tokens, s)
        stamps: list[float] = []
        deadline = self.deadline()

        def callback(it, rel):
            _sync(device)  # the stamps are wall time of finished work
            stamps.append(time.perf_counter())
            if stamps[-1] > deadline:
                raise OutOfTime(f"the time limit of {self.limit:.0f} s passed after {len(stamps)} CG iterations")

        def figures(wall):
            per_it = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else wall / max(1, len(stamps))
            setup = (stamps[0] - t0 - per_it) if stamps else wall
            return {"ms_per_iteration": 1e3 * per_it, "setup_s": max(0.0, setup), "wall_s": wall,
                    "iterations_timed": len(stamps)}

        base = reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        try:
            sol = solve_router(xs, sources, merged, alpha=h.alpha, hessian=h.hessian, solver=h.solver,
                               objective=h.objective, preconditioner=s["preconditioner"],
                               expert_block_tokens=h.expert_block_tokens, tol=h.tol, max_iter=h.max_iter,
                               callback=callback, inner_dtype=None if s["inner"] is None else getattr(torch, s["inner"]),
                               cache_bytes=self.budget or 0, compute_dtype=self.compute_dtype,
                               chunk_tokens=s["chunk"], keep_input_dtype=keep, process_group=process_group)
        except OutOfTime as exc:
            exc.partial.update(figures(time.perf_counter() - t0), iterations=len(stamps),
                               **peak_memory(device, base))
            raise
        _sync(device)
        wall = time.perf_counter() - t0
        out = {"tokens": tokens, "iterations": int(sol.iterations), "converged": bool(sol.converged),
               "relative_residual": float(sol.relative_residual), **figures(wall),
               "kl_before": float(sum(sol.kl_before)), "kl_after": float(sum(sol.kl_after)),
               "inputs_kept_as": "bfloat16" if keep else self.harc.dtype, "resident_bytes_estimate": int(need),
               **peak_memory(device, base), "weight": sol.weight.detach().double().cpu()}
        return out

    def solve_row(self, s: dict, default: bool = False) -> dict:
        xs, sources, merged = self.solve_inputs()
        tokens = sum(int(x.shape[0]) for x in xs)
        r = self.timed_solve(xs, sources, merged, s)
        weight = r.pop("weight")
        if default:
            self._default_weight = weight
        elif self._default_weight is not None:
            r["router_rel_diff_to_default"] = float((weight - self._default_weight).norm()
                                                    / self._default_weight.norm())
        r["settings"] = {"solver": self.harc.solver, "preconditioner": s["preconditioner"],
                         "inner_dtype": s["inner"] or "none", "compute_dtype": self.harc.dtype,
                         "chunk_tokens": s["chunk"]}
        proj = solve_projection(self.scale, self.consts, tokens=tokens, d=self.a.solve_d, k=self.a.solve_k,
                                preconditioner=s["preconditioner"], mixed=s["inner"] is not None)
        proj["peak_bytes"] = r["resident_bytes_estimate"]  # what solve-router and `plan` budget for
        r["projection"] = proj
        return r

    def solve_estimate(self, s: dict):
        """Seconds the solve with settings ``s`` should take, from the rows measured so far (None
        before any); a string when it would not be resident within solve-router's budget."""
        keep, need = self._residency(2 * self.a.solve_tokens, s)
        if need > self.solve_budget():
            return (f"resident, it needs {need / 2**30:.1f} GiB, over solve-router's budget of "
                    f"{self.budget / 2**30:.1f} GiB (the pipeline would stream or refuse; lower --solve-tokens)")
        m = self.measured.get("solve default")
        if not m:
            return None
        iterations = m["iterations"]
        per_it = m["ms_per_iteration"] / 1e3
        if s["preconditioner"] == "jacobi" and self.harc.preconditioner != "jacobi":
            iterations *= JACOBI_OVER_EXPERT_BLOCK_ITERATIONS
        if s["inner"] != self.inner_default and s["inner"] is None:  # exact float64 GEMMs instead of bf16
            p = (self.scale.get("solve") or {}).get("projection") or {}
            if p.get("h100_ms_per_iteration_bf16_gemm"):
                per_it *= p["h100_ms_per_iteration_fp32"] / p["h100_ms_per_iteration_bf16_gemm"]
        return m["setup_s"] + iterations * per_it + m["wall_s"] * 0.05

    def default_row(self) -> dict:
        r = self.solve_row(self._settings(), default=True)
        self.measured["solve default"] = r
        return r

    # -- 1-rank process group -------------------------------------------------------------------------------
    def distributed_row(self) -> dict:
        import torch
        import torch.distributed as dist

        from harc_hpc.math.distributed import ProcessGroupReducer

        device = self.device
        if dist.is_initialized():
            raise RuntimeError("a process group is already initialised in this process")
        port = free_port()
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        timeout = datetime.timedelta(seconds=max(30, min(300, int(self.remaining()))))
        out: dict = {"world_size": 1, "master": f"127.0.0.1:{port}"}
        t0 = time.perf_counter()
        try:
            from harc_hpc.devices import RankEnvironment, init_rank_process_group
        except ImportError:  # an older tree: the same steps by hand
            init_rank_process_group = None
        try:
            if init_rank_process_group is not None:
                # the pipeline's own rank start: the device made current (set_device) before NCCL,
                # the communicator bound to it (device_id), NCCL on a GPU, gloo on the CPU
                placement = init_rank_process_group(
                    str(device), "auto", timeout=timeout,
                    env=RankEnvironment(rank=0, world_size=1, local_rank=0, local_world_size=1, host="127.0.0.1"))
                out.update(backend=placement.backend, rank_device=str(placement.device),
                           init_via="harc_hpc.devices.init_rank_process_group")
                if placement.device != device:
                    raise RuntimeError(f"the rank was placed on {placement.device}, not {device}")
            else:
                backend = "nccl" if device.type == "cuda" else "gloo"
                if device.type == "cuda":
                    torch.cuda.set_device(device)  # before the process group: NCCL binds this rank to it
                kw = {"device_id": device} if device.type == "cuda" else {}
                dist.init_process_group(backend, init_method="env://", rank=0, world_size=1, timeout=timeout, **kw)
                out.update(backend=backend, rank_device=str(device), init_via="torch.distributed.init_process_group")
        except BaseException:
            _restore_env(saved)
            raise
        try:
            out["init_s"] = time.perf_counter() - t0
            t = torch.arange(1, 5, dtype=torch.float32, device=device)
            expect = t.clone()
            dist.all_reduce(t)  # first: communicator set-up
            _sync(device)
            t1 = time.perf_counter()
            dist.all_reduce(t)
            _sync(device)
            out["all_reduce_ms"] = 1e3 * (time.perf_counter() - t1)
            out["all_reduce_device"] = str(t.device)
            out["all_reduce_ok"] = bool(torch.equal(t, expect))  # world size 1: the sum is the tensor
            xs, sources, merged = self.solve_inputs()
            m = min(int(xs[0].shape[0]), self.a.smoke_tokens)
            part = [x[:m] for x in xs]
            s = self._settings()
            local = self.timed_solve(part, sources, merged, s)
            reducer = ProcessGroupReducer()
            shard = self.timed_solve(part, sources, merged, s, process_group=reducer)
            out.update(tokens=local["tokens"], local_iterations=local["iterations"],
                       distributed_iterations=shard["iterations"], local_wall_s=local["wall_s"],
                       distributed_wall_s=shard["wall_s"],
                       local_ms_per_iteration=local["ms_per_iteration"],
                       distributed_ms_per_iteration=shard["ms_per_iteration"],
                       all_reduce_calls=reducer.calls, all_reduce_bytes=reducer.bytes,
                       equal_bitwise=bool(torch.equal(local["weight"], shard["weight"])),
                       rel_diff=float((local["weight"] - shard["weight"]).norm() / local["weight"].norm()),
                       peak_bytes=max(local["peak_bytes"], shard["peak_bytes"]), memory=local["memory"])
            if not out["all_reduce_ok"]:
                raise RuntimeError(f"all_reduce over 1 rank changed the tensor: {t.tolist()} != {expect.tolist()}")
            if not out["equal_bitwise"]:
                raise RuntimeError(f"the 1-rank distributed solve differs from the local one ({out['rel_diff']:.2e})")
        finally:
            dist.destroy_process_group()
            _restore_env(saved)
        return out

    # -- the paper-style operator --------------------------------------------------------------------------
    def paper_row(self) -> dict:
        import torch

        from bench_solver import paper_style_solve
        from harc_hpc.models.modeling import free_memory_bytes

        device = self.device
        xs, sources, merged = self.solve_inputs()
        base = reset_peak(device)
        # The published scripts keep float32 activations: a float32 copy of the same inputs when it
        # fits beside them; else their bf16 as they are (then its GEMMs run in bf16; recorded).
        need = sum(x.numel() * 4 for x in xs)
        work = torch.float32 if need <= 0.9 * free_memory_bytes(device) else torch.bfloat16
        held = [x.to(work) for x in xs]
        seqs = [[x[s:s + PAPER_SEQ] for s in range(0, int(x.shape[0]), PAPER_SEQ)] for x in held]
        alpha = self.harc.alpha
        out = {"activations_dtype": str(work).replace("torch.", ""), "sequence_tokens": PAPER_SEQ,
               "tokens": sum(int(x.shape[0]) for x in xs)}
        # bench_solver.paper_style_solve makes its accumulators with torch.zeros(...) and no device:
        # the device context puts them on the inputs' device.
        with device:
            _sync(device)
            t0 = time.perf_counter()
            paper_style_solve(seqs, sources, merged, alpha, 0.0, 0)  # the rhs and the initial residual
            _sync(device)
            two = time.perf_counter() - t0
            per_app = two / 2
            out["setup_s"] = two
            fit = int((self.deadline() - time.perf_counter()) / max(per_app, 1e-9) * 0.9) - 2
            n_it = min(PAPER_ITERATIONS, fit)
            if n_it < 1:
                raise OutOfTime(f"one operator application takes {per_app:.2f} s: no iteration fits the time left",
                                {**out, "ms_per_application": 1e3 * per_app, **peak_memory(device, base)})
            t0 = time.perf_counter()
            x, it, res = paper_style_solve(seqs, sources, merged, alpha, 0.0, n_it)
            _sync(device)
            wall = time.perf_counter() - t0
        if x.device != merged.device:
            raise RuntimeError(f"the paper-style solve returned its router on {x.device}, not {merged.device}")
        out.update(iterations=int(it), wall_s=wall, ms_per_iteration=1e3 * max(0.0, wall - two) / max(1, it),
                   relative_residual=float(res), **peak_memory(device, base))
        m = self.measured.get("solve default")
        if m and m.get("ms_per_iteration"):
            out["over_default_ms_per_iteration"] = out["ms_per_iteration"] / m["ms_per_iteration"]
        if it < PAPER_ITERATIONS:
            raise OutOfTime(f"{it} of {PAPER_ITERATIONS} iterations fitted the time left", out)
        return out

    def paper_estimate(self):
        m = self.measured.get("solve default")
        if not m:
            return None
        # at least the default's cost per iteration for 2 + 20 operator applications
        return (PAPER_ITERATIONS + 2) * m["ms_per_iteration"] / 1e3

    # -- capture ---------------------------------------------------------------------------------------------
    def capture_model(self) -> dict:
        if self._capture_model is None:
            from bench_scale import build

            a = self.a
            self._capture_tmp = tempfile.TemporaryDirectory(prefix="harc-bench-gpu-")
            path = Path(self._capture_tmp.name) / "model"
            t0 = time.perf_counter()
            model_bytes = build(path, a.layers, a.hidden, a.experts, a.intermediate)
            self._capture_model = {"path": path, "model_bytes": int(model_bytes),
                                   "build_s": time.perf_counter() - t0}
        return self._capture_model

    def capture_row(self, mode: str) -> dict:
        import torch

        a = self.a
        built_here = self._capture_model is None
        model = self.capture_model()
        build = {"build_s": model["build_s"]} if built_here else {}  # the model is built by the first row
        tmp = Path(self._capture_tmp.name)
        out = str(tmp / f"{mode}.json")
        timeout = self.remaining()
        if timeout <= 0:
            raise OutOfTime("the time limit passed while the model was built", build)
        cmd = [sys.executable, __file__, "--child", mode, str(model["path"]), out, "--device", str(self.device),
               "--tokens", str(a.tokens), "--seq", str(a.seq)] + (["--threads", str(a.threads)] if a.threads else [])
        try:
            proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            raise OutOfTime(f"the capture process was killed at the time limit ({timeout:.0f} s)",
                            build) from None
        if proc.returncode != 0:
            raise RuntimeError(f"the {mode} capture process failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
        r = json.loads(Path(out).read_text())
        r.pop("mode", None)
        self._capture_inputs[mode] = torch.load(out + ".pt")
        r.update(model_bytes=model["model_bytes"], layers=a.layers, **build)
        r["memory"], r["peak_bytes"] = ("device", r["peak_device_bytes"]) if "peak_device_bytes" in r \
            else ("host RSS", r["peak_rss_bytes"])
        if len(self._capture_inputs) == 2:
            w, o = self._capture_inputs["whole"], self._capture_inputs["onloaded"]
            r["router_inputs_max_rel_diff"] = max(
                float((w[l] - o[l]).norm() / w[l].norm().clamp(min=1e-30)) for l in w)
        r["projection"] = capture_projection(self.scale, self.consts, layers=a.layers, hidden=a.hidden,
                                             experts=a.experts, intermediate=a.intermediate, heads=16, kv_heads=8,
                                             tokens=r["tokens"], model_bytes=model["model_bytes"])
        return r

    def capture_estimate(self):
        """After one capture path: its time (less the model's build). Before: a rough guess (the build
        at 100 MB/s, 10 s to start a process, 10x the H100 projection of load and forward); the
        subprocess's timeout guards what the guess misses."""
        first = next((r for r in self.result["rows"] if r["kind"] == "capture" and r.get("status") == "ok"), None)
        if first is not None:
            return first["row_s"] - first.get("build_s", 0.0) + 5.0
        a = self.a
        total, _ = capture_params(a.layers, a.hidden, a.experts, a.intermediate, 16, 8)
        proj = capture_projection(self.scale, self.consts, layers=a.layers, hidden=a.hidden, experts=a.experts,
                                  intermediate=a.intermediate, heads=16, kv_heads=8, tokens=a.tokens,
                                  model_bytes=2 * total)
        build = 0.0 if self._capture_model is not None else 2 * total / 1e8
        return build + 10.0 + 10 * (proj.get("forward_s", 0.0) + proj.get("load_s", 0.0))

    def close(self) -> None:
        if self._capture_tmp is not None:
            self._capture_tmp.cleanup()
            self._capture_tmp = None

    # -- all rows -----------------------------------------------------------------------------------------------
    def run(self, parts: set) -> None:
        self.write()
        if "solve" in parts:
            self.run_row("solve", "default", self.default_row, lambda: self.solve_estimate(self._settings()))
        if "distributed" in parts:
            self.run_row("distributed", "1-rank " + ("nccl" if self.device.type == "cuda" else "gloo"),
                         self.distributed_row)
        if "solve" in parts:
            s = self._settings(preconditioner="jacobi")
            self.run_row("solve", "jacobi", lambda: self.solve_row(s), lambda: self.solve_estimate(s))
        if "paper-style" in parts:
            self.run_row("paper_style", f"{PAPER_ITERATIONS} iterations", self.paper_row, self.paper_estimate)
        if "capture" in parts:
            for mode in ("onloaded", "whole"):
                self.run_row("capture", mode, lambda m=mode: self.capture_row(m), self.capture_estimate)
        if "solve" in parts:
            other = None if self.inner_default is not None else "bfloat16"
            variants = [("inner " + (other or "none"), self._settings(inner=other))]
            variants += [(f"chunk {c}", self._settings(chunk=c)) for c in self.a.chunks if c != self._settings()["chunk"]]
            for name, s in variants:
                self.run_row("solve", name, lambda s=s: self.solve_row(s), lambda s=s: self.solve_estimate(s))
        self.release_inputs()
        self.close()
        self.result["header"]["finished"] = True
        self.write()


# -- the table ------------------------------------------------------------------------------------------------

def _gib(v) -> str:
    return "-" if v is None else f"{v / 2**30:.2f} GiB"


def _num(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _status(r: dict) -> str:
    return r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"


def markdown(result: dict) -> list[str]:
    h = result["header"]
    rows = result["rows"]
    lines = [f"# GPU benchmark: {h['device_name']} ({h['device']})", "",
             f"torch {h['torch']}, CUDA {h.get('cuda') or '-'}; time limit {h['time_limit_s']:.0f} s, "
             f"{h.get('elapsed_s') or 0:.0f} s elapsed{'' if h['finished'] else ' (running)'}"
             f"{'; --quick: toy sizes, not a figure' if h['quick'] else ''}. Projections (in brackets): "
             f"H100 SXM from benchmarks/results/scale.json, not measured.", ""]
    solves = [r for r in rows if r["kind"] == "solve"]
    if solves:
        s, p = h["solve_shape"], h["pipeline_defaults"]
        lines += ["## Solve", "",
                  f"d {s['d']}, K {s['K']}, 2 x {s['tokens_per_task']} tokens, bf16 inputs resident. Default: "
                  f"{p['solver']}, {p['preconditioner']} ({p['expert_block_tokens']} tokens), {p['compute_dtype']} "
                  f"compute, inner {p['inner_dtype']}, chunks of {p['chunk_tokens']}, tol {p['tol']}.", "",
                  "| row | status | iterations [proj.] | ms / iteration [proj.] | setup | wall [proj. CG] | peak memory [estimate] "
                  "| router vs default |", "|---|---|---|---|---|---|---|---|"]
        for r in solves:
            pr = r.get("projection") or {}
            lines.append(
                f"| {r['name']} | {_status(r)} | {r.get('iterations', '-')} [{pr.get('iterations', '-')}] | "
                f"{_num(r.get('ms_per_iteration'), '.3g')} [{_num(pr.get('ms_per_iteration'), '.3g')}] | "
                f"{_num(r.get('setup_s'), '.2f')} s | {_num(r.get('wall_s'), '.2f')} s [{_num(pr.get('solve_s'), '.3g')} s] | "
                f"{_gib(r.get('peak_bytes'))} ({r.get('memory', '-')}) [{_gib(pr.get('peak_bytes'))}] | "
                f"{_num(r.get('router_rel_diff_to_default'), '.1e')} |")
        lines.append("")
    for r in (r for r in rows if r["kind"] == "paper_style"):
        lines += ["## Paper-style operator", "",
                  f"{_status(r)}. {r.get('iterations', '-')} CG iterations of the published code's operator "
                  f"(per {r.get('sequence_tokens', PAPER_SEQ)}-token sequence, {r.get('activations_dtype', '-')} "
                  f"activations) on the same inputs: {_num(r.get('ms_per_iteration'), '.1f')} ms an iteration "
                  f"({_num(r.get('over_default_ms_per_iteration'), '.1f')}x the default solve's), setup (2 "
                  f"applications) {_num(r.get('setup_s'), '.2f')} s, peak {_gib(r.get('peak_bytes'))} "
                  f"({r.get('memory', '-')}). No projection.", ""]
    caps = [r for r in rows if r["kind"] == "capture"]
    if caps:
        c = h["capture_shape"]
        lines += ["## Capture", "",
                  f"Synthetic Mixtral-shaped checkpoint: {c['layers']} layers, d {c['hidden']}, {c['experts']} "
                  f"experts, bf16; {c['tokens']} tokens in sequences of {c['seq']}.", "",
                  "| path | status | load [proj.] | forward [proj.] | tokens/s | peak device | peak RSS |",
                  "|---|---|---|---|---|---|---|"]
        diff = None
        for r in caps:
            pr = r.get("projection") or {}
            lines.append(f"| {r['name']} | {_status(r)} | {_num(r.get('load_s'), '.2f')} s "
                         f"[{_num(pr.get('load_s'), '.3g')} s] | {_num(r.get('forward_s'), '.3g')} s "
                         f"[{_num(pr.get('forward_s'), '.3g')} s] | {_num(r.get('tokens_per_s'), '.0f')} | "
                         f"{_gib(r.get('peak_device_bytes'))} | {_gib(r.get('peak_rss_bytes'))} |")
            diff = r.get("router_inputs_max_rel_diff", diff)
        if diff is not None:
            lines.append(f"\nRouter inputs, onloaded vs whole: max relative difference {diff:.1e}.")
        lines.append("")
    for r in (r for r in rows if r["kind"] == "distributed"):
        lines += ["## Distributed smoke", "",
                  f"{r['name']}: {_status(r)}. init {_num(r.get('init_s'), '.2f')} s; all_reduce on "
                  f"{r.get('all_reduce_device', '-')} {_num(r.get('all_reduce_ms'), '.3f')} ms, correct "
                  f"{r.get('all_reduce_ok', '-')}; solve of 2 x {(r.get('tokens') or 0) // 2} tokens through "
                  f"ProcessGroupReducer: {r.get('distributed_iterations', '-')} iterations, equal to the local "
                  f"solve bit for bit: {r.get('equal_bitwise', '-')} ({r.get('all_reduce_calls', '-')} all-reduces).",
                  ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes: a check of the code path, not a figure")
    ap.add_argument("--time-limit-s", type=float, default=540.0,
                    help="the whole command's time guard (default 540 s: answers within 10 min)")
    ap.add_argument("--part", action="append", choices=("solve", "distributed", "paper-style", "capture"),
                    help="run only these rows (repeatable; default all)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=1 << 20, help="capture tokens (default 1 M)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--solve-tokens", type=int, default=2_800_000, help="tokens per task of the solve")
    ap.add_argument("--solve-d", type=int, default=2048, help="router input width (OLMoE: 2048)")
    ap.add_argument("--solve-k", type=int, default=64, help="experts (OLMoE: 64)")
    ap.add_argument("--chunks", type=lambda v: [int(c) for c in v.split(",")], default=None,
                    help="chunk sizes of the chunking variants (default 65536,1048576)")
    ap.add_argument("--smoke-tokens", type=int, default=65536, help="tokens per task of the 1-rank distributed solve")
    ap.add_argument("--out", type=Path, default=None, help="where gpu.json / gpu.md go (default benchmarks/results "
                                                           "on a GPU; a CPU or --quick run needs --out)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 for --device cpu --quick, a check on a shared machine)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch

    device = torch.device(a.device)
    if a.threads is None and a.quick and device.type == "cpu":
        a.threads = 1
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        capture_child(a.child[0], a.child[1], a.device, a.tokens, a.seq, a.child[2])
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (use --device cpu --quick to check the code path)",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if a.quick:
        a.layers, a.hidden, a.intermediate, a.tokens, a.seq = 2, 128, 256, 512, 128
        a.solve_tokens, a.solve_d, a.solve_k, a.smoke_tokens = 16384, 128, 16, 4096
        a.chunks = a.chunks or [2048, 1 << 20]
    a.chunks = a.chunks or [65536, 1 << 20]
    is_figure = device.type == "cuda" and not a.quick
    if a.out is None:
        a.out = RESULTS if is_figure else Path(tempfile.mkdtemp(prefix="harc-bench-gpu-out-"))
    elif not is_figure and a.out.resolve() == RESULTS.resolve():
        print(f"error: a {'--quick' if a.quick else 'CPU'} run is not a GPU figure: it does not write into {RESULTS}",
              file=sys.stderr)
        return 2
    parts = set(a.part or ("solve", "distributed", "paper-style", "capture"))
    bench = Bench(a, device)
    try:
        bench.run(parts)
    finally:
        bench.close()
    print("\n".join(markdown(bench.result)))
    print(f"written: {a.out / 'gpu.json'}, {a.out / 'gpu.md'}")
    return 1 if any(r["status"] == "error" for r in bench.result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
