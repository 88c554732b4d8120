from dex_monai.networks.blocks.dex_layer import (
    ALIGNMENT_LOSSES,
    DEX_MODES,
    ROUTING_TYPES,
    DEXLayer,
    NoisyTopKRouter,
    RouterOutput,
    StackedExpertMLP,
    alignment_loss,
)
from dex_monai.networks.blocks.dex_transformer import DEXTransformerBlock, expert_schedule, top_k_schedule
