"""MergeME / BTX: Mixture-of-Experts models built from dense fine-tuned experts (issue 15).

``build_moe(MoEBuildSpec(...))`` writes one MoE checkpoint (Mixtral from Llama/Mistral, Qwen3-MoE
from Qwen3, Qwen2-MoE from Qwen2) whose experts are the dense models' FFNs and whose other tensors
are merged with a harc-hpc merge method; see docs/mergeme.md.

``build_hetero_moe(HeteroMoESpec(...))`` joins dense experts of different widths and depths (one
tokenizer) with projectors and a sequence-level router (MergeME §3.2, ``HeteroMoE``) and fine-tunes
the projectors and router on calibration data.
"""

from harc_hpc.mergeme.build import RECORD, BuildPlan, build_moe, plan_build
from harc_hpc.mergeme.hetero_build import build_hetero_moe, plan_hetero
from harc_hpc.mergeme.hetero_spec import HeteroMoESpec, load_hetero_spec, parse_hetero_spec
from harc_hpc.mergeme.heterogeneous import HeteroMoE
from harc_hpc.mergeme.spec import ExpertSpec, MoEBuildSpec, NonFfnMergeSpec, RouterSpec, load_spec, parse_spec

__all__ = ["RECORD", "BuildPlan", "ExpertSpec", "HeteroMoE", "HeteroMoESpec", "MoEBuildSpec",
           "NonFfnMergeSpec", "RouterSpec", "build_hetero_moe", "build_moe", "load_hetero_spec",
           "load_spec", "parse_hetero_spec", "parse_spec", "plan_build", "plan_hetero"]
