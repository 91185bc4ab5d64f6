"""MergeME / BTX: Mixture-of-Experts models built from dense fine-tuned experts (issue 15).

``build_moe(MoEBuildSpec(...))`` writes one MoE checkpoint (Mixtral from Llama/Mistral, Qwen3-MoE
from Qwen3, Qwen2-MoE from Qwen2) whose experts are the dense models' FFNs and whose other tensors
are merged with a harc-hpc merge method; see docs/mergeme.md.
"""

from harc_hpc.mergeme.build import RECORD, BuildPlan, build_moe, plan_build
from harc_hpc.mergeme.spec import ExpertSpec, MoEBuildSpec, NonFfnMergeSpec, RouterSpec, load_spec, parse_spec

__all__ = ["RECORD", "BuildPlan", "ExpertSpec", "MoEBuildSpec", "NonFfnMergeSpec", "RouterSpec",
           "build_moe", "load_spec", "parse_spec", "plan_build"]
