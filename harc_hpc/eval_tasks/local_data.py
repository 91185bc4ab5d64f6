"""The dataset loader the YAML task files name (``custom_dataset: !function local_data.load``):
it reads the JSONL shipped beside them, so the tasks resolve no path relative to the working
directory and download nothing."""

from __future__ import annotations

from pathlib import Path


def load(file: str, **_ignored):
    import datasets

    path = Path(__file__).resolve().parent / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the task's data file is missing from the package")
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})
