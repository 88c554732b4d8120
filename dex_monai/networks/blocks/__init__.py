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
from dex_monai.networks.blocks.dex_transformer import MLP_TYPES, DEXTransformerBlock, expert_schedule, top_k_schedule
from dex_monai.networks.blocks.m4oe_layer import M4OE_GATES, M4OE_STAGES, M4oEHostMixin, ModalityExpertLayer
from dex_monai.networks.blocks.composed_tokens import IGNORE_INDEX, ComposedTargets, ComposedVocabulary
