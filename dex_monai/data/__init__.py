"""Multi-modality DEX pre-training data: modalities, readers, dataset index, slice cache, sampler.

- :data:`MODALITIES`: the ten modalities in a fixed order (``modality_index``);
- modality rules (:class:`ModalityRules`) and DICOM mapping (:data:`DICOM_MODALITY_MAP`);
- MONAI readers per format (:mod:`dex_monai.data.readers`);
- the dataset index ``python -m dex_monai.data.index`` (:func:`build_datalist`);
- :class:`SliceDataset` (2-D slices with a persistent cache), :class:`ModalityBalancedSampler`;
- :func:`make_synthetic_dataset` (small fake data of all modalities).
"""

from dex_monai.data.cache import SliceCache, slice_cache_key, source_signature  # noqa: E402
from dex_monai.data.checks import RejectedFile  # noqa: E402
from dex_monai.data.datalist import inference_datalist  # noqa: E402
from dex_monai.data.outputs import plan_outputs  # noqa: E402
from dex_monai.data.dataset import (  # noqa: E402
    SliceDataset,
    expand_datalist,
    load_datalist,
    select_entries,
)
from dex_monai.data.failures import FailureTolerantDataset, collate_skipping_failures  # noqa: E402
from dex_monai.data.modality import (
    DEFAULT_LABEL_PATTERNS,
    DICOM_MODALITY_MAP,
    MODALITIES,
    MODALITY_INDEX,
    UNKNOWN_MODALITY,
    ModalityRule,
    ModalityRules,
    UnknownModalityError,
    canonical_modality,
    modality_from_dicom,
    modality_index,
)
from dex_monai.data.readers import (
    DicomFileReader,
    DicomSeriesReader,
    ImageDecodeError,
    ITKImageReader,
    NiftiReader,
    NpzStackReader,
    NumpyImageReader,
    PILImageReader,
    image_format,
    reader_for,
)
from dex_monai.data.sampler import ModalityBalancedSampler  # noqa: E402

__all__ = [
    "DEFAULT_LABEL_PATTERNS",
    "DICOM_MODALITY_MAP",
    "MODALITIES",
    "MODALITY_INDEX",
    "UNKNOWN_MODALITY",
    "DicomFileReader",
    "FailureTolerantDataset",
    "RejectedFile",
    "collate_skipping_failures",
    "inference_datalist",
    "plan_outputs",
    "DicomSeriesReader",
    "ITKImageReader",
    "ImageDecodeError",
    "ModalityBalancedSampler",
    "ModalityRule",
    "ModalityRules",
    "NiftiReader",
    "NpzStackReader",
    "NumpyImageReader",
    "PILImageReader",
    "SliceCache",
    "SliceDataset",
    "UnknownModalityError",
    "build_datalist",
    "canonical_modality",
    "expand_datalist",
    "image_format",
    "load_datalist",
    "make_synthetic_dataset",
    "modality_from_dicom",
    "modality_index",
    "reader_for",
    "select_entries",
    "slice_cache_key",
    "source_signature",
    "write_datalist",
    "write_dicom_series",
]

_LAZY = {
    "build_datalist": "dex_monai.data.index",
    "write_datalist": "dex_monai.data.index",
    "make_synthetic_dataset": "dex_monai.data.synthetic",
    "write_dicom_series": "dex_monai.data.synthetic",
}


def __getattr__(name: str):
    # the index and the synthetic generator are imported on first use, so that
    # ``python -m dex_monai.data.index`` does not find its module already imported
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dex_monai.data' has no attribute '{name}'")
