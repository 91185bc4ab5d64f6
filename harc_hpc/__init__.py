"""harc-hpc: merge fine-tuned MoE LLMs and recalibrate their routers (HARC) as batch pipelines."""

__version__ = "0.1.0"
