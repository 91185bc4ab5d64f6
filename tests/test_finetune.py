"""finetune (docs/training.md): the SFT step against a plain training loop, what each
``finetune.params`` trains, two gloo ranks against one process, checkpoints (a task killed with
SIGKILL and resubmitted ends with the same bytes; another digest's checkpoint is not resumed; a NaN
loss names its step and keeps the last good checkpoint), bad input, and the plan."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harc_hpc.config import ConfigError, load_config, parse_config
from harc_hpc.errors import InputDataError
from harc_hpc.stages import finetune as ft

TESTS = Path(__file__).resolve().parent


def _cfg(**finetune):
    return parse_config({"models": {"sources": [{"name": "a", "path": "x"}]},
                         "finetune": {"enabled": True, "warmup_steps": 0, "schedule": "constant", "grad_clip": None,
                                      **finetune}})


def _model(seed=0):
    from transformers import AutoModelForCausalLM

    from pipeline_fixtures import tiny_config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("olmoe", layers=2)).float().eval()


def _data(n=6, seed=1) -> ft.Sequences:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, 128, (int(torch.randint(8, 20, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return ft.Sequences(ids, [[True] * len(s) for s in ids])


def _family(model):
    from harc_hpc.models.families import family_for_config

    return family_for_config(model.config.to_dict())


def test_the_sft_step_equals_a_plain_training_loop():
    """Three full-batch steps: the same losses and weights as AdamW on the model's own loss
    (labels, mean over real tokens), written the plain way."""
    data = _data()
    cfg = _cfg(steps=3, batch_size=len(data.ids), lr=1e-3, weight_decay=0.01)
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    result = ft.train(cfg, model, names, data, torch.device("cpu"), where="test")

    plain = _model()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.01)
    width = max(map(len, data.ids))
    ids = torch.zeros(len(data.ids), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(data.ids):
        ids[i, : len(s)], att[i, : len(s)], labels[i, : len(s)] = torch.tensor(s), 1, torch.tensor(s)
    plain.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        out = plain(input_ids=ids, attention_mask=att, labels=labels)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert [v for _, v in result["losses"]] == pytest.approx(losses, rel=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), n
    assert not torch.equal(dict(model.named_parameters())["model.embed_tokens.weight"],
                           dict(_model().named_parameters())["model.embed_tokens.weight"])


@pytest.mark.parametrize("params", ["routers", "experts", "non-expert"])
def test_params_selects_what_trains(params):
    model = _model()
    fam = _family(model)
    names = ft.trainable_names(model, fam, [0, 1], params)
    routers = {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}
    experts = {n for n, _ in model.named_parameters() if ".experts." in n}
    assert experts and routers <= {n for n, _ in model.named_parameters()}
    want = {"routers": routers, "experts": experts,
            "non-expert": {n for n, _ in model.named_parameters()} - experts}[params]
    assert set(names) == want
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ft.train(_cfg(steps=1, batch_size=6, lr=1e-2), model, names, _data(), torch.device("cpu"), where="test")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == want
    assert ft.trainable_names(model, fam, [], "routers") == []  # no MoE layer: nothing to select


def test_schedule_and_batches():
    fc = _cfg(steps=10, warmup_steps=4, schedule="linear", lr=1.0).finetune
    assert [ft.lr_at(s, fc) for s in (1, 4, 5, 10)] == pytest.approx([0.25, 1.0, 1.0, 1 / 6])
    epoch = [i for s in (1, 2, 3) for i in ft.batch_indices(7, 2, s, seed=3)]
    assert len(set(epoch)) == 6  # one epoch: distinct sequences, the remainder dropped
    assert ft.batch_indices(7, 2, 5, seed=3) == ft.batch_indices(7, 2, 5, seed=3)


def test_another_digests_checkpoint_is_not_resumed_and_a_nan_keeps_the_last_good_one(tmp_path):
    data = _data()
    cfg = _cfg(steps=4, batch_size=3, lr=1e-3, checkpoint_every=2)
    ck = tmp_path / "ck"
    first = ft.train(cfg, _model(), [n for n, _ in _model().named_parameters()], data, torch.device("cpu"),
                     where="test", checkpoint=ck, digest="aaa")
    assert json.loads((ck / "manifest.json").read_text())["step"] == 4
    again = ft.train(cfg, _model(), [n for n, _ in _model().named_parameters()], data, torch.device("cpu"),
                     where="test", checkpoint=ck, digest="aaa")
    assert again["resumed_after_step"] == 4 and again["losses"] == first["losses"]
    other = ft.train(cfg, _model(), [n for n, _ in _model().named_parameters()], data, torch.device("cpu"),
                     where="test", checkpoint=ck, digest="bbb")
    assert other["resumed_after_step"] == 0 and "digest aaa" in other["discarded_checkpoint"]
    # a learning rate that blows the weights up: the step is named and the last good checkpoint stays
    ck2 = tmp_path / "ck2"
    with pytest.raises(InputDataError, match=r"at step \d+; the last good checkpoint \(step \d+\) stays"):
        ft.train(_cfg(steps=20, batch_size=3, lr=1e30, checkpoint_every=1), _model(),
                 [n for n, _ in _model().named_parameters()], data, torch.device("cpu"), where="test",
                 checkpoint=ck2, digest="c")
    state = json.loads((ck2 / "manifest.json").read_text())
    assert (ck2 / state["state"]).is_file() and all(v == v for _, v in state["losses"])


def _ranked_run(**over) -> tuple:
    """The settings, data and teachers of the two-rank runs (teachers: objective output_kl)."""
    data = _data()
    data.tasks = ["a", "b"] * 3
    settings = {"steps": 3, "batch_size": 5, "lr": 1e-3, "grad_clip": 0.5, **over}
    teachers = {"a": _model(1), "b": _model(2)} if settings.get("objective") == "output_kl" else None
    return settings, data, teachers


def _rank(rank: int, world: int, init: str, out: str, over: dict) -> None:
    """One rank: 2 steps checkpointed (as a task killed after step 2 leaves them), then the task run
    again to step 3, resuming; like the runner, only rank 0 knows the task's digest. Sharded, the
    model is gathered and written as the stage writes it."""
    import torch.distributed as dist

    sys.path.insert(0, str(TESTS))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ck, digest = Path(out).parent / "ck", ("d" if rank == 0 else None)
        settings, data, teachers = _ranked_run(**over)
        for steps in (2, 3):
            model = _model()
            result = ft.train(_cfg(**{**settings, "steps": steps, "checkpoint_every": 1}), model,
                              ft.trainable_names(model, _family(model), [0, 1], settings.get("params", "all")),
                              data, torch.device("cpu"), where="test", process_group=dist.group.WORLD,
                              checkpoint=ck, digest=digest, teachers=teachers)
        assert result["resumed_after_step"] == 2, result
        state = ft.full_state_dict(model)  # every rank: gathered when sharded
        if rank == 0:
            if over.get("sharding") == "fsdp":
                ft.save_model(model, Path(out).parent / "model", "1GB", state)
            torch.save({"state": state, "losses": result["losses"]}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("over", [{}, {"sharding": "fsdp"},
                                  {"sharding": "fsdp", "objective": "output_kl", "params": "routers", "batch_size": 3}],
                         ids=["ddp", "fsdp", "fsdp-output-kl"])
def test_two_gloo_ranks_resumed_equal_one_process(tmp_path, over):
    """Data-parallel (the whole model on each rank) and FSDP (sharded over the two), batches of 5
    sequences split 3 + 2 (output_kl: 3 split 2 + 1, so a rank's share lacks a task some steps and
    runs an empty one): the losses and weights of one process on the whole batches, after a resume;
    FSDP's written model holds them."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    out = tmp_path / "two.pt"
    # forked, not spawned: the ranks start with this process's imports (seconds instead of tens)
    mp.start_processes(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out), over), nprocs=2,
                       join=True, start_method="fork")
    torch.set_num_threads(1)
    model = _model()
    settings, data, teachers = _ranked_run(**{k: v for k, v in over.items() if k != "sharding"})
    one = ft.train(_cfg(**settings), model, ft.trainable_names(model, _family(model), [0, 1],
                                                                settings.get("params", "all")),
                   data, torch.device("cpu"), where="test", teachers=teachers)
    two = torch.load(out)
    assert [s for s, _ in two["losses"]] == [1, 2, 3]
    assert [v for _, v in two["losses"]] == pytest.approx([v for _, v in one["losses"]], rel=1e-5)
    for n, p in model.state_dict().items():
        assert torch.allclose(p, two["state"][n], rtol=1e-5, atol=1e-6), n
    assert not torch.equal(two["state"]["model.layers.0.mlp.gate.weight"], _model().model.layers[0].mlp.gate.weight)
    if over.get("sharding") == "fsdp":
        written = AutoModelForCausalLM.from_pretrained(tmp_path / "model").float()
        for n, p in written.state_dict().items():
            assert torch.equal(p, two["state"][n]), n


