"""lm-eval task definitions shipped with harc-hpc (YAML + JSONL, no downloads).

``TASK_DIR`` is passed to lm-eval's TaskManager as ``include_path`` by the report stage, so these
tasks are available by name next to lm-eval's own (gsm8k, ...). The demo's tasks score greedy
exact match on held-out items of its math-like and code-like domains (harc_hpc.demo.eval_items).
"""

from __future__ import annotations

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent

#: the tasks defined here, and the demo source each one measures (its domain)
LOCAL_TASKS = {"harc_demo_math": "math", "harc_demo_code": "code"}
