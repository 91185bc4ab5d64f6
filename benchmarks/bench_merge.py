"""Peak memory and wall time of merge-experts against mergekit on a synthetic OLMoE-shaped model.

    python benchmarks/bench_merge.py bench --layers 1 2 --mergekit /tmp/mk-venv/bin/mergekit-yaml
    python benchmarks/bench_merge.py verify --mergekit /tmp/mk-venv/bin/mergekit-yaml

``bench`` writes a base and two sources (hidden 2048, 64 experts of intermediate 1024, vocabulary
50304, bf16, per-expert hub layout, 1 GB shards) for each layer count, then times each merge in its
own child process and reads that child's peak RSS from ``wait4``. WUDI runs a few Adam steps only;
its 300-step time is extrapolated from the measured per-step cost (stated in the output).
``verify`` merges tiny OLMoE models with both tools and compares every tensor bit for bit.
mergekit must live in a separate virtual environment (it pins its own dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
SHAPE = dict(vocab=50304, hidden=2048, experts=64, intermediate=1024, heads=16)


# -- synthetic checkpoints ---------------------------------------------------------------------

def olmoe_config(layers: int) -> dict:
    from transformers import OlmoeConfig

    cfg = OlmoeConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
                      intermediate_size=SHAPE["intermediate"], num_hidden_layers=layers,
                      num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["heads"],
                      num_experts=SHAPE["experts"], num_experts_per_tok=8, pad_token_id=None,
                      bos_token_id=None, eos_token_id=None, dtype="bfloat16")
    return {**cfg.to_dict(), "architectures": ["OlmoeForCausalLM"]}


def olmoe_tensors(layers: int):
    V, d, E, I = SHAPE["vocab"], SHAPE["hidden"], SHAPE["experts"], SHAPE["intermediate"]
    yield "model.embed_tokens.weight", (V, d)
    for l in range(layers):
        p = f"model.layers.{l}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}.self_attn.{n}.weight", (d, d)
        for n in ("q_norm", "k_norm"):
            yield f"{p}.self_attn.{n}.weight", (d,)
        yield f"{p}.input_layernorm.weight", (d,)
        yield f"{p}.post_attention_layernorm.weight", (d,)
        yield f"{p}.mlp.gate.weight", (E, d)
        for e in range(E):
            yield f"{p}.mlp.experts.{e}.gate_proj.weight", (I, d)
            yield f"{p}.mlp.experts.{e}.up_proj.weight", (I, d)
            yield f"{p}.mlp.experts.{e}.down_proj.weight", (d, I)
    yield "model.norm.weight", (d,)
    yield "lm_head.weight", (V, d)


def build(root: Path, layers: int) -> dict[str, Path]:
    from harc_hpc.io.checkpoint_writer import CheckpointWriter

    dirs = {n: root / n for n in ("base", "a", "b")}
    if all((d / "config.json").is_file() for d in dirs.values()):
        return dirs
    specs = list(olmoe_tensors(layers))
    writers = {}
    for n, d in dirs.items():
        shutil.rmtree(d, ignore_errors=True)
        writers[n] = CheckpointWriter(d, "1GB")
        writers[n].declare([(k, torch.bfloat16, s) for k, s in specs])
    g = torch.Generator().manual_seed(0)
    for k, s in specs:
        base = torch.randn(s, generator=g) * 0.02 if len(s) > 1 else 1 + 0.1 * torch.randn(s, generator=g)
        writers["base"].add(k, base.to(torch.bfloat16))
        for i, n in enumerate(("a", "b")):
            src = base + 0.002 * torch.randn(s, generator=g)
            writers[n].add(k, src.to(torch.bfloat16))
    for n, d in dirs.items():
        writers[n].finalize()
        (d / "config.json").write_text(json.dumps(olmoe_config(layers), indent=2))
    return dirs


# -- one measurement per child process ------------------------------------------------------------

GNU_TIME = "/usr/bin/time"
MAXRSS_TAG = "HARC_BENCH_MAXRSS_KB="


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, CPU time and peak RSS of one child.

    The peak RSS comes from GNU time, which forks the measured command from its own small process:
    a child forked (or vforked) from this benchmark inherits this process's high-water mark at exec
    (Linux keeps the larger of the old and new address spaces' peaks), which after building the
    synthetic checkpoints is over a GB and would be reported as the child's.
    """
    wrapped = os.path.exists(GNU_TIME)
    if wrapped:
        cmd = [GNU_TIME, "-f", MAXRSS_TAG + "%M", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{out[-3000:]}")
    peak_kb = usage.ru_maxrss
    if wrapped:
        tagged = [l for l in out.splitlines() if l.startswith(MAXRSS_TAG)]
        peak_kb = int(tagged[-1][len(MAXRSS_TAG):])
    else:
        print(f"# {GNU_TIME} not found: peak RSS includes this process's RSS at fork time", flush=True)
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(peak_kb / 1024), "log": out}


