"""What each stage will need before anything runs: peak GPU memory, host RAM, scratch disk, time.

Everything is computed from the model's config.json (widths, experts, layers, dtype), the
calibration data size (the token stores when they exist, else ``num_samples x max_length`` per
task, an upper bound) and the config (block size, dtypes, ``harc.max_tokens``, retention). Times
are FLOP counts divided by the throughput of the dtype the stage computes in (GPU_TFLOPS: one H100,
300 TFLOP/s in bfloat16/float16, 50 in float32 and float64; CPU_TFLOPS 0.1 for a CPU task;
``throughput_tflops`` replaces them all), so they are orders of magnitude, not promises; the memory
figures are what the code allocates (one decoder layer at a time in capture, the resident inputs of
one layer in the solve) plus a fixed allowance for the Python process and the CUDA context; budgets
and placements apply the stages' own arithmetic (harc_hpc.models.modeling: host_memory_bounds,
gpu_free_bytes) to what the executor grants. ``check_fits`` there compares them with what the
executor section gives each stage (harc_hpc.pipeline.api) and names the stage and the resource that
does not fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from harc_hpc.config import PipelineConfig
from harc_hpc.dtypes import FLOAT_DTYPES, itemsize
from harc_hpc.errors import format_bytes

GB = 2**30  # executor sizes (mem_gb, gpu_memory_gb) are GiB, as SLURM's --mem
PROCESS_BYTES = 512 * 2**20  # interpreter, torch, transformers (a tiny task peaks at ~400 MB RSS)
CUDA_HOST_BYTES = 3 * 2**29  # what a CUDA context adds to a process's host memory, roughly
# CG iterations per layer by preconditioner, measured with benchmarks/bench_solver.py on the
# OLMoE-shaped layer (d 2048, K 64, 2 x 8192 tokens); other preconditioners: Jacobi's
SOLVE_ITERATIONS = {"expert-block": 110, "jacobi": 400}  # 107-110 and 271-379 measured (docs/benchmarks.md)
# Dense GEMM throughput a GPU task is assumed to sustain, TFLOP/s, by compute dtype: one H100 SXM,
# below its datasheet peaks (dense, no sparsity) on purpose.
# * bfloat16/float16: 989 peak on the tensor cores, ~600-700 reached by large cuBLAS GEMMs; an MoE
#   forward through transformers is many small per-expert GEMMs, attention and glue, so 300 (~30 %).
# * float32: 67 peak on the CUDA cores; the code never enables TF32 (torch's default for matmuls),
#   so SGEMMs reach ~50 (~75 %).
# * float64: 67 peak on the FP64 tensor cores (34 without them); DGEMMs reach ~50-60, taken as 50.
# A CPU task: 0.1 TFLOP/s, whatever the dtype (a few cores of one socket).
GPU_TFLOPS = {"bfloat16": 300.0, "float16": 300.0, "float32": 50.0, "float64": 50.0}
CPU_TFLOPS = 0.1
CUDA_CONTEXT_BYTES = 2**30  # device memory a CUDA context and torch's workspace take before any tensor


@dataclass
class StageEstimate:
    stage: str
    tasks: int
    gpu_bytes: int = 0  # per task, on one GPU (0: runs on CPU)
    host_bytes: int = 0  # per task
    scratch_bytes: int = 0  # on disk while the run goes on (the stage's peak contribution)
    seconds: float = 0.0  # per task
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelShape:
    layers: int
    moe_layers: list[int]
    hidden: int
    experts: int
    top_k: int
    expert_intermediate: int
    dense_intermediate: int
    shared_intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int
    mla: Optional[dict] = None  # DeepSeek-V3's multi-head latent attention ranks and head widths
    dtype: str = "bfloat16"  # the checkpoint's dtype: what the layers compute in on a GPU

    @classmethod
    def from_config(cls, conf: dict) -> "ModelShape":
        from harc_hpc.models.families import family_for_config
        from harc_hpc.models.families.wrappers import text_config

        fam = family_for_config(conf)  # a multimodal wrapper's family reads its text_config itself
        text = text_config(conf)  # the text model's keys, for the reads below
        d = fam.hidden_size(conf)
        heads = int(text.get("num_attention_heads", 1))
        dtype = str(text.get("dtype") or text.get("torch_dtype") or conf.get("dtype") or conf.get("torch_dtype")
                    or "bfloat16")
        mla = None
        if text.get("kv_lora_rank"):
            mla = {k: int(text.get(k) or 0) for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                                       "qk_rope_head_dim", "v_head_dim")}
        shared = int(text.get("shared_expert_intermediate_size") or 0)
        if not shared and text.get("n_shared_experts"):
            shared = int(text["n_shared_experts"]) * fam.expert_intermediate_size(conf)
        return cls(
            layers=fam.num_layers(conf), moe_layers=list(fam.moe_layers(conf)), hidden=d,
            experts=fam.num_experts(conf), top_k=fam.top_k(conf),
            expert_intermediate=fam.expert_intermediate_size(conf),
            dense_intermediate=int(text.get("intermediate_size") or 0),
            shared_intermediate=shared,
            heads=heads, kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or d // heads), vocab=int(text.get("vocab_size", 0)),
            dtype_bytes=itemsize(dtype, default=2), mla=mla, dtype=dtype if dtype in FLOAT_DTYPES else "bfloat16",
        )

    def attention_params(self) -> int:
        d, hd = self.hidden, self.head_dim
        if self.mla:
            m, h = self.mla, self.heads
            qk = m["qk_nope_head_dim"] + m["qk_rope_head_dim"]
            q = d * h * qk if not m["q_lora_rank"] else d * m["q_lora_rank"] + m["q_lora_rank"] * h * qk
            kv = d * (m["kv_lora_rank"] + m["qk_rope_head_dim"]) + m["kv_lora_rank"] * h * (m["qk_nope_head_dim"] + m["v_head_dim"])
            return q + kv + h * m["v_head_dim"] * d
        return d * hd * (2 * self.heads + 2 * self.kv_heads)

    def layer_params(self, layer: int) -> int:
        d = self.hidden
        if layer in self.moe_layers:
            mlp = self.experts * 3 * d * self.expert_intermediate + self.experts * d
            if self.shared_intermediate:
                mlp += 3 * d * self.shared_intermediate + d
        else:
            mlp = 3 * d * self.dense_intermediate
        return self.attention_params() + mlp

    def active_params(self, layer: int) -> int:
        """Parameters one token touches in ``layer`` (top-k experts)."""
        d = self.hidden
        if layer in self.moe_layers:
            mlp = self.top_k * 3 * d * self.expert_intermediate + self.experts * d
            if self.shared_intermediate:
                mlp += 3 * d * self.shared_intermediate
        else:
            mlp = 3 * d * self.dense_intermediate
        return self.attention_params() + mlp

    def total_params(self) -> int:
        return sum(self.layer_params(l) for l in range(self.layers)) + 2 * self.vocab * self.hidden


BYTES_PER_TOKEN = 4.0  # BPE on English text and code, roughly


UNKNOWN_SAMPLES = 1000  # samples assumed for the upper bound when the files are not readable here


def _samples_bound(num_samples) -> int:
    """Samples kept when the files cannot be counted: the count, or its share of UNKNOWN_SAMPLES."""
    from harc_hpc.io.calibration_data import sample_count

    return sample_count(num_samples, UNKNOWN_SAMPLES) if isinstance(num_samples, float) else int(
        num_samples or UNKNOWN_SAMPLES)


def _tokens_from_files(files, num_samples, max_length) -> Optional[int]:
    """Tokens a task's JSONL/text files will give, from their size (~4 bytes a token), capped at
    max_length per sample; None when a file is not readable here. A ``.gz`` file is counted
    uncompressed. Records are lines (a plain text file's paragraphs are undercounted: an upper
    bound on tokens per record)."""
    import gzip

    from harc_hpc.io.calibration_data import sample_count

    records = size = 0
    for f in files:
        p = Path(f)
        if not p.is_file():
            return None
        with (gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")) as fh:
            for line in fh:
                records += 1
                size += len(line)
    if records == 0:
        return None
    kept = sample_count(num_samples, records)
    return int(kept * min(max_length, size / records / BYTES_PER_TOKEN))


def tokens_per_task(cfg: PipelineConfig, run_dir: Optional[Path]) -> dict[str, tuple[int, str]]:
    """Calibration tokens per task and where the figure comes from (token store, file sizes, or
    the upper bound num_samples x max_length)."""
    from harc_hpc.io.calibration_data import effective_settings
    from harc_hpc.stages import layout

    out = {}
    for task in cfg.task_names:
        n = None
        if run_dir is not None:
            store = layout.token_store(Path(run_dir), task)
            if (store / "zarr.json").is_file():
                from harc_hpc.io.activations import TokenStore

                n, source = TokenStore(store).num_tokens, "token store"
        if n is None:
            data = cfg.calibration_for(task)
            s = effective_settings(data, cfg.calibration)
            n, source = _tokens_from_files(data.files, s["num_samples"], s["max_length"]), "file sizes"
            if n is None:  # the data is not here: the upper bound
                n = _samples_bound(s["num_samples"]) * int(s["max_length"])
                source = "upper bound num_samples x max_length"
        out[task] = (n, source)
    return out


@dataclass
class EstimateContext:
    """What every stage's estimate reads: the config, the plan, what the executor gives each stage's
    tasks (``resources[stage]``: ``mem_bytes``, ``gpus``, ``gpu_bytes``, ``ranks``), the model's shape
    and the calibration tokens. A stage's estimate (its spec's ``estimate:``) takes it and the stage's
    name and returns a StageEstimate; :func:`estimate` adds the CUDA context's host memory."""

    cfg: PipelineConfig
    plan: object
    resources: dict
    conf: dict
    shape: ModelShape
    tokens: dict  # calibration tokens per task
    tasks: dict  # stage -> its tasks in the plan
    throughput_tflops: Optional[float] = None

    @property
    def n_all(self) -> int:
        return sum(self.tokens.values())

    @property
    def per_task_solve(self) -> dict:
        """Tokens per task a solve keeps (harc.max_tokens)."""
        return {t: min(n, self.cfg.harc.max_tokens or n) for t, n in self.tokens.items()}

    @property
    def n_solve(self) -> int:
        return sum(self.per_task_solve.values())

    @property
    def cal(self) -> int:
        """Bytes an element of the stored router inputs and hidden states takes (calibration.dtype)."""
        return itemsize(self.cfg.calibration.dtype)

    @property
    def block_size(self) -> int:
        return max(len(b) for b in self.plan.blocks)

    def given(self, stage: str) -> dict:
        return self.resources.get(stage, {})

    def gpus(self, stage: str) -> int:
        return int(self.resources[stage]["gpus"] or 0)

    def on_gpu(self, stage: str) -> bool:
        return self.gpus(stage) > 0

    def compute_bytes(self, stage: str) -> int:
        """Bytes of an element the decoder layers compute with: the checkpoint's dtype on a GPU,
        float32 on a CPU (modeling.load_causal_lm)."""
        return self.shape.dtype_bytes if self.on_gpu(stage) else 4

    def model_dtype(self, stage: str) -> str:
        return self.shape.dtype if self.on_gpu(stage) else "float32"

    def tflops(self, stage: str, dtype: str) -> float:
        """What a task of ``stage`` sustains computing in ``dtype`` (GPU_TFLOPS, CPU_TFLOPS)."""
        if self.throughput_tflops:
            return self.throughput_tflops
        return GPU_TFLOPS.get(dtype, GPU_TFLOPS["float32"]) if self.gpus(stage) else CPU_TFLOPS

    def longest_sequence(self) -> int:
        """The longest calibration sequence of any task (calibration.max_length, per task)."""
        from harc_hpc.io.calibration_data import effective_settings

        return max(effective_settings(self.cfg.calibration_for(t), self.cfg.calibration)["max_length"]
                   for t in self.cfg.task_names)


