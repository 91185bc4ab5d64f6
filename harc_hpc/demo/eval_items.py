"""Held-out task items for the demo's domains, scored by lm-eval as greedy exact match.

Each item is a prompt cut from a sample of the demo corpus (harc_hpc.demo.corpus) and the answer
that the sample's own rule determines: the sum after ``23+45=``, the ``x`` of ``Solve x+4=9. x=``,
the name a function body must return. A model that has learnt the domain completes them; one whose
routing is broken loses them. The items are generated from fixed seeds that no demo build uses for
training (those are "<seed>/pretrain" and "<seed>/finetune/<domain>") and shipped as JSONL in harc_hpc/eval_tasks/, so an
evaluation needs no download; ``tests/test_lm_eval.py`` checks the shipped files equal this code's
output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from harc_hpc.demo.corpus import _FUNCS, _IDENTS, _NAMES, _THINGS

#: name of the lm-eval task -> (item generator, number of items, seed)
ITEMS_PER_TASK = 200


def math_item(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    a, b = rng.randint(0, 99), rng.randint(1, 99)
    if kind == 0:
        return {"prompt": f"{a}+{b}=", "answer": str(a + b)}
    if kind == 1:
        return {"prompt": f"{a}-{b}=", "answer": str(a - b)}
    if kind == 2:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return {"prompt": f"{a}*{b}=", "answer": str(a * b)}
    if kind == 3:
        return {"prompt": f"Solve x+{a}={a + b}. x=", "answer": str(b)}
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    return {"prompt": f"{name} has {a} {thing} and gets {b} more. Now {name} has ", "answer": str(a + b)}


def code_item(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    f = rng.choice(_FUNCS)
    v, w = rng.sample(_IDENTS, 2)
    n = rng.randint(1, 20)
    if kind == 0:
        return {"prompt": f"def {f}({v}, {w}):\n    return {v} + ", "answer": w}
    if kind == 1:
        return {"prompt": f"for i in range({n}):\n    {v} = {v} * i\n    print(", "answer": f"{v})"}
    if kind == 2:
        return {"prompt": f"if {v} > {n}:\n    {w} = {v} - ", "answer": str(n)}
    if kind == 3:
        return {"prompt": f"while {v} < {n}:\n    {v} += ", "answer": "1"}
    return {"prompt": f"def {f}(self, {v}):\n    self.{w} = ", "answer": v}


GENERATORS = {"harc_demo_math": (math_item, "eval/math"), "harc_demo_code": (code_item, "eval/code")}


def items(task: str, count: int = ITEMS_PER_TASK) -> list[dict]:
    make, seed = GENERATORS[task]
    rng = random.Random(seed)
    return [make(rng) for _ in range(count)]


def write_items(directory: Path) -> list[Path]:
    """Write ``<task>.jsonl`` for every demo task into ``directory`` (what the package ships)."""
    out = []
    for task in sorted(GENERATORS):
        path = Path(directory) / f"{task}.jsonl"
        path.write_text("".join(json.dumps(it, sort_keys=True) + "\n" for it in items(task)))
        out.append(path)
    return out


if __name__ == "__main__":  # python -m harc_hpc.demo.eval_items: regenerate the shipped files
    import harc_hpc.eval_tasks as _tasks

    for p in write_items(Path(_tasks.__file__).parent):
        print(p)