def ours_cmd(models: dict, out: Path, method: str, params: dict, extra: dict | None = None) -> list[str]:
    spec = json.dumps({"models": {k: str(v) for k, v in models.items()}, "out": str(out),
                       "method": method, "params": params, "extra": extra or {}})
    return ["nice", "-n", "5", sys.executable, str(HERE), "_ours", spec]


def _ours(spec: str) -> None:
    """Child: the merge-experts stage (digests included) on one config."""
    import yaml

    from harc_hpc.config import load_config
    from harc_hpc.stages.merge_experts import run

    s = json.loads(spec)
    out = Path(s["out"])
    cfg = {"run": {"name": out.name, "output_dir": str(out.parent)},
           "models": {"base": s["models"]["base"],
                      "sources": [{"name": "a", "path": s["models"]["a"]},
                                  {"name": "b", "path": s["models"]["b"]}]},
           "merge": {"method": s["method"], "parameters": s["params"], **s["extra"]}}
    cfg_file = out.parent / f"{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    stats = run(load_config(cfg_file), out)
    print(json.dumps(stats))


def mergekit_cmd(mk: str, models: dict, out: Path, method: str, params: dict) -> list[str]:
    import yaml

    weights, density = params.get("weights", [0.5, 0.5]), params.get("density")
    entries = []
    for name, w in zip(("a", "b"), weights):
        p = {"weight": w}
        if density is not None:
            p["density"] = density
        entries.append({"model": str(models[name]), "parameters": p})
    cfg = {"models": entries, "merge_method": method, "parameters": {"normalize": True}}
    if method != "linear":
        cfg["base_model"] = str(models["base"])
    cfg_file = out.parent / f"{out.name}.yml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    return ["nice", "-n", "5", mk, str(cfg_file), str(out)]


def bench(args) -> None:
    root = Path(args.root)
    rows = []
    ties = {"density": 0.6, "weights": [0.4, 0.6]}
    for layers in args.layers:
        t0 = time.perf_counter()
        models = build(root / f"olmoe-L{layers}", layers)
        print(f"# built L={layers} inputs in {time.perf_counter() - t0:.0f} s", flush=True)
        # Each harc-hpc run is followed by mergekit's on the same merge, so that both see
        # about the same load on a shared machine.
        runs = [("linear", "harc-hpc", "linear", {"weights": [0.4, 0.6]}, None)]
        if args.mergekit:
            runs.append(("mk-linear", "mergekit", "linear", {"weights": [0.4, 0.6]}, None))
        runs.append(("ties", "harc-hpc", "ties", {**ties, "granularity": "per_expert"}, None))
        runs.append(("ties-argsort", "harc-hpc", "ties",
                     {**ties, "granularity": "per_expert", "ranking": "mergekit"}, None))
        if args.mergekit:
            runs.append(("mk-ties", "mergekit", "ties", ties, None))
        if layers in args.fused_layers:
            runs.append(("ties-fused", "harc-hpc", "ties", {**ties, "granularity": "fused"}, None))
        for steps in args.wudi_steps:
            runs.append(("wudi", "harc-hpc", "wudi", {"steps": steps}, None))
        wanted = set(args.runs.split(",")) if args.runs else None
        runs = [r[1:] for r in runs if wanted is None or r[0] in wanted]
        for tool, method, params, extra in runs:
            if tool == "harc-hpc" and method == "wudi" and layers not in args.wudi_layers:
                continue
            out = root / "out" / f"{tool}-{method}-L{layers}"
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            if tool == "harc-hpc":
                r = measure(ours_cmd(models, out, method, params, extra))
            else:
                r = measure(mergekit_cmd(args.mergekit, models, out, method, params))
            r.pop("log")
            row = {"layers": layers, "tool": tool, "method": method, "params": params, **r}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    wudi_rows = [r for r in rows if r["method"] == "wudi"]
    if len(wudi_rows) >= 2:
        a, b = sorted(wudi_rows, key=lambda r: r["params"]["steps"])[:2]
        per_step = (b["wall_s"] - a["wall_s"]) / (b["params"]["steps"] - a["params"]["steps"])
        est = a["wall_s"] + (300 - a["params"]["steps"]) * per_step
        print(json.dumps({"wudi_extrapolation": {"layers": a["layers"], "per_step_s": round(per_step, 2),
                                                 "estimated_300_steps_s": round(est)}}))
    largest = SHAPE["vocab"] * SHAPE["hidden"] * 2
    target_mb = (3 * largest + 2**30) / 2**20
    print(json.dumps({"largest_tensor_mb": round(largest / 2**20), "rss_target_mb": round(target_mb)}))
    summarise(rows, target_mb)
    Path(args.json).write_text(json.dumps(rows, indent=2))


