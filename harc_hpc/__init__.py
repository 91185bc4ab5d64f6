"""harc-hpc: merge fine-tuned MoE LLMs and recalibrate their routers (HARC) as batch pipelines."""

__version__ = "0.1.0"


def package_versions(names) -> dict:
    """Installed versions of ``names`` (None for one that is not installed), for provenance records."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
