"""PiLoRA: parameter-importance-aware low-rank adaptation.

Stage 1 (:mod:`pilora.importance`) trains a plain LoRA briefly and accumulates per-row
importance from the LoRA gradients; a partition (:mod:`pilora.partition`) turns it into
dominant-row masks; stage 2 (:mod:`pilora.layer`) trains rank-r adapters on dominant rows and
rank-r' adapters on the rest. :func:`prepare_model` builds any method's model to train.
"""

from .export import export_lora
from .importance import ImportanceAccumulator, ImportanceStats, ModuleStats, approx_full_grad, row_scores
from .layer import RowPartitionedB, load_adapter, pilora_masks, save_adapter, to_pilora
from .methods import INITS, METHODS, MethodConfig, lora_config, prepare_model
from .params import ParamCount, count_parameters
from .partition import PARTITIONS, dominant_fractions, partition

__all__ = [
    "ImportanceAccumulator",
    "ImportanceStats",
    "ModuleStats",
    "approx_full_grad",
    "row_scores",
    "RowPartitionedB",
    "export_lora",
    "load_adapter",
    "pilora_masks",
    "save_adapter",
    "to_pilora",
    "INITS",
    "METHODS",
    "MethodConfig",
    "lora_config",
    "prepare_model",
    "ParamCount",
    "count_parameters",
    "PARTITIONS",
    "dominant_fractions",
    "partition",
]