def summarise(rows: list, target_mb: float) -> None:
    """Ratios against mergekit on the same merge and layer count, and the memory targets."""
    def key(r):
        extra = [str(r["params"].get(k, "")) for k in ("granularity", "ranking")]
        if "steps" in r["params"]:
            extra.append(f"{r['params']['steps']} steps")
        return (r["method"], " ".join(e for e in extra if e))

    print("\n# summary (ratios: harc-hpc / mergekit, same merge, same inputs)")
    for r in rows:
        if r["tool"] != "harc-hpc":
            continue
        mk = [m for m in rows if m["tool"] == "mergekit" and m["method"] == r["method"] and m["layers"] == r["layers"]
              and r["method"] != "wudi"]
        line = (f"L={r['layers']} {r['method']:6s} {key(r)[1]:20s} wall {r['wall_s']:7.1f} s "
                f"cpu {r['cpu_s']:7.1f} s  peak RSS {r['peak_rss_mb']:6d} MB "
                f"({'within' if r['peak_rss_mb'] <= target_mb else 'ABOVE'} the {target_mb:.0f} MB target)")
        if mk:
            m = mk[0]
            line += (f"  | mergekit wall {m['wall_s']:.1f} s, RSS {m['peak_rss_mb']} MB -> wall x{r['wall_s'] / m['wall_s']:.2f}"
                     f", RSS x{r['peak_rss_mb'] / m['peak_rss_mb']:.2f}")
        print(line)
    by_cfg: dict = {}
    for r in rows:
        if r["tool"] == "harc-hpc":
            by_cfg.setdefault(key(r), []).append(r)
    for cfg, rs in sorted(by_cfg.items()):
        if len(rs) >= 2:
            rs = sorted(rs, key=lambda r: r["layers"])
            growth = ", ".join(f"L={r['layers']} {r['peak_rss_mb']} MB" for r in rs)
            print(f"peak RSS vs layers, {cfg[0]} {cfg[1]}: {growth} "
                  f"(x{rs[-1]['peak_rss_mb'] / rs[0]['peak_rss_mb']:.2f} from L={rs[0]['layers']} to L={rs[-1]['layers']})")


def wudi_micro(args) -> None:
    """Per-matrix WUDI cost (one expert gate (I, d), one down (d, I), one attention (d, d))."""
    from harc_hpc.merge.wudi import wudi_solve

    torch.set_num_threads(args.threads)
    d, I = SHAPE["hidden"], SHAPE["intermediate"]
    res = {}
    for name, shape in (("expert_gate_or_up", (I, d)), ("expert_down", (d, I)), ("attention", (d, d)),
                        ("router", (SHAPE["experts"], d))):
        taus = 0.002 * torch.randn(2, *shape)
        t0 = time.perf_counter()
        wudi_solve(taus, steps=0)
        t_setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        wudi_solve(taus, steps=args.steps)
        t_run = time.perf_counter() - t0
        per_step = max(t_run - t_setup, 0.0) / args.steps
        res[name] = {"per_step_s": round(per_step, 4), "setup_s": round(t_setup, 3),
                     "est_300_s": round(t_run + (300 - args.steps) * per_step, 1)}
    E = SHAPE["experts"]
    layer = (2 * E * res["expert_gate_or_up"]["est_300_s"] + E * res["expert_down"]["est_300_s"]
             + 4 * res["attention"]["est_300_s"] + res["router"]["est_300_s"])
    print(json.dumps({"threads": args.threads, "steps_measured": args.steps, "per_matrix": res,
                      "est_300_steps_per_layer_s": round(layer)}, indent=2))


# -- exactness against mergekit ------------------------------------------------------------------

