"""dex_monai: Director-Experts (DEX) multi-modality medical vision foundation model for MONAI."""

__version__ = "0.1.0"
