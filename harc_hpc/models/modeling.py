"""Shared pieces for running transformers decoder-only MoE models: device choice, whole-model
loading (the tests' and benchmarks' references), padding, router-input hooks. The layer-at-a-time
path that calibration and the report use is harc_hpc.models.onload; the decoder layers of OLMoE,
Qwen2/3-MoE and Mixtral share one calling convention in transformers 5 (``layer(hidden,
attention_mask=, position_ids=, position_embeddings=)``), which is all it relies on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch


def pick_device(name: str = "auto", key: str = "harc.device") -> torch.device:
    """The device ``name`` stands for here, CUDA with its index; a device that does not exist is a
    UsageError naming ``key`` (harc_hpc.devices.resolve_device)."""
    from harc_hpc.devices import resolve_device

    return resolve_device(name, key)


# -- memory this process may still take ---------------------------------------------------------
#
# A SLURM job's host memory is bounded by its cgroup (--mem becomes memory.max, or v1's
# memory.limit_in_bytes) long before the node's MemAvailable runs out; a GPU's by what the driver
# has free plus what torch's caching allocator holds reserved but unused. Budgets and placements
# come from these figures; `harc-hpc plan` applies the same arithmetic to what the executor gives.

_UNLIMITED = 2**60  # cgroup v1 writes "unlimited" as a huge page-rounded number (2^63 - 4096)


def gpu_free_bytes(free: int, reserved: int, allocated: int) -> int:
    """What a CUDA device can still give this process: the driver's free bytes (``mem_get_info``)
    plus what torch's caching allocator holds reserved but has not allocated (it reuses that
    before asking the driver)."""
    return int(free) + max(0, int(reserved) - int(allocated))


def _read_value(path: Path) -> Optional[int]:
    """An integer cgroup file's value; None when absent, unreadable, "max" or v1's "unlimited"."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat_value(path: Path, keys: tuple[str, ...]) -> int:
    """The first of ``keys`` in a memory.stat file (0 when absent)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    found = dict(line.split(None, 1) for line in lines if len(line.split()) == 2)
    for k in keys:
        if k in found:
            try:
                return int(found[k])
            except ValueError:
                return 0
    return 0


def _cgroup_dirs(base: Path, rel: str) -> list[Path]:
    """This process's cgroup folder under ``base`` and every ancestor up to ``base``: a limit set on
    the job's cgroup binds its steps' and tasks' cgroups below it. When the path is not visible
    (a cgroup namespace mounts the process's own cgroup as the root), ``base`` alone."""
    rel = rel.strip().strip("/")
    leaf = base / rel if rel else base
    if ".." in Path(rel).parts or not leaf.is_dir():  # outside this namespace's mount: not readable
        return [base]
    dirs = [leaf]
    while dirs[-1] != base and base in dirs[-1].parents:
        dirs.append(dirs[-1].parent)
    return dirs


def cgroup_free_bytes(cgroup_root: Path | str = "/sys/fs/cgroup", proc_root: Path | str = "/proc") -> Optional[int]:
    """Memory this process's cgroup (or an ancestor) may still take: the smallest ``limit - usage``
    over the levels that set a limit, cgroup v2 (``memory.max``, ``memory.current``) or v1
    (``memory.limit_in_bytes``, ``memory.usage_in_bytes``); None when no level sets one. Usage
    counts the page cache; its inactive file pages (memory.stat), which the kernel reclaims before
    it kills anything, are not counted as used."""
    root = Path(cgroup_root)
    try:
        lines = (Path(proc_root) / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    best: Optional[int] = None

    def consider(d: Path, limit_file: str, usage_file: str, inactive_keys: tuple[str, ...]):
        nonlocal best
        limit = _read_value(d / limit_file)
        if limit is None:
            return
        usage = _read_value(d / usage_file) or 0
        used = max(0, usage - _stat_value(d / "memory.stat", inactive_keys))
        free = max(0, limit - used)
        best = free if best is None else min(best, free)

    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2: one unified hierarchy, mounted at the root (or at root/unified)
            base = root if (root / "cgroup.controllers").exists() or not (root / "unified").is_dir() else root / "unified"
            for d in _cgroup_dirs(base, rel):
                consider(d, "memory.max", "memory.current", ("inactive_file",))
        elif "memory" in controllers.split(","):
            base = root / controllers if (root / controllers).is_dir() else root / "memory"
            for d in _cgroup_dirs(base, rel):
                consider(d, "memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file"))
    return best


def slurm_grant_bytes(env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The host memory SLURM grants this job on this node (``--mem``, ``--mem-per-cpu`` or
    ``--mem-per-gpu``, given to the job in MB): None outside a SLURM job or when it sets none."""
    env = os.environ if env is None else env

    def mb(key: str) -> Optional[int]:
        value = str(env.get(key, "")).strip().upper().removesuffix("M")
        try:
            return int(float(value)) if value else None
        except ValueError:
            return None

    per_node = mb("SLURM_MEM_PER_NODE")
    if per_node:  # --mem=0 asks for all of the node's memory: no grant of its own (the cgroup's stands)
        return per_node * 2**20
    for per, count in (("SLURM_MEM_PER_CPU", "SLURM_CPUS_ON_NODE"), ("SLURM_MEM_PER_GPU", "SLURM_GPUS_ON_NODE")):
        each, n = mb(per), mb(count)
        if each and n:
            return each * n * 2**20
    return None


def process_rss_bytes(proc_root: Path | str = "/proc") -> int:
    """This process's resident memory now (VmRSS; 0 when unknown)."""
    try:
        for line in (Path(proc_root) / "self" / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _mem_available(proc_root: Path | str = "/proc") -> Optional[int]:
    try:
        for line in (Path(proc_root) / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return None


def host_memory_bounds(mem_available: Optional[int] = None, cgroup_free: Optional[int] = None,
                       slurm_grant: Optional[int] = None, rss: int = 0) -> dict[str, int]:
    """Each bound on the host memory this process may still take, by what sets it: the node's
    MemAvailable, the cgroup's limit less its usage, SLURM's grant less this process's resident
    memory. The same arithmetic serves the running stage (host_memory_limits) and ``plan`` (the
    executor's ``mem_gb`` as the grant, the process's estimated footprint as ``rss``)."""
    out = {}
    if mem_available is not None:
        out["MemAvailable"] = max(0, int(mem_available))
    if cgroup_free is not None:
        out["cgroup memory limit"] = max(0, int(cgroup_free))
    if slurm_grant is not None:
        out["SLURM memory grant"] = max(0, int(slurm_grant) - int(rss))
    return out


def host_memory_limits(env: Optional[Mapping[str, str]] = None, cgroup_root: Path | str = "/sys/fs/cgroup",
                       proc_root: Path | str = "/proc") -> dict[str, int]:
    """host_memory_bounds of this process now (``env``, ``cgroup_root``, ``proc_root``: where to
    read them, for tests)."""
    grant = slurm_grant_bytes(env)
    return host_memory_bounds(_mem_available(proc_root), cgroup_free_bytes(cgroup_root, proc_root), grant,
                              process_rss_bytes(proc_root) if grant is not None else 0)


def tightest(bounds: dict[str, int]) -> tuple[int, str]:
    """The smallest bound and what sets it; (0, "nothing known") when there is none."""
    if not bounds:
        return 0, "nothing known"
    source = min(bounds, key=bounds.get)
    return bounds[source], source


def host_free_bytes(env: Optional[Mapping[str, str]] = None, cgroup_root: Path | str = "/sys/fs/cgroup",
                    proc_root: Path | str = "/proc") -> int:
    """The host memory this process may still take: the smallest of host_memory_limits."""
    return tightest(host_memory_limits(env, cgroup_root, proc_root))[0]


def device_memory_bounds(device: torch.device) -> dict[str, int]:
    """free_memory_bytes of ``device``, by what sets it."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return {"free GPU memory": gpu_free_bytes(free, torch.cuda.memory_reserved(device),
                                                  torch.cuda.memory_allocated(device))}
    return host_memory_limits()


def free_memory_bytes(device: torch.device) -> int:
    """Memory this process may still take on ``device``: on a GPU the driver's free bytes plus
    torch's reserved-but-unused cache; on the host the least of MemAvailable, the cgroup's limit
    less its usage and SLURM's grant less this process's RSS."""
    return tightest(device_memory_bounds(device))[0]


def check_memory_budget(key: str, budget_bytes: int, bounds: dict[str, int], where: str) -> None:
    """A configured memory budget that the memory this process may take cannot hold: a ConfigError
    naming the key, the budget and the bound (and what sets it)."""
    from harc_hpc.config import ConfigError
    from harc_hpc.errors import format_bytes

    if not bounds:
        return
    limit, source = tightest(bounds)
    if budget_bytes > limit:
        raise ConfigError(f"{key} is {format_bytes(budget_bytes)}, more than the {format_bytes(limit)} "
                          f"this task may take ({source})", where=where,
                          hint=f"lower {key} to at most {limit / 2**30:.2f} or leave it unset "
                               f"(then: the free memory less 20 %), or ask the scheduler for more memory")


def needs_remote_code(config: dict) -> bool:
    """``config.json`` (a dict) names modeling code of its own (``auto_map``) for a ``model_type``
    transformers does not have in its library: only that code can build the model."""
    if not config.get("auto_map"):
        return False
    from transformers import CONFIG_MAPPING

    return config.get("model_type") not in CONFIG_MAPPING


def check_remote_code(config: dict, trust_remote_code: bool, where: str) -> None:
    """Refuse, naming ``models.trust_remote_code``, a checkpoint whose code is needed but not trusted
    (instead of transformers' error or its interactive prompt)."""
    if trust_remote_code or not needs_remote_code(config):
        return
    from harc_hpc.config import ConfigError

    code = sorted({str(v).split("--")[-1].rsplit(".", 1)[0] + ".py" for v in config["auto_map"].values()
                   if isinstance(v, str)})
    raise ConfigError(f"model_type {config.get('model_type')!r} is not in transformers: the checkpoint brings its "
                      f"own modeling code ({', '.join(code)}), which runs only with models.trust_remote_code: true",
                      where=where, hint="read the checkpoint's code, then set models.trust_remote_code: true")


def load_causal_lm(path: Path | str, device: torch.device, dtype: Optional[torch.dtype] = None,
                   trust_remote_code: bool = False):
    """Load a checkpoint for calibration: eval mode, SDPA attention (causal without a mask tensor).

    On CPU the default compute dtype is float32 (bf16 matmuls on CPU are slow and not reproducible
    across thread counts); on GPU the checkpoint's own dtype.
    """
    import json

    from transformers import AutoModelForCausalLM

    from harc_hpc.models.families import UnsupportedModelError, family_for_config

    if dtype is None and device.type == "cpu":
        dtype = torch.float32
    attention = "sdpa"
    config_file = Path(str(path)) / "config.json"
    if config_file.is_file():  # a family may need another attention (GPT-OSS's sinks: eager)
        check_remote_code(json.loads(config_file.read_text()), trust_remote_code, where=str(path))
        try:
            attention = family_for_config(json.loads(config_file.read_text())).attn_implementation
        except UnsupportedModelError:  # a dense model (MergeME's experts): SDPA
            pass
        from transformers import AutoConfig

        attention = attention_implementation(AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code),
                                             attention)
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype if dtype is not None else "auto",
        attn_implementation=attention,
        trust_remote_code=trust_remote_code,
        local_files_only=Path(str(path)).exists(),
    )
    model.to(device)
    model.eval()
    return model


def attention_implementation(config, wanted: str = "sdpa") -> str:
    """``wanted`` (the family's), or ``eager`` when the model's causal-LM class does not implement it
    (transformers refuses SDPA for some architectures: DeepSeek-V4, MiMo-V2-Flash, ...)."""
    if wanted != "sdpa":
        return wanted
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return wanted
    return wanted if getattr(cls, "_supports_sdpa", True) else "eager"


def decoder(model):
    """The backbone (``model.model``) holding the decoder ``layers``; its embeddings are
    ``model.get_input_embeddings()``."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__name__}: backbone has no 'layers'; not a supported decoder layout")
    return inner


def pad_batch(seqs: list[torch.Tensor], pad_value=0) -> tuple[torch.Tensor, list[int]]:
    """Right-pad a list of (T_i, ...) tensors. Right padding keeps real tokens exact under a causal
    mask: they never attend to the pads that come after them."""
    lengths = [int(s.shape[0]) for s in seqs]
    T = max(lengths)
    out = seqs[0].new_full((len(seqs), T, *seqs[0].shape[1:]), pad_value)
    for i, s in enumerate(seqs):
        out[i, : lengths[i]] = s
    return out, lengths


def unpad(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(B, T, d) -> (sum lengths, d) keeping only real tokens, in sequence order."""
    return torch.cat([x[i, :n] for i, n in enumerate(lengths)], dim=0)


class RouterInputRecorder:
    """Forward hooks on router modules that keep their inputs (the router input x of each token)."""

    def __init__(self, modules: dict[int, torch.nn.Module]):
        self.records: dict[int, list[torch.Tensor]] = {l: [] for l in modules}
        self._handles = [m.register_forward_hook(self._hook(l)) for l, m in modules.items()]

    def _hook(self, layer: int) -> Callable:
        def hook(module, inputs, output):
            self.records[layer].append(inputs[0].detach())

        return hook

    def pop(self, layer: int) -> torch.Tensor:
        """All inputs recorded for ``layer`` since the last pop, as one (N, d) tensor."""
        parts = self.records[layer]
        self.records[layer] = []
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts], dim=0)

    def close(self):
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def batches(n: int, size: int) -> Iterable[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))