def verify(args) -> None:
    sys.path.insert(0, str(HERE.parent.parent / "tests"))
    from conftest import save_tiny_moe, tiny_moe_config

    from harc_hpc.io.checkpoint import Checkpoint
    from harc_hpc.models.families import family_for_config
    from harc_hpc.merge import resolve_settings
    from harc_hpc.merge.engine import MergeInput, merge_checkpoints

    root = Path(args.root) / "verify"
    shutil.rmtree(root, ignore_errors=True)
    cfg = tiny_moe_config("olmoe", hidden=64, intermediate=32)
    state = save_tiny_moe(root / "base", cfg, 0)
    save_tiny_moe(root / "a", cfg, 1, state)
    save_tiny_moe(root / "b", cfg, 2, state)
    models = {n: root / n for n in ("base", "a", "b")}
    cases = [("linear", {"weights": [0.3, 0.7]}, "float32"),
             ("linear", {"weights": [0.3, 0.7]}, "bfloat16"),
             ("task_arithmetic", {"weights": [0.3, 0.7], "lambda": 1.5}, "bfloat16"),
             ("ties", {"density": 0.6, "weights": [0.4, 0.6]}, "float32"),
             ("ties", {"density": 0.3, "weights": [0.4, 0.6], "lambda": 0.8}, "bfloat16")]
    for method, params, dtype in cases:
        mk_out, our_out = root / "mk", root / "ours"
        shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(our_out, ignore_errors=True)
        import yaml

        entries = [{"model": str(models[n]), "parameters": {"weight": w, **(
            {"density": params["density"]} if "density" in params else {})}}
            for n, w in zip(("a", "b"), params["weights"])]
        mk_cfg = {"models": entries, "merge_method": method, "dtype": dtype,
                  "parameters": {"normalize": method != "task_arithmetic",
                                 **({"lambda": params["lambda"]} if "lambda" in params else {})}}
        if method != "linear":
            mk_cfg["base_model"] = str(models["base"])
        (root / "mk.yml").write_text(yaml.safe_dump(mk_cfg))
        subprocess.run([args.mergekit, str(root / "mk.yml"), str(mk_out)], check=True,
                       capture_output=True)
        m, p = resolve_settings(method, None, {**params, **({"granularity": "fused"}
                                                           if method == "ties" else {})}, ["a", "b"])
        base = MergeInput("base", Checkpoint(models["base"])) if m.needs_base else None
        merge_checkpoints(our_out, [MergeInput(n, Checkpoint(models[n])) for n in ("a", "b")], base,
                          m, p, dtype=dtype)
        shutil.copy(models["base"] / "config.json", our_out / "config.json")
        mk, ours = Checkpoint(mk_out), Checkpoint(our_out)
        fam = family_for_config(ours.config)
        differ, n = [], 0
        for k in mk.keys():
            want = mk.get_tensor(k)
            e = fam.parse_expert_key(k)
            if e is not None and e.expert is None:  # mergekit writes the fused in-memory names
                projs = ("gate", "up") if e.proj == "gate_up" else ("down",)
                got = torch.stack([torch.cat([ours.get_tensor(fam.expert_key(e.layer, x, pr))
                                              for pr in projs]) for x in range(want.shape[0])])
            else:
                got = ours.get_tensor(k)
            n += 1
            if got.dtype != want.dtype or not torch.equal(got, want):
                differ.append(k)
        print(json.dumps({"method": method, "params": params, "dtype": dtype, "tensors": n,
                          "bit_identical": not differ, "differ": differ[:5]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--root", default="/tmp/harc-bench")
    b.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    b.add_argument("--mergekit", default=None, help="path of mergekit-yaml in its own venv")
    b.add_argument("--wudi-steps", type=int, nargs="*", default=[1, 3])
    b.add_argument("--wudi-layers", type=int, nargs="*", default=[1])
    b.add_argument("--fused-layers", type=int, nargs="*", default=[1])
    b.add_argument("--json", default="/tmp/harc-bench/results.json")
    b.add_argument("--runs", default=None, help="comma-separated subset of linear,mk-linear,ties,ties-argsort,"
                                               "mk-ties,ties-fused,wudi (default: all)")
    w = sub.add_parser("wudi-micro")
    w.add_argument("--steps", type=int, default=5)
    w.add_argument("--threads", type=int, default=1)
    v = sub.add_parser("verify")
    v.add_argument("--root", default="/tmp/harc-bench")
    v.add_argument("--mergekit", required=True)
    o = sub.add_parser("_ours")
    o.add_argument("spec")
    args = ap.parse_args()
    if args.cmd == "bench":
        bench(args)
    elif args.cmd == "wudi-micro":
        wudi_micro(args)
    elif args.cmd == "verify":
        verify(args)
    else:
        _ours(args.spec)


if __name__ == "__main__":
    main()
