"""DEX networks: the DEX layer, the DEX ViT encoder, MAE pre-training and downstream UNETR / classifier."""

from dex_monai.networks.blocks import (
    ALIGNMENT_LOSSES,
    DEX_MODES,
    ROUTING_TYPES,
    DEXLayer,
    DEXTransformerBlock,
    M4OE_GATES,
    M4OE_STAGES,
    MLP_TYPES,
    ModalityExpertLayer,
    NoisyTopKRouter,
    StackedExpertMLP,
    alignment_loss,
    expert_schedule,
    top_k_schedule,
)
from dex_monai.networks.nets import DEXClassifier, DEXMaskedAutoEncoder, DEXUNETR, DEXViT, patchify, unpatchify
from dex_monai.networks.nets import M4oESwinClassifier, M4oESwinUNETR
from dex_monai.networks import convert
from dex_monai.networks.convert import ConversionReport, export_to_monai, load_encoder_weights
from dex_monai.networks.kernel import adapt_patch_kernel
from dex_monai.networks.blocks.dex_transformer import set_layer_norm_eps
from dex_monai.networks.blocks import ComposedTargets, ComposedVocabulary
from dex_monai.networks.nets import UNIMED_TASKS, UniMed, UniMedTaskView
