"""The pipeline configuration: one YAML file validated into typed models.

Every section forbids unknown keys, so a typo is an error that names its path
(``harc.alpah: extra inputs are not permitted``) instead of a silently ignored setting.
Relative paths are resolved against the directory of the YAML file, so a config
works from any working directory (a SLURM job's cwd is not the user's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from harc_hpc.errors import UsageError


class ConfigError(UsageError):
    """A configuration problem; the message names the file and the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# -- one-line values --------------------------------------------------------------------------
# Values that end up in a generated sbatch job script (partition, account, qos, extra sbatch
# options, setup lines, the run directory) must be one line of text: a newline would end the
# ``#SBATCH`` line and run the rest as shell. Any ASCII control character (0x00-0x1f, 0x7f, tab
# included) is refused; the error shows the value with repr() so that the character is visible.

def control_char_problem(value: str) -> Optional[str]:
    """Why ``value`` is not one line of printable text (None when it is)."""
    for i, c in enumerate(value):
        if ord(c) < 0x20 or ord(c) == 0x7F:
            return (f"contains the control character {c!r} at position {i}: {value!r} "
                    "(a value that goes into a job script must be one line of printable text)")
    return None


def _one_line(value):
    problem = control_char_problem(str(value))
    if problem:
        raise ValueError(problem)
    return value


def _one_line_path(value):
    _one_line(value)
    # an environment variable is expanded when the path is resolved: check what it becomes too
    expanded = os.path.expandvars(str(value))
    if expanded != str(value):
        problem = control_char_problem(expanded)
        if problem:
            raise ValueError(f"after expanding environment variables, {problem}")
    return value


def _one_line_keys(value: dict) -> dict:
    for key in value:
        problem = control_char_problem(str(key))
        if problem:
            raise ValueError(f"key {problem}")
    return value


OneLine = Annotated[str, AfterValidator(_one_line)]
OneLinePath = Annotated[Path, AfterValidator(_one_line_path)]
OneLineAny = Annotated[Any, AfterValidator(_one_line)]


class RunSection(_Strict):
    name: OneLine = "harc-run"
    output_dir: OneLinePath = Path("runs")
    seed: int = 0
    # Intermediate artifacts (hidden-state caches, router inputs) are deleted once every task that
    # reads them is complete ("delete-intermediate"); "keep" leaves them for inspection. A later run
    # that needs a deleted one recomputes it. The merged model, routers, final model and report are
    # never deleted.
    retention: Literal["keep", "delete-intermediate"] = "delete-intermediate"
    # Where capture and report keep in-flight hidden states that fit neither the GPU nor host memory
    # (memory-mapped, deleted when the task ends). Must be node-local (local SSD, /tmp): on a shared
    # filesystem every layer would read and write them over the network. Default: $TMPDIR.
    node_local_dir: Optional[OneLinePath] = None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# -- calibration data ---------------------------------------------------------------------------