# -- the stage in a pipeline ----------------------------------------------------------------------------

KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from harc_hpc.stages import finetune as ft
save = ft._save_checkpoint
def save_then_die(path, digest, step, *args, **kwargs):
    save(path, digest, step, *args, **kwargs)
    if path.name == "finetune-harc" and step == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # killed right after the checkpoint of step 2 of the second start
ft._save_checkpoint = save_then_die
from pipeline_fixtures import submit_debug
submit_debug(Path({config!r}))
"""


def _model_bytes(run_dir: Path) -> dict:
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run_dir / "finetune" / "models").glob("*/*.safetensors"))}


def test_a_killed_finetune_resumes_to_the_same_bytes(tmp_path):
    from pipeline_fixtures import build_tiny_sources, submit_debug, write_config
    from transformers import AutoModelForCausalLM

    sources = build_tiny_sources(tmp_path / "src", layers=2)
    config = write_config(tmp_path, sources, name="run", executor="debug",
                          extra={"finetune.enabled": True, "finetune.steps": 4, "finetune.batch_size": 4,
                                 "finetune.checkpoint_every": 2, "finetune.warmup_steps": 2, "finetune.lr": 1e-3,
                                 "finetune.params": "non-expert"})
    run_dir = tmp_path / "runs" / "run"
    child = subprocess.run([sys.executable, "-c", KILLER.format(tests=str(TESTS), config=str(config))],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr[-3000:]
    assert not (run_dir / "finetune" / "models").exists()
    assert json.loads((ft.partial_dir(run_dir, "harc") / "manifest.json").read_text())["step"] == 2
    assert json.loads((ft.partial_dir(run_dir, "merged") / "manifest.json").read_text())["step"] == 4
    lines: list = []
    submit_debug(config, lines)
    resumed = _model_bytes(run_dir)
    log = (run_dir / "logs" / "finetune" / "all.log").read_text()
    assert "start harc: resuming after step 2" in log and "start merged: resuming after step 4" in log
    summary = json.loads((ft.models_dir(run_dir) / "summary.json").read_text())
    assert [s for s, _ in summary["starts"]["harc"]["losses"]] == list(range(1, 5))
    assert not ft.partial_dir(run_dir, "harc").exists()
    # the same task run through uninterrupted
    shutil.rmtree(run_dir / "finetune")
    submit_debug(config, lines)
    assert _model_bytes(run_dir) == resumed and len(resumed) == 2
    # normal model directories, trained: the experts as they were, the rest moved
    tuned = AutoModelForCausalLM.from_pretrained(ft.models_dir(run_dir) / "harc")
    harc = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    t, h = dict(tuned.named_parameters()), dict(harc.named_parameters())
    assert all(torch.equal(t[n], h[n]) for n in t if ".experts." in n)
    assert not torch.equal(t["model.layers.0.mlp.gate.weight"], h["model.layers.0.mlp.gate.weight"])
    # the report evaluates both models beside HARC's and puts the SFT's cost beside HARC's
    from harc_hpc.report.render import _training
    from harc_hpc.report.training import training_models, training_summary

    cfg = load_config(config)
    assert [n for n, _ in training_models(cfg, run_dir)] == ["sft", "harc+sft"]
    summary = training_summary(cfg, run_dir, {"compute-statistics": {"wall_s_total": 1.0}})
    assert summary["finetune"]["starts"]["harc"]["steps"] == 4
    assert summary["finetune"]["starts"]["harc"]["seconds"] >= summary["harc"]["seconds"] >= 1.0
    text = "\n".join(_training({"tasks": cfg.task_names, "training": summary}))
    assert "SFT (finetune): AdamW on non-expert parameters" in text and "| merged + HARC + SFT |" in text
    # too little data for one batch: an error naming the key, nothing written
    before = _model_bytes(run_dir)
    with pytest.raises(InputDataError, match="finetune.batch_size"):
        ft.run(load_config(config, overrides={"finetune.batch_size": 1000}), run_dir)
    assert _model_bytes(run_dir) == before
    # what the stage reads of the config is in its digest (as tests/test_stage_specs.py checks the others)
    from test_stage_specs import NOT_RESULT_KEYS, _covers, _ModelProxy, _norm, _Reads, _upstream

    from harc_hpc.pipeline import load_specs

    # (with the end-to-end objective, which also reads the sources: router-only output-KL distillation)
    cfg = load_config(config, overrides={"finetune.steps": 2, "finetune.starts": ["merged"],
                                         "finetune.objective": "output_kl", "finetune.params": "routers"})
    specs, reads = load_specs(), _Reads()
    ft.run(_ModelProxy(cfg, "", reads), run_dir)
    summary = json.loads((ft.models_dir(run_dir) / "summary.json").read_text())["starts"]["merged"]
    assert summary["model"] == "output-kl" and summary["objective"] == "output_kl"
    assert [step for step, _ in summary["losses"]] == [1, 2] and all(v > 0 for _, v in summary["losses"])
    tasks = set(cfg.task_names)
    keys = {_norm(k, tasks) for k in reads.keys}
    own = [_norm(s, tasks) for s in specs["finetune"].config_sections]
    inherited = [_norm(s, tasks) for up in _upstream(specs, "finetune") for s in specs[up].config_sections]
    assert not [k for k in keys if not any(_covers(s, k) for s in own + inherited)
                and not any(_covers(x, k) for x in NOT_RESULT_KEYS)]
    assert not [s for s in own if not any(_covers(s, k) or _covers(k, s) for k in keys)]


def test_config_errors_and_the_plan(tmp_path):
    from conftest import write_toy_config

    from harc_hpc.pipeline import build_plan

    path = write_toy_config(tmp_path)
    for key, value in (("finetune.lr", -1), ("finetune.steps", 0), ("finetune.params", "attention"),
                       ("finetune.batch_size", 0), ("finetune.starts", ["merged", "merged"])):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(path, overrides={key: value})
    off = build_plan(load_config(path), layers=[0, 1])
    assert "finetune" not in load_config(path).model_dump(mode="json")
    on = build_plan(load_config(path, overrides={"finetune.enabled": True}), layers=[0, 1])
    assert sorted(set(on.tasks) - set(off.tasks)) == ["finetune/all"]
    assert sorted(t for t in off.tasks if off.tasks[t].digest != on.tasks[t].digest) == ["report/all"]
    assert sorted(on.tasks["finetune/all"].needs) == ["assemble-model/all", "merge-experts/all"]
    assert on.specs["finetune"].distributed


def test_plan_estimates_the_training_stages(tmp_path):
    """harc-hpc plan sizes the training stages (OLMoE's shape): finetune holds the model, its
    gradients and AdamW's moments (more than the model itself), less with routers only, with
    gradient checkpointing or sharded (fsdp); router-distill holds one layer's inputs like the solve."""
    from conftest import write_toy_config

    from harc_hpc.pipeline import build_plan
    from harc_hpc.stages.estimate import estimate

    shape = TESTS.parent / "configs" / "model-shapes" / "olmoe-1b-7b.json"
    conf = json.loads(shape.read_text())
    model = tmp_path / "olmoe"  # its config.json is all a plan reads of a model
    model.mkdir()
    shutil.copyfile(shape, model / "config.json")

    def sizes(ranks=1, **over):
        cfg = load_config(write_toy_config(tmp_path), overrides={
            "router_distill.enabled": True, "finetune.enabled": True, "models.sources.a.path": str(model),
            "models.sources.b.path": str(model), **over})
        plan = build_plan(cfg, layers=[0, 1])
        res = {s: {"mem_bytes": 2**40, "gpus": 1, "gpu_bytes": 80 * 2**30, "ranks": ranks} for s in plan.specs}
        return {e.stage: e for e in estimate(cfg, plan, res, conf)}

    base = sizes()
    params = 6.9e9  # OLMoE-1B-7B
    assert base["finetune"].gpu_bytes > params * (2 + 2 + 8)  # bf16 weights and gradients, float32 moments
    # routers only: no gradients or moments of the bulk (10 of its 12 bytes a parameter)
    assert sizes(**{"finetune.params": "routers"})["finetune"].gpu_bytes < base["finetune"].gpu_bytes - 9 * params
    assert sizes(**{"finetune.gradient_checkpointing": True})["finetune"].gpu_bytes < base["finetune"].gpu_bytes
    # fsdp over 8 ranks: a share of float32 masters, gradients and moments, the whole model on the host
    sharded = sizes(8, **{"finetune.sharding": "fsdp"})["finetune"]
    assert sharded.gpu_bytes < base["finetune"].gpu_bytes / 4 and sharded.host_bytes > params * 4
    assert 0 < base["router-distill"].gpu_bytes < base["solve-router"].gpu_bytes * 4
    assert base["router-distill-model"].scratch_bytes == 2 * base["assemble-model"].scratch_bytes


def test_the_output_kl_objective_distils_each_source_on_its_own_task():
    """objective output_kl: the step's loss is KL(source || model) over the selected next-token
    distributions (plain kl_div), zero with zero gradients when the model is the source, and with
    params routers only the routers move, towards the sources."""
    data = _data(6)
    data.tasks = ["a", "b"] * 3
    model, a, b = _model(0), _model(1), _model(2)
    ids, att, tgt = ft._pad(data.ids[:2], data.masks[:2], "cpu")
    got = ft.step_output_kl(model, a, data.ids[:2], data.masks[:2], 10, "cpu")
    ref = torch.log_softmax(a(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
    log_q = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
    plain = torch.nn.functional.kl_div(log_q, ref, log_target=True, reduction="none").sum(-1)
    assert float(got) == pytest.approx(float((plain * tgt).sum() / 10), rel=1e-5)
    same = ft.step_output_kl(a, a, data.ids[:2], data.masks[:2], 10, "cpu")
    same.backward()
    # zero up to the rounding of sum(p) = 1 in the softmax's backward
    assert float(same) == 0.0 and all(p.grad is None or float(p.grad.abs().max()) < 1e-6 for p in a.parameters())

    cfg = _cfg(steps=8, batch_size=6, lr=3e-2, objective="output_kl")
    names = ft.trainable_names(model, _family(model), [0, 1], "routers")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def total_kl(m):
        with torch.no_grad():
            return sum(float(ft.step_output_kl(m, {"a": a, "b": b}[t], [s], [k], 1, "cpu"))
                       for s, k, t in zip(data.ids, data.masks, data.tasks))

    start = total_kl(model)
    result = ft.train(cfg, model, names, data, torch.device("cpu"), where="test", teachers={"a": a, "b": b})
    assert total_kl(model) < start
    assert result["losses"][-1][1] < result["losses"][0][1]
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == set(names)


def test_gradient_checkpointing_takes_the_same_steps(monkeypatch):
    """Activations recomputed in the backward pass: the same losses and weights (to rounding)."""
    data = _data()
    runs, seen = [], []
    forward = ft.step_loss

    def spy(model, *args):
        seen.append(model.is_activation_checkpointing)
        return forward(model, *args)

    monkeypatch.setattr(ft, "step_loss", spy)
    for gc in (False, True):
        model = _model()
        result = ft.train(_cfg(steps=2, batch_size=3, lr=1e-3, gradient_checkpointing=gc), model,
                          [n for n, _ in model.named_parameters()], data, torch.device("cpu"), where="test")
        assert not model.is_activation_checkpointing  # switched off again after training
        runs.append((result["losses"], dict(model.named_parameters())))
    assert seen == [False, False, True, True]  # it was on while the second run trained
    assert [v for _, v in runs[0][0]] == pytest.approx([v for _, v in runs[1][0]], rel=1e-6)
    for n, p in runs[0][1].items():
        assert torch.allclose(p, runs[1][1][n], rtol=1e-5, atol=1e-7), n


def test_table7_in_the_shipped_sweep_and_a_row_per_repair_in_its_table(tmp_path, monkeypatch):
    """configs/sweep-table1.yaml's last cell is Table 7 (WUDI with finetune, fsdp, and router-distill;
    no other cell trains), and the sweep table gives each training baseline a row with its routing KL
    and wall time."""
    from harc_hpc.pipeline import sweep as sweep_mod
    from harc_hpc.report import sweep_table

    table1 = sweep_mod.load_sweep(TESTS.parent / "configs" / "sweep-table1.yaml")
    sweep_mod.validate(table1)
    cfgs = [sweep_mod.cell_config(table1, c.values, c.name) for c in table1.cells]
    t7 = cfgs[-1]
    assert t7.merge.method == "wudi" and t7.finetune.enabled and t7.router_distill.enabled
    assert t7.finetune.sharding == "fsdp" and t7.executor.stages["finetune"].tasks_per_node == 4
    assert not any(c.finetune.enabled or c.router_distill.enabled for c in cfgs[:-1])

    models = ["merged", "calibrated", "router-distill", "harc+router-distill", "sft", "harc+sft"]
    metrics = {"tasks": ["math"], "loss": {"math": {n: 1.0 - i / 10 for i, n in enumerate(models)}},
               "summary": {"loss_mean": {n: 1.0 - i / 10 for i, n in enumerate(models)},
                           "router_level": {n: {"kl_mean": i / 100, "topk_mismatch_mean": 0.1} for i, n in enumerate(models)}},
               "training": {"harc": {"seconds": 10.0},
                            "router_distill": {"merged": {"model": "router-distill", "seconds": 4.0},
                                               "harc": {"model": "harc+router-distill", "seconds": 12.0}},
                            "finetune": {"starts": {"merged": {"model": "sft", "seconds": 20.0},
                                                    "harc": {"model": "harc+sft", "seconds": 30.0}}}}}
    run = tmp_path / "cells" / "t7"
    (run / "report").mkdir(parents=True)
    (run / "report" / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setattr(sweep_mod, "sweep_status", lambda d: [])
    monkeypatch.setattr(sweep_mod, "cell_dirs", lambda d: [("t7", {"merge.method": "wudi"}, run)])
    columns, rows = sweep_table.sweep_rows(tmp_path)
    assert [r["repair"] for r in rows] == ["none", "harc", "router-distill", "harc+router-distill", "sft", "harc+sft"]
    assert [r["router_kl"] for r in rows] == [0.0, 0.01, 0.02, 0.03, 0.04, 0.05]
    assert [r.get("seconds") for r in rows] == [None, 10.0, 4.0, 12.0, 20.0, 30.0] and "seconds" in columns


def test_steps_to_the_other_starts_final_loss():
    """HARC as a starting point, measured: the first step whose trailing-window training loss is at
    or below the other start's final window."""
    from harc_hpc.report.training import steps_to_loss

    harc = [1.0, 0.8, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    merged = [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6]  # window 2: final 0.65
    assert steps_to_loss(harc, merged) == 4  # step 3: (0.8 + 0.6) / 2 > 0.65; step 4: (0.6 + 0.5) / 2
    assert steps_to_loss(merged, harc) is None
    from harc_hpc.report.render import _training

    starts = {"merged": {"model": "sft", "steps_to_other_final_loss": None},
              "harc": {"model": "harc+sft", "steps_to_other_final_loss": 4}}
    text = "\n".join(_training({"tasks": ["a"], "training": {"finetune": {"settings": {"lr": 1e-4}, "starts": starts}}}))
    assert "from HARC's model training reaches the merged start's final loss after 4 steps" in text
    assert "from the merged model HARC's start's final loss never" in text