def stage_estimator(spec):
    """The callable a stage spec's ``estimate:`` names (``package.module:function``); None when it
    names none. (Stages may not import the pipeline layer: resolved here, as its load_callable does.)"""
    import importlib

    name = getattr(spec, "estimate", None)
    if not name:
        return None
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def estimate(cfg: PipelineConfig, plan, resources: dict, conf: Optional[dict] = None,
             throughput_tflops: Optional[float] = None) -> list[StageEstimate]:
    """Per-stage estimates for ``plan``, each from the function its spec's ``estimate:`` names
    (harc_hpc.stages.estimates); ``resources[stage]``: what a task of it is given (``mem_bytes``,
    ``gpus``, ``gpu_bytes``); ``conf``: the model's config.json (default: the sources'). A stage
    whose spec names no estimate is listed with the process allowance only, and says so."""
    from harc_hpc.stages import layout

    conf = conf if conf is not None else layout.reference_config(cfg)
    by_stage: dict = {}
    for t in plan.tasks.values():
        by_stage.setdefault(t.stage, []).append(t)
    ctx = EstimateContext(cfg, plan, resources, conf, ModelShape.from_config(conf),
                          {t: n for t, (n, _) in tokens_per_task(cfg, plan.run_dir).items()}, by_stage,
                          throughput_tflops)
    out = []
    for stage in by_stage:
        fn = stage_estimator(plan.specs[stage])
        if fn is None:
            e = StageEstimate(stage, len(by_stage[stage]), host_bytes=PROCESS_BYTES,
                              notes=["not estimated: its stage spec names no estimate function"])
        else:
            e = fn(ctx, stage)
        if ctx.on_gpu(stage):
            e.host_bytes += CUDA_HOST_BYTES
        out.append(e)
    return out


