"""MONAI transforms of DEX, for pre-training and the fine-tuning bundles alike.

Checked loading (:class:`LoadMultiModalImaged`), modality (:class:`DetectModalityd`), per-modality
normalisation (:class:`ModalityNormalized`), channels (:class:`EnsureChannelsd`, with
:class:`EnsureThreeChanneld` / :class:`EnsureSingleChanneld` for pre-training), fine-tuning shapes
(:class:`SqueezeSpatiald`, :class:`PrepareLabeld`, :class:`RestoreSpatialShaped`), writing predictions
(:class:`SavePredictiond`), slicing (:class:`ExtractSliced`, :class:`RandForegroundSliced`),
random resized crop with near-black rejection (:class:`RandResizedCropd`), and the ready-made
pipelines :func:`pretrain_2d_transforms` / :func:`pretrain_3d_transforms`.
"""

from dex_monai.transforms.crop import RandResizedCrop, RandResizedCropd
from dex_monai.transforms.downstream import (
    PrepareLabeld,
    RestoreSpatialShaped,
    SqueezeSpatiald,
    restore_spatial_shape,
)
from dex_monai.transforms.intensity import (
    DEFAULT_NORMALIZATION,
    NORMALIZATION_METHODS,
    PLAIN_METHODS,
    EnsureChannels,
    EnsureChannelsd,
    EnsureSingleChannel,
    EnsureSingleChanneld,
    EnsureThreeChannel,
    EnsureThreeChanneld,
    ModalityNormalize,
    ModalityNormalized,
    default_normalization_config,
    load_normalization_config,
    modality_settings,
    normalization_config_hash,
    normalize_intensity,
)
from dex_monai.transforms.io import LoadMultiModalImage, LoadMultiModalImaged
from dex_monai.transforms.modality import DetectModality, DetectModalityd
from dex_monai.transforms.pipelines import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    pretrain_2d_augment_transforms,
    pretrain_2d_load_transforms,
    pretrain_2d_transforms,
    pretrain_3d_transforms,
)
from dex_monai.transforms.save import SavePredictiond
from dex_monai.transforms.slicing import (
    ExtractSlice,
    ExtractSliced,
    RandForegroundSliced,
    foreground_slices,
    slice_foreground_ratios,
    slice_volume,
)

__all__ = [
    "DEFAULT_NORMALIZATION",
    "NORMALIZATION_METHODS",
    "PLAIN_METHODS",
    "EnsureChannels",
    "EnsureChannelsd",
    "PrepareLabeld",
    "RestoreSpatialShaped",
    "SavePredictiond",
    "SqueezeSpatiald",
    "restore_spatial_shape",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DetectModality",
    "DetectModalityd",
    "EnsureSingleChannel",
    "EnsureSingleChanneld",
    "EnsureThreeChannel",
    "EnsureThreeChanneld",
    "ExtractSlice",
    "ExtractSliced",
    "LoadMultiModalImage",
    "LoadMultiModalImaged",
    "ModalityNormalize",
    "ModalityNormalized",
    "RandForegroundSliced",
    "RandResizedCrop",
    "RandResizedCropd",
    "default_normalization_config",
    "foreground_slices",
    "load_normalization_config",
    "modality_settings",
    "normalization_config_hash",
    "normalize_intensity",
    "pretrain_2d_augment_transforms",
    "pretrain_2d_load_transforms",
    "pretrain_2d_transforms",
    "pretrain_3d_transforms",
    "slice_foreground_ratios",
    "slice_volume",
]
from dex_monai.transforms.mixed import MISSING_MASK_VALUE, CompleteMaskd  # noqa: E402

__all__ += ["MISSING_MASK_VALUE", "CompleteMaskd"]
