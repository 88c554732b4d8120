from dex_monai.networks.nets.dex_downstream import DEXClassifier, DEXUNETR
from dex_monai.networks.nets.dex_mae import DEXMaskedAutoEncoder, patchify, unpatchify
from dex_monai.networks.nets.dex_vit import DEXViT
from dex_monai.networks.nets.m4oe_swin import M4oESwinClassifier, M4oESwinUNETR
from dex_monai.networks.nets.unimed import UNIMED_TASKS, UniMed, UniMedTaskView
