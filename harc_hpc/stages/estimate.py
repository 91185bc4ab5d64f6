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
from harc_hpc.errors import format_bytes

GB = 2**30  # executor sizes (mem_gb, gpu_memory_gb) are GiB, as SLURM's --mem
PROCESS_BYTES = 512 * 2**20  # interpreter, torch, transformers (a tiny task peaks at ~400 MB RSS)
CUDA_HOST_BYTES = 3 * 2**29  # what a CUDA context adds to a process's host memory, roughly
# CG iterations per layer by preconditioner, measured with benchmarks/bench_solver.py on the
# OLMoE-shaped layer (d 2048, K 64, 2 x 8192 tokens); other preconditioners: Jacobi's
SOLVE_ITERATIONS = {"expert-block": 60, "jacobi": 400}
_ITEM = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
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

        fam = family_for_config(conf)
        d = fam.hidden_size(conf)
        heads = int(conf.get("num_attention_heads", 1))
        dtype = str(conf.get("dtype") or conf.get("torch_dtype") or "bfloat16")
        mla = None
        if conf.get("kv_lora_rank"):
            mla = {k: int(conf.get(k) or 0) for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                                       "qk_rope_head_dim", "v_head_dim")}
        shared = int(conf.get("shared_expert_intermediate_size") or 0)
        if not shared and conf.get("n_shared_experts"):
            shared = int(conf["n_shared_experts"]) * fam.expert_intermediate_size(conf)
        return cls(
            layers=fam.num_layers(conf), moe_layers=list(fam.moe_layers(conf)), hidden=d,
            experts=fam.num_experts(conf), top_k=fam.top_k(conf),
            expert_intermediate=fam.expert_intermediate_size(conf),
            dense_intermediate=int(conf.get("intermediate_size") or 0),
            shared_intermediate=shared,
            heads=heads, kv_heads=int(conf.get("num_key_value_heads") or heads),
            head_dim=int(conf.get("head_dim") or d // heads), vocab=int(conf.get("vocab_size", 0)),
            dtype_bytes=_ITEM.get(dtype, 2), mla=mla, dtype=dtype if dtype in _ITEM else "bfloat16",
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


def _statistics_kind(cfg: PipelineConfig):
    from harc_hpc.stages.merge_statistics import statistics_kind

    return statistics_kind(cfg)


def _streamed_capture(cfg: PipelineConfig, conf: dict) -> bool:
    """capture_activations.streamed for the model of ``conf``."""
    from harc_hpc.models.families import family_for_config

    return cfg.harc.block_size == 1 and family_for_config(conf).residual_capture


def _estimate_streamed_capture(e: "StageEstimate", cfg: PipelineConfig, plan, shape: "ModelShape", tasks: list,
                               n_all: int, compute: int, cal: int, gpu: bool, throughput: float) -> None:
    """capture_activations.run_streamed: every decoder layer between two calibrated ones onloaded
    (block 0: those before the first), one batch in flight; on disk one residual store (the next
    one grows as the previous is consumed) plus a batch and a chunk per task in flux."""
    from harc_hpc.io.calibration_data import effective_settings

    d = shape.hidden
    firsts = [blk[0] for blk in plan.blocks]
    spans = [range(0, firsts[0] + 1)] + [range(a, b + 1) for a, b in zip(firsts, firsts[1:])]
    attention = shape.attention_params()

    def onloaded(span: range, first_block: bool) -> int:
        # the first layer's feed-forward half (block 0: none, it starts at the embeddings), the
        # layers between in full, the last one's attention half
        inner = span if first_block else span[1:]
        head = 0 if first_block else shape.layer_params(span[0]) - attention
        return head + sum(shape.layer_params(l) for l in inner[:-1]) + attention

    resident = max(onloaded(span, i == 0) for i, span in enumerate(spans)) * compute
    longest = max(effective_settings(cfg.calibration_for(t), cfg.calibration)["max_length"] for t in cfg.task_names)
    batch_tokens = cfg.calibration.batch_size * longest
    work = batch_tokens * (8 * d + 3 * shape.top_k * shape.expert_intermediate + shape.experts) * compute
    embed = shape.vocab * d * compute
    writers = len(cfg.task_names) * cfg.calibration.chunk_tokens * d * cal
    if gpu:
        e.gpu_bytes = int(1.0 * 2**30 + resident + work + embed)
        e.host_bytes = int(PROCESS_BYTES + writers)
    else:
        e.host_bytes = int(PROCESS_BYTES + writers + resident + work + embed)
    store = n_all * d * cal
    if cfg.run.retention == "keep":
        e.scratch_bytes = store * len(tasks)
    else:
        # the task in flight keeps its input from the batch a resume would restart at (one batch
        # and a chunk behind its durable output); every task may keep a partial last chunk
        e.scratch_bytes = store + (batch_tokens + len(cfg.task_names) * cfg.calibration.chunk_tokens) * d * cal
        e.notes.append("consumes the previous block's store chunk by chunk as it writes its own: about one "
                       "block's store on disk at a time")
    widest = max(spans, key=len)
    e.seconds = 2 * n_all * sum(shape.active_params(l) for l in widest) / (throughput * 1e12)
    between = f", the {len(widest) - 2} decoder layer(s) between" if len(widest) > 2 else ""
    e.notes.append(f"streamed batch by batch; onloaded at once: a calibrated layer's feed-forward half{between} "
                   f"and the next one's attention half")


def estimate(cfg: PipelineConfig, plan, resources: dict, conf: Optional[dict] = None,
             throughput_tflops: Optional[float] = None) -> list[StageEstimate]:
    """Per-stage estimates for ``plan``; ``resources[stage]``: what a task of it is given
    (``mem_bytes``, ``gpus``, ``gpu_bytes``); ``conf``: the model's config.json (default: the
    sources')."""
    from harc_hpc.models.modeling import check_memory_budget, gpu_free_bytes, host_memory_bounds, tightest
    from harc_hpc.stages import layout

    conf = conf if conf is not None else layout.reference_config(cfg)
    run_dir = plan.run_dir
    shape = ModelShape.from_config(conf)
    tokens = {t: n for t, (n, _) in tokens_per_task(cfg, run_dir).items()}
    n_all = sum(tokens.values())
    per_task_solve = {t: min(n, cfg.harc.max_tokens or n) for t, n in tokens.items()}
    n_solve = sum(per_task_solve.values())
    d, K = shape.hidden, shape.experts
    cal = _ITEM[cfg.calibration.dtype]
    block_size = max(len(b) for b in plan.blocks)
    by_stage = {}
    for t in plan.tasks.values():
        by_stage.setdefault(t.stage, []).append(t)

    def gpus_of(stage) -> int:
        return int(resources[stage]["gpus"] or 0)

    def tflops(stage, dtype: str) -> float:
        """What a task of ``stage`` sustains computing in ``dtype`` (GPU_TFLOPS, CPU_TFLOPS)."""
        if throughput_tflops:
            return throughput_tflops
        return GPU_TFLOPS.get(dtype, GPU_TFLOPS["float32"]) if gpus_of(stage) else CPU_TFLOPS

    out = []
    for stage, tasks in by_stage.items():
        on_gpu = gpus_of(stage) > 0
        compute = shape.dtype_bytes if on_gpu else 4
        model_dtype = shape.dtype if on_gpu else "float32"  # what the decoder layers compute in
        e = StageEstimate(stage, len(tasks))
        if stage == "merge-statistics" and _statistics_kind(cfg) == "gram_sequential":
            e.host_bytes = PROCESS_BYTES
            e.notes.append("RegMean++: only tokenises each source's data here; the layer-by-layer Gram pass "
                           "runs in merge-experts (memory as capture's, plus one layer's Gram accumulators)")
        elif stage == "merge-statistics":
            # one source at a time: one decoder layer, its in-flight hidden states, the layer's Gram
            # accumulators (float64 totals + float32 partial sums, 12 bytes an entry)
            from harc_hpc.io.calibration_data import effective_settings

            attn_out = shape.heads * shape.head_dim if shape.mla is None else d
            dense = max(shape.dense_intermediate, shape.shared_intermediate)
            moe_entries = K * (d * d + shape.expert_intermediate ** 2) + 3 * d * d + attn_out ** 2 \
                + (shape.shared_intermediate ** 2 if shape.shared_intermediate else 0)
            dense_entries = 2 * d * d + attn_out ** 2 + dense ** 2
            entries = [moe_entries if l in shape.moe_layers else dense_entries for l in range(shape.layers)]
            accumulators = 12 * max(entries)
            layer = max(shape.layer_params(l) for l in range(shape.layers)) * compute
            states = max(tokens.values()) * d * compute
            longest = max(effective_settings(cfg.calibration_for(t), cfg.calibration)["max_length"]
                          for t in cfg.task_names)
            work = cfg.calibration.batch_size * longest * (8 * d + 4 * shape.top_k * shape.expert_intermediate) * 4
            if on_gpu:
                e.gpu_bytes = int(1.0 * 2**30 + layer + accumulators + work + states)
                e.host_bytes = PROCESS_BYTES + states
            else:
                e.host_bytes = int(PROCESS_BYTES + layer + accumulators + work + states)
            e.scratch_bytes = 4 * sum(entries) * len(cfg.models.sources)  # the Gram files (float32, kept)
            gram_flops = 2 * sum(tokens.values()) * (
                3 * d * d + attn_out ** 2 + shape.top_k * (d * d + shape.expert_intermediate ** 2))
            flops = 2 * sum(tokens.values()) * sum(shape.active_params(l) for l in range(shape.layers))
            # the forward in the model's dtype, the Gram products in float32
            e.seconds = flops / (tflops(stage, model_dtype) * 1e12) + gram_flops * len(shape.moe_layers) / max(
                1, shape.layers) * shape.layers / (tflops(stage, "float32") * 1e12)
            e.notes.append(f"Gram accumulators {format_bytes(accumulators)} per decoder layer on the device; "
                           f"Gram files {format_bytes(e.scratch_bytes)} (float32, kept)")
        elif stage == "merge-experts":
            biggest = K * 2 * shape.expert_intermediate * d * 4
            e.host_bytes = PROCESS_BYTES + (len(cfg.models.sources) + 3) * biggest
            e.scratch_bytes = shape.total_params() * shape.dtype_bytes
            e.seconds = shape.total_params() * shape.dtype_bytes * (len(cfg.models.sources) + 1) / 1e9  # ~1 GB/s
            e.notes.append("streams tensor by tensor; output = the merged checkpoint (kept)")
        elif stage == "capture-activations" and _streamed_capture(cfg, conf):
            _estimate_streamed_capture(e, cfg, plan, shape, tasks, n_all, compute, cal,
                                       gpu=on_gpu, throughput=tflops(stage, model_dtype))
        elif stage == "capture-activations":
            layer = max(shape.layer_params(l) for l in range(shape.layers)) * compute
            states = n_all * d * compute
            from harc_hpc.io.calibration_data import effective_settings

            longest = max(effective_settings(cfg.calibration_for(t), cfg.calibration)["max_length"]
                          for t in cfg.task_names)
            work = cfg.calibration.batch_size * longest * (
                    8 * d + 3 * shape.top_k * shape.expert_intermediate + K) * compute
            embed = shape.vocab * d * compute
            writers = (block_size + 1) * len(cfg.task_names) * cfg.calibration.chunk_tokens * d * cal
            gpu_total = 0
            if on_gpu:
                gpu_total = int(1.0 * 2**30 + 2 * layer + work + embed)
                gpu_mem = resources[stage]["gpu_bytes"]
                if gpu_total + states <= 0.8 * gpu_mem:
                    gpu_total += states
                    e.notes.append("in-flight hidden states on the GPU")
                else:
                    e.notes.append(f"in-flight hidden states ({format_bytes(states)}) in host memory")
            states_in_host = not (on_gpu and "on the GPU" in e.notes[-1])
            host = PROCESS_BYTES + writers + (0 if on_gpu else 2 * layer + work + embed)
            if states_in_host:
                # capture_activations.placement_for's test, on what the executor grants: 80 % of the
                # host memory the task may still take (SLURM's grant less what it holds already)
                may_take, _ = tightest(host_memory_bounds(slurm_grant=int(resources[stage]["mem_bytes"]),
                                                          rss=host + (CUDA_HOST_BYTES if on_gpu else 0)))
                if states <= 0.8 * may_take:
                    host += states
                else:  # the code spills them to node-local disk ($TMPDIR)
                    if on_gpu:
                        e.notes[-1] = f"in-flight hidden states ({format_bytes(states)}) on node-local disk"
                    else:
                        e.notes.append(f"in-flight hidden states ({format_bytes(states)}) on node-local disk")
                    e.notes.append(f"needs {format_bytes(states)} free in run.node_local_dir ($TMPDIR by default) on the node")
            e.gpu_bytes, e.host_bytes = gpu_total, int(host)
            # while capture b runs: hidden b-1, hidden b, router inputs of block b
            keep = cfg.run.retention == "keep"
            per_block = n_all * d * cal * (block_size + 1)
            e.scratch_bytes = per_block * len(tasks) if keep else per_block + n_all * d * cal
            layers_run = min(2 * block_size, shape.layers)
            if layers_run > 1 and cfg.calibration.layer_checkpoints:  # a killed task resumes from it
                e.scratch_bytes += states
                e.notes.append(f"checkpoints its in-flight states ({format_bytes(states)}) after every decoder layer "
                               f"(calibration.layer_checkpoints: false to skip; a killed task then starts over)")
            flops = 2 * n_all * sum(shape.active_params(l) for l in range(layers_run)) / max(1, layers_run) * layers_run
            e.seconds = flops / (tflops(stage, model_dtype) * 1e12)
            e.notes.append("one decoder layer on the device at a time (onloaded from the shards)")
        elif stage == "compute-statistics":
            e.host_bytes = int(PROCESS_BYTES + 4 * cfg.calibration.chunk_tokens * d * 8 + 2 * d * d * 8)
            e.scratch_bytes = len(tasks) * (K * d * 8 * 3 + d * d * 8 + K * K * 8)
            e.seconds = 6 * max(per_task_solve.values()) * d * K / (tflops(stage, cfg.harc.dtype) * 1e12)
        elif stage == "solve-router":
            from harc_hpc.stages.solve_router import choose_residency, resolve_inner_dtype

            ranks = int(resources.get(stage, {}).get("ranks", 1))  # tokens sharded over the job's processes
            given = resources.get(stage, {})
            # solve_router.run's budget, from what the executor grants a task: harc.memory_budget_gb
            # (an error over what the task may take) or 80 % of what it may take
            if on_gpu:
                card = max(0, int(given.get("gpu_bytes", 0)) - CUDA_CONTEXT_BYTES)
                bounds = {"free GPU memory": gpu_free_bytes(card, 0, 0)}
            else:
                bounds = host_memory_bounds(slurm_grant=int(given.get("mem_bytes", 0)), rss=PROCESS_BYTES)
            if cfg.harc.memory_budget_gb:
                budget = int(cfg.harc.memory_budget_gb * 2**30)
                check_memory_budget("harc.memory_budget_gb", budget, bounds,
                                    f"solve-router (executor: {format_bytes(given.get('gpu_bytes', 0))} a GPU, "
                                    f"executor.gpu_memory_gb)" if on_gpu else
                                    f"solve-router (executor: {format_bytes(given.get('mem_bytes', 0))} of host "
                                    f"memory, executor.stages.solve-router.mem_gb)")
            else:
                budget = 0.8 * tightest(bounds)[0]
            inner = resolve_inner_dtype(cfg.harc.inner_dtype, on_gpu)
            keep_stored, inputs = choose_residency(-(-n_solve // ranks), d, K, cfg.calibration.dtype, cfg.harc.dtype,
                                                   inner, cfg.calibration.chunk_tokens, int(budget))
            item = cal if keep_stored else _ITEM[cfg.harc.dtype]
            # the expert-block preconditioner: U and U G^-1 (K x tasks*m x d) and K capacitance inverses
            block_rows = len(cfg.task_names) * cfg.harc.expert_block_tokens
            precond = (2 * K * block_rows * d + K * block_rows ** 2) * 4 if cfg.harc.preconditioner == "expert-block" else 0
            need = int(PROCESS_BYTES + inputs + 12 * K * d * 8 + precond)
            if on_gpu:
                # read chunk by chunk into the device-resident copy: a few chunks in host memory
                e.gpu_bytes = int(1.0 * 2**30 + inputs + precond)
                e.host_bytes = PROCESS_BYTES + 4 * cfg.calibration.chunk_tokens * d * 4
            else:
                e.host_bytes = need
            iters = min(cfg.harc.max_iter, SOLVE_ITERATIONS.get(cfg.harc.preconditioner, SOLVE_ITERATIONS["jacobi"]))
            # a matvec is two GEMMs over the inputs: compute- or memory-bound, whichever is slower
            bandwidth = 3.35e12 if on_gpu else 20e9  # H100 HBM3; a CPU socket, roughly
            n_rank = -(-n_solve // ranks)
            # the CG products in the inner dtype when mixed precision is on (the few exact residuals of
            # the refinement in harc.dtype are not counted), else in harc.dtype
            rate = tflops(stage, inner or cfg.harc.dtype)
            e.seconds = iters * max(4 * n_rank * d * K / (rate * 1e12), 2 * n_rank * d * item / bandwidth)
            e.notes.append(f"inputs resident: {format_bytes(inputs)} ({n_solve} tokens x {d} kept as "
                           f"{cfg.calibration.dtype if keep_stored else cfg.harc.dtype}, "
                           f"computed in {cfg.harc.dtype}"
                           + (f", products in {inner} with exact residuals" if inner else "")
                           + (f", per rank of {ranks}" if ranks > 1 else "") + "); "
                           f"~{iters} CG iterations assumed at {rate:g} TFLOP/s or {bandwidth / 1e12:g} TB/s")
        elif stage == "assemble-model":
            e.host_bytes = PROCESS_BYTES + K * 2 * shape.expert_intermediate * d * 4
            e.scratch_bytes = shape.total_params() * shape.dtype_bytes
            e.seconds = shape.total_params() * shape.dtype_bytes / 1e9
        elif stage == "report":
            # Each checkpoint in one onloaded pass: one decoder layer, the embeddings or the head, one
            # batch's logits, and the hidden states of the pass (the merged model's pass holds two
            # sets: every task with its own routers and with the sources' routers, the oracle).
            from harc_hpc.io.calibration_data import effective_settings

            layer = max(shape.layer_params(l) for l in range(shape.layers)) * compute
            held, longest = 0, 8
            for src in cfg.models.sources:
                if src.heldout is None or not src.heldout.files:
                    continue
                s = effective_settings(src.heldout, cfg.calibration, heldout=True)
                longest = max(longest, int(s["max_length"]))
                n = _tokens_from_files(src.heldout.files, s["num_samples"], s["max_length"])
                held += n if n is not None else _samples_bound(s["num_samples"]) * int(s["max_length"])
            states = 2 * held * d * compute
            fixed = layer + shape.vocab * d * compute + cfg.calibration.batch_size * longest * shape.vocab * 4
            if on_gpu:
                e.gpu_bytes = int(1.0 * 2**30 + fixed)
                if e.gpu_bytes + states <= 0.8 * resources[stage]["gpu_bytes"]:
                    e.gpu_bytes += states
                    e.host_bytes = PROCESS_BYTES
                else:
                    e.host_bytes = PROCESS_BYTES + states
            else:
                e.host_bytes = PROCESS_BYTES + fixed + states
            e.notes.append(f"each model onloaded one decoder layer at a time; hidden states of {held} held-out "
                           f"tokens x 2 ({format_bytes(states)})")
        elif stage in ("router-distill", "router-distill-model", "finetune"):
            _estimate_training(e, cfg, shape, n_solve, on_gpu, tflops(stage, _training_dtype(cfg, stage, on_gpu)))
        if on_gpu:
            e.host_bytes += CUDA_HOST_BYTES
        out.append(e)
    return out


def _training_dtype(cfg: PipelineConfig, stage: str, on_gpu: bool) -> str:
    if stage == "router-distill":
        return cfg.router_distill.dtype
    if stage == "finetune" and cfg.finetune.dtype != "auto":
        return cfg.finetune.dtype
    return "bfloat16" if on_gpu else "float32"


def _estimate_training(e: StageEstimate, cfg: PipelineConfig, shape, n_solve: int, on_gpu: bool, rate: float) -> None:
    """The training baselines (docs/training.md): router-distill holds one layer's router inputs and
    source logits like the solve; router-distill-model writes a checkpoint per start; finetune holds
    the whole model, its gradients and AdamW's moments of the trained parameters, and one batch's
    activations (every layer's, or one layer's with gradient checkpointing)."""
    d, K = shape.hidden, shape.experts
    if e.stage == "router-distill":
        rd = cfg.router_distill
        item = _ITEM[rd.dtype]
        batch = min(rd.batch_tokens * len(cfg.task_names), n_solve)
        need = n_solve * (d + 1 + K) * item + 4 * (batch + 65536) * K * item + 2 * K * (d + 1) * 8 * len(rd.starts)
        if on_gpu:
            e.gpu_bytes = int(1.0 * 2**30 + need)
            e.host_bytes = PROCESS_BYTES + 4 * cfg.calibration.chunk_tokens * d * 4
        else:
            e.host_bytes = int(PROCESS_BYTES + need)
        e.seconds = len(rd.starts) * rd.max_steps * 4 * batch * d * K / (rate * 1e12)
        e.notes.append(f"inputs resident: {format_bytes(n_solve * (d + 1 + K) * item)} ({n_solve} tokens x {d} and "
                       f"their source logits, {rd.dtype}); at most {rd.max_steps} Adam steps per start "
                       f"({len(rd.starts)}), early stopping usually ends sooner")
        return
    params = shape.total_params()
    if e.stage == "router-distill-model":
        e.host_bytes = PROCESS_BYTES + K * 2 * shape.expert_intermediate * d * 4
        e.scratch_bytes = len(cfg.router_distill.starts) * params * shape.dtype_bytes
        e.seconds = e.scratch_bytes / 1e9
        return
    fc = cfg.finetune
    w = _ITEM.get(_training_dtype(cfg, "finetune", on_gpu), 4)
    trained = params if fc.params in ("all", "non-expert") else (
        len(shape.moe_layers) * K * d if fc.params == "routers" else
        len(shape.moe_layers) * K * 3 * d * shape.expert_intermediate)
    model = params * w + trained * (w + 8)  # weights, gradients, AdamW's two float32 moments
    tokens = -(-fc.batch_size // 1) * fc.seq_length
    per_layer = tokens * (16 * d + 3 * shape.top_k * shape.expert_intermediate + K) * w
    acts = (per_layer + tokens * d * w * shape.layers) if fc.gradient_checkpointing else per_layer * shape.layers
    acts += 2 * tokens * shape.vocab * 4  # the logits and their float32 copy
    if on_gpu:
        e.gpu_bytes = int(1.0 * 2**30 + model + acts)
        e.host_bytes = PROCESS_BYTES + params * w
    else:
        e.host_bytes = int(PROCESS_BYTES + model + acts)
    e.scratch_bytes = len(fc.starts) * (params * shape.dtype_bytes + trained * 12)  # outputs + one checkpoint each
    active = sum(shape.active_params(l) for l in range(shape.layers)) + shape.vocab * d
    e.seconds = len(fc.starts) * fc.steps * 6 * tokens * active / (rate * 1e12)
    e.notes.append(f"the whole model on every rank ({format_bytes(params * w)}), gradients and AdamW moments of "
                   f"{trained:,} trained parameters, one batch of {fc.batch_size} x {fc.seq_length} tokens' activations"
                   + (" (gradient checkpointing)" if fc.gradient_checkpointing else ""))


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
