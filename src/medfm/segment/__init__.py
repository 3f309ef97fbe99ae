"""SAM-family segmentation: the network, its encoders and the checkpoint loaders.

The names below are imported on first use (PEP 562), so that importing a light submodule such as
`medfm.segment.options` (what the CLI checks options with) does not load torch.
"""

from __future__ import annotations

from importlib import import_module

_HOMES = {
    "medfm.segment.adapted": ["ADAPTED_CONFIGS", "build_adapted", "encode_volume_chunk", "load_adapted_checkpoint", "load_samed"],
    "medfm.segment.checkpoints": ["convert_hf_sam_to_medfm", "convert_medfm_to_segment_anything",
                                  "convert_segment_anything_to_medfm", "detect_layout", "infer_arch",
                                  "load_sam_checkpoint", "load_state_dict_file"],
    "medfm.segment.sam": ["SAM_CONFIGS", "SamCore", "SamCoreConfig", "ViTConfig", "build_litemedsam", "build_sam",
                          "build_sam_vit_b", "build_sam_vit_h", "build_sam_vit_l", "sam_model_registry"],
    "medfm.segment.tinyvit": ["TinyViT", "TinyViTConfig"],
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> object:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'medfm.segment' has no attribute '{name}'")
    return getattr(import_module(_MODULE_OF[name]), name)
