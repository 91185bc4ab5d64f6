"""The device paths on a CUDA GPU (marked ``gpu``: skipped, with the reason, on a machine without
one; conftest). Each compares the GPU's answer with the CPU's, within what float32 GEMMs on another
kernel can differ by: the onloaded layer-wise capture against the whole model, the resident solve
and the statistics against the CPU solve, and a one-rank NCCL group through the rank setup the
pipeline uses."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch

from harc_hpc.config import load_config
from harc_hpc.io.calibration_data import tokenize_task
from harc_hpc.models.modeling import RouterInputRecorder, batches, load_causal_lm, pad_batch, unpad
from harc_hpc.models.onload import OnloadedModel
from harc_hpc.stages import layout, merge_experts
from pipeline_fixtures import build_tiny_sources, write_config

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_onloaded_forward_on_the_gpu_equals_the_whole_model(tmp_path):
    """One decoder layer at a time on cuda:0 against the whole model on cuda:0: the same router inputs
    (float32; the same kernels, so equal to rounding)."""
    from transformers import AutoTokenizer

    device = torch.device("cuda", 0)
    src = build_tiny_sources(tmp_path / "src", family="olmoe", layers=3)
    cfg = load_config(write_config(tmp_path, src, block_size=1))
    merge_experts.run(cfg, cfg.run_dir)
    merged = layout.merged_dir(cfg.run_dir)
    fam = layout.family(cfg)
    whole = load_causal_lm(merged, device, dtype=torch.float32)
    om = OnloadedModel(merged, device, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(merged))
    seqs = tokenize_task(cfg.calibration_for(cfg.task_names[0]), cfg.calibration, tok)
    layers = list(range(om.num_layers))
    with RouterInputRecorder({l: fam.router_module(whole, l) for l in layers}) as rec:
        for idx in batches(len(seqs), cfg.calibration.batch_size):
            ids, lengths = pad_batch([torch.tensor(seqs[i]) for i in idx])
            with torch.no_grad():
                whole(input_ids=ids.to(device))
            ref = {l: unpad(rec.pop(l).reshape(ids.shape[0], ids.shape[1], -1), lengths) for l in layers}
            hidden = om.embed(ids)
            for l in layers:
                om.onload(l)
                residual = om.run_attention_half(l, hidden)
                x = fam.router_input_norm(om.layer(l))(residual)
                assert x.device.type == "cuda"
                assert rel(unpad(x, lengths), ref[l]) < 1e-5, l
                hidden = om.run_moe_half(l, residual)
                om.offload(l)
    om.close()


def _problem(device, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    k, d = 8, 64
    xs = [torch.randn(3000, d, generator=g) * 0.5, torch.randn(2000, d, generator=g) * 0.5 + 0.1]
    sources = [torch.randn(k, d, generator=g, dtype=torch.float64) for _ in xs]
    init = 0.5 * (sources[0] + sources[1])
    return [x.to(device) for x in xs], [s.to(device, dtype) for s in sources], init.to(device, dtype)


@pytest.mark.parametrize("inner", [None, torch.bfloat16])
def test_resident_solve_on_the_gpu_equals_the_cpu_answer(inner):
    from harc_hpc.math import solve_router

    kw = dict(alpha=0.9, tol=1e-8, max_iter=1000, preconditioner="expert-block", compute_dtype=torch.float64)
    cpu = solve_router(*_problem(torch.device("cpu")), **kw)
    gpu = solve_router(*_problem(torch.device("cuda", 0)), inner_dtype=inner, **kw)
    assert cpu.converged and gpu.converged
    assert gpu.weight.device.type == "cuda"
    assert rel(gpu.weight, cpu.weight) < 1e-6


def test_statistics_on_the_gpu_equal_the_cpu_ones():
    from harc_hpc.math import compute_task_statistics

    xs, sources, init = _problem(torch.device("cpu"))
    cpu = compute_task_statistics(xs[0], sources[0], init, top_k=2)
    gpu = compute_task_statistics(xs[0], sources[0], init, top_k=2, device=torch.device("cuda", 0))
    assert gpu.sigma_w.device.type == "cuda"
    assert rel(gpu.sigma_w, cpu.sigma_w) < 1e-10 and rel(gpu.sigma_diag, cpu.sigma_diag) < 1e-10
    assert abs(gpu.kl - cpu.kl) < 1e-10 * max(1.0, abs(cpu.kl))
    assert torch.equal(gpu.expert_tokens, cpu.expert_tokens)


def test_one_rank_nccl_group_on_the_ranks_gpu(monkeypatch):
    import torch.distributed as dist

    from harc_hpc.devices import init_rank_process_group
    from harc_hpc.math.distributed import ProcessGroupReducer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    placement = init_rank_process_group("auto", "auto", timeout=datetime.timedelta(seconds=60))
    try:
        assert placement.backend == "nccl" and placement.device == torch.device("cuda", 0)
        assert torch.cuda.current_device() == 0
        t = ProcessGroupReducer().sum(torch.tensor([2.0], dtype=torch.float64))  # a CPU tensor, via the GPU
        assert float(t[0]) == 2.0
        on_device = torch.ones(4, device="cuda")
        dist.all_reduce(on_device)
        assert float(on_device.sum()) == 4.0
    finally:
        dist.destroy_process_group()
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != ""  # the gpu marker leaves the GPUs visible


def test_mxfp4_dequantized_on_the_gpu_has_the_cpus_bits():
    from harc_hpc.io.checkpoint import dequantize_mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 134, (3, 8, 2), generator=g, dtype=torch.uint8)
    cpu = dequantize_mxfp4(blocks, scales)
    gpu = dequantize_mxfp4(blocks.cuda(), scales.cuda())
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
