"""H³Fusion: fuse aligned dense LMs into a Mixtral-format MoE and fine-tune it with the gating loss.

    fuse(experts, base=None, top_k=2, router_init="zeros"|"hidden"|"random", attention="base"|"mean")
    H3FusionLoss, H3FusionTrainer, train_fusion, freeze_for_fusion, router_accuracy, drift_reg
    data: read_jsonl, encode_records, collate, char_tokenizer; tiny: tiny Llama models and synthetic tasks.

Needs the `hf` extra (transformers, peft, tqdm).
"""
from .data import DataError, char_tokenizer, collate, encode_records, read_jsonl
from .fuse import FusionError, fuse, load_dense
from .train import (
    H3FusionLoss,
    H3FusionTrainer,
    drift_reg,
    expert_params,
    freeze_for_fusion,
    router_accuracy,
    train_fusion,
    use_h3moe_experts,
)

__all__ = [
    "DataError",
    "FusionError",
    "H3FusionLoss",
    "H3FusionTrainer",
    "char_tokenizer",
    "collate",
    "drift_reg",
    "encode_records",
    "expert_params",
    "freeze_for_fusion",
    "fuse",
    "load_dense",
    "read_jsonl",
    "router_accuracy",
    "train_fusion",
    "use_h3moe_experts",
]