def format_estimates(estimates: list[StageEstimate], cfg: PipelineConfig) -> str:
    lines = [f"{'stage':<22} {'tasks':>5} {'GPU/task':>10} {'RAM/task':>10} {'scratch':>10} {'time/task':>10}"]
    for e in estimates:
        t = e.seconds
        when = f"{t:.0f} s" if t < 120 else (f"{t / 60:.0f} min" if t < 7200 else f"{t / 3600:.1f} h")
        lines.append(f"{e.stage:<22} {e.tasks:>5} {format_bytes(e.gpu_bytes) if e.gpu_bytes else '-':>10} "
                     f"{format_bytes(e.host_bytes):>10} {format_bytes(e.scratch_bytes) if e.scratch_bytes else '-':>10} "
                     f"{when:>10}")
        for n in e.notes:
            lines.append(f"    {n}")
    return "\n".join(lines)


def estimate_plan(cfg: PipelineConfig, plan, resources: dict, conf: Optional[dict] = None,
                  throughput_tflops: Optional[float] = None) -> dict:
    """The pipeline's ``estimate`` hook: estimates, token counts and the printed table, as data."""
    est = estimate(cfg, plan, resources, conf, throughput_tflops)
    tokens = tokens_per_task(cfg, plan.run_dir)
    text = "\n".join([f"calibration tokens, {t}: {n:,} ({src})" for t, (n, src) in tokens.items()]
                      + [format_estimates(est, cfg)])
    return {"stages": [asdict(e) for e in est], "tokens": {t: n for t, (n, _) in tokens.items()}, "table": text}