def _num_samples(value):
    """A count (an integer >= 1) or a share of the samples (a float in (0, 1]); None: all of them.
    The type decides: 1 is one sample, 1.0 is all of them."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of samples (an integer >= 1) or a fraction of them in (0, 1], "
                         f"got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"a number of samples must be >= 1, got {value} (a share of them is a fraction "
                             "in (0, 1], e.g. 0.5)")
        return value
    if not 0.0 < value <= 1.0:
        raise ValueError(f"a fraction of the samples must be in (0, 1], got {value} (a number of samples is "
                         "an integer, e.g. 100)")
    return value


NumSamples = Annotated[Optional[Union[int, float]], BeforeValidator(_num_samples)]

# Which tokens of a sample are fed and which are selected (docs/configuration.md, calibration modes):
# full: the whole sample fed, every token selected; prompt: only the non-assistant messages fed, every
# token selected; response: the whole conversation fed, only the assistant turns' tokens selected.
# None: not stated here (inherited; in the end "full", or "prompt" from the deprecated prompts_only).
# Left out of the dump when None, so that configs without the key keep their digests.
CalibrationMode = Optional[Literal["full", "prompt", "response"]]


def _check_mode_against_prompts_only(data) -> None:
    if data.prompts_only and data.mode not in (None, "prompt"):
        raise ValueError(f"prompts_only: true (deprecated; it means mode: prompt) contradicts mode: {data.mode}; "
                         "set mode alone")


class CalibrationData(_Strict):
    """Calibration text of one task: JSONL with ``messages`` (chat) or ``text`` records, or plain text."""

    files: list[Path] = Field(default_factory=list)
    format: Literal["auto", "chat", "text", "plain"] = "auto"
    num_samples: NumSamples = None
    max_length: int = Field(default=512, ge=8)
    seed: int = 42
    mode: CalibrationMode = Field(default=None, exclude_if=lambda v: v is None)
    prompts_only: bool = False  # deprecated: mode: prompt
    use_chat_template: bool = True

    @model_validator(mode="after")
    def _mode_agrees(self) -> "CalibrationData":
        _check_mode_against_prompts_only(self)
        return self


class SourceModel(_Strict):
    name: str
    path: str  # local directory or hub id
    calibration: Optional[CalibrationData] = None
    heldout: Optional[CalibrationData] = None

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError("must be non-empty and contain only letters, digits, '-' and '_'")
        return v


class ModelsSection(_Strict):
    base: Optional[str] = None
    sources: list[SourceModel]
    allow_pickle: bool = False
    trust_remote_code: bool = False
    revision: Optional[str] = None

    @model_validator(mode="after")
    def _unique_names(self) -> "ModelsSection":
        names = [s.name for s in self.sources]
        if len(names) < 1:
            raise ValueError("sources: at least one source model is required")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: duplicate names {dup}")
        return self


class MergeSection(_Strict):
    method: str = "linear"
    preset: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    exclude: list[str] = Field(default_factory=list)  # regexes of tensor names kept from the base
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None  # compute dtype (None: inputs')
    max_shard_size: str = "5GB"
    out_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None  # stored dtype (None: dtype)
    device: str = "auto"  # where WUDI's optimisation and merge statistics run ("auto": the task's GPU, else the CPU)
    # a multimodal wrapper's tensors outside its text model (vision tower, projector): merged by the
    # method like any other tensor, or taken from the base (docs/merging.md)
    vision: Literal["merge", "base"] = Field(default="merge", exclude_if=lambda v: v == "merge")


class OutputSection(_Strict):
    """How the merged model is stored. ``quantize: fp8-block``: the weights a FP8 block-quantized
    input stores as FP8 (DeepSeek-V3's ``weight_scale_inv`` blocks) are written so again, scales
    recomputed; without it a quantized input is written dequantized (docs/merging.md)."""

    quantize: Optional[Literal["fp8-block"]] = None


class CalibrationSection(_Strict):
    """Defaults applied to every task's calibration data unless the source overrides them."""

    num_samples: NumSamples = None
    max_length: int = Field(default=512, ge=8)
    seed: int = 42
    # Not inherited by held-out data (it has its own). "full" is what None means here, so both are
    # left out of the dump: stating the default changes no digest.
    mode: CalibrationMode = Field(default=None, exclude_if=lambda v: v in (None, "full"))
    prompts_only: bool = False  # deprecated: mode: prompt
    batch_size: int = Field(default=8, ge=1)
    chunk_tokens: int = Field(default=8192, ge=64)  # Zarr chunk length along tokens
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Compression of the hidden-state and router-input stores (every chunk keeps its CRC32C either
    # way). Measured (benchmarks/bench_zarr_writes.py --compression): zstd stores bf16 inputs in
    # 0.78x the bytes but writes 1.2-2x and reads 2.0-2.7x slower; worth it only where the disk, not
    # the CPU, is the limit.
    compression: Literal["none", "zstd"] = "none"
    # capture-activations saves its in-flight states after every decoder layer so that a task killed
    # at its time limit resumes there; each save writes tokens x d in the compute dtype to the run
    # directory (harc-hpc plan shows how much). false: a killed capture task starts over.
    layer_checkpoints: bool = True

    @model_validator(mode="after")
    def _mode_agrees(self) -> "CalibrationSection":
        _check_mode_against_prompts_only(self)
        return self


LayerSelection = Union[Literal["all"], list[int], dict[str, int]]


class HarcSection(_Strict):
    alpha: float = 0.9
    hessian: Literal["full", "diag", "identity"] = "full"
    solver: Literal["cg", "pcg", "direct", "auto"] = "pcg"
    # auto: expert-block for routers of K d >= 16384 unknowns, jacobi below (math.settings.resolve_preconditioner)
    preconditioner: Literal["auto", "expert-block", "jacobi", "kronecker", "none"] = "expert-block"
    # expert-block: how many of each task's tokens (the heaviest per expert) form each expert's block
    expert_block_tokens: int = Field(default=256, ge=1)
    objective: Literal["quadratic", "kl"] = "quadratic"
    tol: float = Field(default=1e-6, gt=0)
    max_iter: int = Field(default=1000, ge=1)
    layers: LayerSelection = "all"  # "all", [0, 3, 5] or {"last": N}
    block_size: int = Field(default=1, ge=1)
    dtype: Literal["float32", "float64"] = "float64"
    # mixed precision: CG corrections with 16-bit GEMMs, refined against the `dtype` operator to tol.
    # auto: bfloat16 on GPUs with fast 16-bit GEMMs (CUDA compute
    # capability >= 8.0), none elsewhere (CPU solves stay exact and reproducible across CPUs)
    inner_dtype: Optional[Literal["auto", "bfloat16", "float16"]] = "auto"
    device: str = "auto"
    # How much of the solve device's memory a layer's router inputs may take to stay resident for
    # every CG iteration (default: what the device has free, less 20 %).
    memory_budget_gb: Optional[float] = Field(default=None, gt=0)
    # Inputs over the budget are an error naming harc.max_tokens that fits, unless this is set: then
    # they are read from the store on every CG iteration (slow; the log states the projected time).
    stream_inputs: bool = False
    # Use at most this many tokens of each task per layer (a seeded, sequence-stratified subsample,
    # the same for statistics and solve): the paper's results plateau at ~40 % of the data.
    max_tokens: Optional[int] = Field(default=None, ge=1)
    # Also calibrate the sigmoid shared-expert gate of every MoE layer (Qwen2-MoE), from the same
    # router inputs, with the Bernoulli-KL objective (docs/solver.md, sigmoid gates). Off: merged as is.
    shared_expert_gate: bool = False

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise ValueError("must be in (0, 1]")
        return v

    @field_validator("layers")
    @classmethod
    def _layers_form(cls, v):
        if isinstance(v, dict):
            if set(v) != {"last"} or v["last"] < 1:
                raise ValueError("a mapping must be {last: N} with N >= 1")
        if isinstance(v, list) and any(i < 0 for i in v):
            raise ValueError("layer indices must be >= 0")
        return v


def _distinct_starts(v: list) -> list:
    if len(set(v)) != len(v):
        raise ValueError(f"each start at most once, got {v}")
    return v


def _adam_betas(v: tuple, optimizer: str) -> tuple:
    if not all(0.0 <= b < 1.0 for b in v):
        raise ValueError(f"{optimizer}'s betas must be in [0, 1), got {list(v)}")
    return v


class RouterDistillSection(_Strict):
    """router-distill (docs/training.md): the training counterpart of HARC. Only the routers are
    trained, layer by layer on the router inputs HARC's solve of that layer reads, with Adam on the
    router-level KL sum_i E_{x in task i} KL(softmax(W_i x) || softmax(W x)) (the objective HARC
    minimises in closed form; Bernoulli KLs for sigmoid gates), stopped early on the KL of a seeded
    held-out share of each task's calibration sequences. Off by default: a run without it plans,
    digests and writes exactly what it did before."""

    enabled: bool = False
    # Where training starts: the merged routers, HARC's calibrated routers, or both (one model each).
    starts: list[Literal["merged", "harc"]] = Field(default_factory=lambda: ["merged", "harc"], min_length=1)
    lr: float = Field(default=1e-2, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_steps: int = Field(default=1000, ge=1)
    # Tokens of each task per step (a seeded sample of its training tokens; all of them when fewer).
    batch_tokens: int = Field(default=4096, ge=1)
    # Early stopping: the held-out KL is measured every eval_every steps; training stops after
    # `patience` measurements without a relative improvement of min_improvement, keeping the best.
    eval_every: int = Field(default=20, ge=1)
    patience: int = Field(default=5, ge=1)
    min_improvement: float = Field(default=1e-4, ge=0)
    # Share of each task's calibration sequences held out for early stopping (0: none; train on all
    # tokens for max_steps and report the training KL).
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    dtype: Literal["float32", "float64"] = "float32"

    _unique_starts = field_validator("starts")(classmethod(lambda cls, v: _distinct_starts(v)))
    _betas_range = field_validator("betas")(classmethod(lambda cls, v: _adam_betas(v, "Adam")))


class FinetuneSection(_Strict):
    """finetune (docs/training.md): post-merge SFT of the merged model and/or HARC's calibrated model
    on the calibration data of every task (the paper's Table 7 setting), AdamW with a linear warm-up,
    checkpointed every ``checkpoint_every`` steps so that a killed task resumes to the same bytes.
    Off by default: a run without it plans, digests and writes exactly what it did before."""

    enabled: bool = False
    starts: list[Literal["merged", "harc"]] = Field(default_factory=lambda: ["merged", "harc"], min_length=1)
    # which parameters train: all, the routers (router-only SFT), the experts, or all but the experts
    params: Literal["all", "routers", "experts", "non-expert"] = "all"
    # sft: next-token cross-entropy on the data; output_kl: KL(source's next-token distribution || the
    # model's) on each source's own sequences (with params: routers, router-only distillation end to end)
    objective: Literal["sft", "output_kl"] = Field(default="sft", exclude_if=lambda v: v == "sft")
    lr: float = Field(default=1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    steps: int = Field(default=100, ge=1)
    # sequences per step (over all ranks of a distributed task) and tokens per sequence (longer ones cut)
    batch_size: int = Field(default=8, ge=1)
    seq_length: int = Field(default=512, ge=2)
    warmup_steps: int = Field(default=10, ge=0)
    # after the warm-up: constant, or linear decay to 0 at the last step
    schedule: Literal["constant", "linear"] = "linear"
    grad_clip: Optional[float] = Field(default=1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(default=50, ge=1)
    gradient_checkpointing: bool = False
    # auto: bfloat16 on a GPU, float32 on a CPU (reproducible there)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # over the ranks of a distributed task: ddp, the whole model on every rank and its gradients
    # all-reduced; fsdp, parameters, gradients and AdamW's state sharded (torch FSDP2, float32 master
    # weights computing in `dtype`) for a model that does not fit one device
    sharding: Literal["ddp", "fsdp"] = Field(default="ddp", exclude_if=lambda v: v == "ddp")

    _unique_starts = field_validator("starts")(classmethod(lambda cls, v: _distinct_starts(v)))
    _betas_range = field_validator("betas")(classmethod(lambda cls, v: _adam_betas(v, "AdamW")))


class StageResources(_Strict):
    partition: Optional[OneLine] = None
    account: Optional[OneLine] = None
    qos: Optional[OneLine] = None
    time_min: Optional[int] = Field(default=None, ge=1)
    cpus: Optional[int] = Field(default=None, ge=1)
    mem_gb: Optional[float] = Field(default=None, gt=0)
    gpus: Optional[int] = Field(default=None, ge=0)
    array_parallelism: Optional[int] = Field(default=None, ge=1)
    # A stage that runs distributed (solve-router): each task becomes a job of nodes x tasks_per_node
    # processes (default tasks_per_node: gpus when > 1, else 1) joined by torch.distributed.
    nodes: Optional[int] = Field(default=None, ge=1)
    tasks_per_node: Optional[int] = Field(default=None, ge=1)
    extra_sbatch: dict[str, OneLineAny] = Field(default_factory=dict)

    @field_validator("extra_sbatch")
    @classmethod
    def _extra_sbatch_keys_one_line(cls, v: dict) -> dict:
        return _one_line_keys(v)


class ExecutorSection(_Strict):
    kind: Literal["slurm", "local", "debug"] = "slurm"
    partition: Optional[OneLine] = None
    account: Optional[OneLine] = None
    qos: Optional[OneLine] = None
    time_min: int = Field(default=60, ge=1)
    cpus: int = Field(default=4, ge=1)
    mem_gb: float = Field(default=16, gt=0)
    gpus: int = Field(default=0, ge=0)
    array_parallelism: int = Field(default=64, ge=1)
    max_requeues: int = Field(default=3, ge=0)
    local_workers: int = Field(default=1, ge=1)  # tasks run at once by the local executor
    # How the ranks of a distributed task reduce: auto = NCCL on GPU ranks, gloo on CPU ranks; gloo
    # on GPU ranks only when set here (through host memory; slower); nccl refuses CPU ranks.
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    gpu_memory_gb: float = Field(default=80, gt=0)  # memory of one GPU of the partition (plan checks)
    signal_delay_s: int = Field(default=90, ge=1)  # SIGUSR2 this long before the time limit: requeue
    extra_sbatch: dict[str, OneLineAny] = Field(default_factory=dict)
    setup: list[OneLine] = Field(default_factory=list)  # one shell line each
    stages: dict[str, StageResources] = Field(default_factory=dict)

    @field_validator("extra_sbatch")
    @classmethod
    def _extra_sbatch_keys_one_line(cls, v: dict) -> dict:
        return _one_line_keys(v)


class DemoSection(_Strict):
    """Build the tiny demo sources (and their JSONL data) instead of reading model paths."""

    enabled: bool = False
    seed: int = 0
    cache_dir: Optional[Path] = None
    # moe: the HARC demo's tiny OLMoE sources; dense: the MergeME demo's dense Llama base and experts
    # (harc_hpc.demo.dense)
    kind: Literal["moe", "dense"] = "moe"


MERGEME_ROUTER_RULES = ("uniform", "random", "hidden_state", "task_vector")


class MergeMESection(_Strict):
    """An MoE built from dense experts (docs/mergeme.md): merge-experts runs build-moe on models.base
    and the dense models.sources (each source one expert), and the routers are fitted so that each
    source's calibration tokens go to that source's expert (harc.* settings; harc_hpc.math.targets)."""

    top_k: int = Field(default=2, ge=1)
    include_base_expert: bool = False
    shared_expert: Optional[Literal["base", "none"]] = None  # Qwen2 -> Qwen2-MoE only
    # the router the MoE is built with: the fit's starting point and the point of its quadratic model
    router_init: Literal["uniform", "random", "hidden_state", "task_vector"] = "uniform"
    # the target of source i's tokens: (1 - smoothing) onehot(expert i) + smoothing / K
    smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    # prompts of each source (by name) for the hidden_state / task_vector rules; a source without
    # any takes the first ``prompt_samples`` records of its calibration data
    prompts: dict[str, list[str]] = Field(default_factory=dict)
    prompt_samples: int = Field(default=8, ge=1)
    # router rules the report also measures, beside the built and the fitted routers
    compare: list[Literal["uniform", "random", "hidden_state", "task_vector"]] = Field(default_factory=list)


#: ``lm_eval.simple_evaluate`` options a config may set in ``report.lm_eval_options``
LM_EVAL_OPTIONS = ("limit", "num_fewshot", "batch_size", "max_batch_size", "gen_kwargs", "apply_chat_template",
                   "fewshot_as_multiturn", "system_instruction", "bootstrap_iters", "random_seed",
                   "numpy_random_seed", "torch_random_seed", "fewshot_random_seed", "confirm_run_unsafe_code")


class ReportSection(_Strict):
    enabled: bool = True
    top_k_end_to_end: bool = True
    # Fig. 1 of the paper: the merged model run with every source's routers on every task (the
    # diagonal is the oracle row); N x (N - 1) more held-out passes over the merged model.
    router_swap: bool = True
    lm_eval_tasks: list[str] = Field(default_factory=list)
    # Extra lm-eval HF model arguments, comma-separated, passed through as they are: for a model
    # larger than one GPU, e.g. "parallelize=True" (accelerate's device_map over the node's GPUs) or
    # "parallelize=True,max_cpu_memory=400GB,offload_folder=/local/offload" (CPU/disk offload).
    lm_eval_model_args: OneLine = ""
    # Which models lm-eval scores: base, sources (each), merged, calibrated, oracle (the merged model
    # with the task's source routers; see lm_eval_task_sources).
    # training: every training baseline's model (router-distill, finetune; docs/training.md)
    lm_eval_models: list[Literal["base", "sources", "merged", "calibrated", "oracle", "training"]] = Field(
        default_factory=lambda: ["merged", "calibrated"])
    # lm-eval's own evaluation options, passed to lm_eval.simple_evaluate (limit, num_fewshot,
    # batch_size, gen_kwargs, ...); batch_size defaults to calibration.batch_size.
    lm_eval_options: dict[str, Any] = Field(default_factory=dict)
    # task -> the source whose routers the oracle uses on it (harc-hpc's own tasks know theirs).
    lm_eval_task_sources: dict[str, str] = Field(default_factory=dict)

    @field_validator("lm_eval_options")
    @classmethod
    def _known_lm_eval_options(cls, v: dict) -> dict:
        unknown = sorted(set(v) - set(LM_EVAL_OPTIONS))
        if unknown:
            raise ValueError(f"unknown lm-eval option(s) {unknown}; allowed: {', '.join(LM_EVAL_OPTIONS)}")
        return v


class PipelineConfig(_Strict):
    run: RunSection = Field(default_factory=RunSection)
    models: ModelsSection
    merge: MergeSection = Field(default_factory=MergeSection)
    # left out of the dump while unset, so that a config without it keeps every digest
    output: OutputSection = Field(default_factory=OutputSection, exclude_if=lambda v: v.quantize is None)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    harc: HarcSection = Field(default_factory=HarcSection)
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    demo: DemoSection = Field(default_factory=DemoSection)
    report: ReportSection = Field(default_factory=ReportSection)
    # Training baselines (docs/training.md); left out of the dump while disabled, so that a config
    # without them keeps its snapshot and every digest.
    router_distill: RouterDistillSection = Field(default_factory=RouterDistillSection,
                                                 exclude_if=lambda v: not v.enabled)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection, exclude_if=lambda v: not v.enabled)
    # set: a MergeME build from dense experts with routers fitted to the sources' domains
    mergeme: Optional[MergeMESection] = None

    @model_validator(mode="after")
    def _mergeme_settings(self):
        m = self.mergeme
        if m is None:
            return self
        if self.models.base is None:
            raise ValueError("mergeme: models.base must be the dense base model the sources were continued from")
        unknown = sorted(set(m.prompts) - {s.name for s in self.models.sources})
        if unknown:
            raise ValueError(f"mergeme.prompts: {unknown} are not source names")
        missing = [s.name for s in self.models.sources if s.calibration is None]
        if missing:
            raise ValueError(f"mergeme: the router fit needs calibration data of every source; none for {missing}")
        if self.router_distill.enabled:
            raise ValueError("mergeme: router_distill distils source routers, which an MoE built from dense experts "
                             "does not have; set router_distill.enabled: false")
        if self.harc.shared_expert_gate:
            raise ValueError("mergeme: harc.shared_expert_gate is not fitted for built MoEs (the built gate is kept)")
        if self.harc.objective == "kl" and m.smoothing == 0:
            raise ValueError("mergeme: harc.objective kl needs mergeme.smoothing > 0 (with one-hot targets and "
                             "separable domains the exact fit has no finite minimiser); or use objective quadratic")
        if self.harc.preconditioner == "kronecker":
            raise ValueError("mergeme: harc.preconditioner kronecker is not offered for the domain fit; use jacobi")
        return self

    # -- derived helpers -------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.models.sources]

    def calibration_for(self, task: str) -> CalibrationData:
        src = next(s for s in self.models.sources if s.name == task)
        if src.calibration is None:
            raise ConfigError(f"models.sources[{task}].calibration: no calibration data given")
        return src.calibration



def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _resolve_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    def absolute(p):
        p = Path(os.path.expandvars(str(p))).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    cfg.run.output_dir = absolute(cfg.run.output_dir)
    for src in cfg.models.sources:
        # A path that exists relative to the config is local; anything else may be a hub id.
        candidate = absolute(src.path)
        if candidate.exists() or src.path.startswith((".", "/", "~", "$")):
            src.path = str(candidate)
        for data in (src.calibration, src.heldout):
            if data is not None:
                data.files = [absolute(f) for f in data.files]
    if cfg.models.base is not None:
        candidate = absolute(cfg.models.base)
        if candidate.exists() or cfg.models.base.startswith((".", "/", "~", "$")):
            cfg.models.base = str(candidate)
    if cfg.demo.cache_dir is not None:
        cfg.demo.cache_dir = absolute(cfg.demo.cache_dir)
    return cfg


def parse_config(data: dict, source: str = "<config>", base_dir: Optional[Path] = None) -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    if "sweep" in data:
        raise ConfigError(f"{source}: a sweep config (it has a `sweep:` section): run it with "
                          f"`harc-hpc sweep {source}` (docs/sweep.md)")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid configuration"]
        for err in exc.errors():
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            lines.append(f"  {_format_loc(err['loc'])}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    return _resolve_paths(cfg, base_dir or Path.cwd())


def load_config(path: Union[str, Path], overrides: Optional[dict] = None) -> PipelineConfig:
    """Read and validate a YAML config; ``overrides`` are dotted keys (``{"harc.alpha": 0.99}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    data = data or {}
    for dotted, value in (overrides or {}).items():
        apply_override(data, dotted, value)
    return parse_config(data, source=str(path), base_dir=path.parent.resolve())


def parse_override(text: str) -> tuple[str, Any]:
    """``"harc.alpha=0.5"`` -> ``("harc.alpha", 0.5)``: the value is read as YAML (numbers, true,
    lists, ``{a: 1}``), so ``--set`` takes what the config file would."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. harc.alpha=0.5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
    return key, value


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set ``dotted`` in a raw config tree; a list is entered by an item's ``name`` or its index
    (``models.sources.math.path``, ``models.sources.0.path``)."""
    node: Any = data
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        elif isinstance(node, list):
            match = [x for x in node if isinstance(x, dict) and x.get("name") == part]
            if match:
                node = match[0]
            elif part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ConfigError(f"--set {dotted}: {where} names no item of the list (by name or index)")
        else:
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:i])} is a value, not a section")
        if node is None:
            raise ConfigError(f"--set {dotted}: {where} is empty")
    if isinstance(node, list):
        if parts[-1].isdigit() and int(parts[-1]) < len(node):
            node[int(parts[-1])] = value
            return
        raise ConfigError(f"--set {dotted}: {'.'.join(parts[:-1])} is a list; name an item by index")
    if not isinstance(node, dict):
        raise ConfigError(f"--set {dotted}: {'.'.join(parts[:-1])} is a value, not a section")
    node[parts[-1]] = value


def dump_config(cfg: PipelineConfig) -> str:
    """YAML that loads back into the same config (jobs load the run's snapshot of it).

    Some code tells a default from an explicit value through pydantic's ``model_fields_set``: a
    task's calibration/heldout settings inherit the calibration section unless set, merge.method
    must agree with a preset only when set, executor resources beat the stage spec only when set.
    Those models are dumped with the fields that were set, so the difference survives the round
    trip; everything else is written out in full.
    """
    data = cfg.model_dump(mode="json")
    data["merge"] = cfg.merge.model_dump(mode="json", exclude_unset=True)
    data["executor"] = cfg.executor.model_dump(mode="json", exclude_unset=True)
    for src, out in zip(cfg.models.sources, data["models"]["sources"]):
        for key in ("calibration", "heldout"):
            value = getattr(src, key)
            if value is not None:
                out[key] = value.model_dump(mode="json", exclude_unset=True)
    return yaml.safe_dump(data, sort_keys=False)
