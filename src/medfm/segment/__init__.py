"""SAM-family segmentation: the network, its encoders and the checkpoint loaders."""

from medfm.segment.adapted import (
    ADAPTED_CONFIGS,
    build_adapted,
    encode_volume_chunk,
    load_adapted_checkpoint,
    load_samed,
)
from medfm.segment.checkpoints import (
    convert_hf_sam_to_medfm,
    convert_medfm_to_segment_anything,
    convert_segment_anything_to_medfm,
    detect_layout,
    infer_arch,
    load_sam_checkpoint,
    load_state_dict_file,
)
from medfm.segment.sam import (
    SAM_CONFIGS,
    SamCore,
    SamCoreConfig,
    ViTConfig,
    build_litemedsam,
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    sam_model_registry,
)
from medfm.segment.tinyvit import TinyViT, TinyViTConfig

__all__ = [
    "ADAPTED_CONFIGS",
    "build_adapted",
    "encode_volume_chunk",
    "load_adapted_checkpoint",
    "load_samed",
    "SAM_CONFIGS",
    "SamCore",
    "SamCoreConfig",
    "TinyViT",
    "TinyViTConfig",
    "ViTConfig",
    "build_litemedsam",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "convert_hf_sam_to_medfm",
    "convert_medfm_to_segment_anything",
    "convert_segment_anything_to_medfm",
    "detect_layout",
    "infer_arch",
    "load_sam_checkpoint",
    "load_state_dict_file",
    "sam_model_registry",
]
