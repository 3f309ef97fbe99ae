"""Vision-language models: an image encoder, a connector and a causal language model (LLaVA-Med,
LLaVA, XrayGPT, Med-Flamingo and RadFM's layouts; RadFM's 3D ViT reads whole volumes), and the
experts-to-text pipeline of Visual Med-Alpaca."""

from medfm.vlm.model import FORMATS, ImagePromptFormat, VisionLanguageModel

__all__ = ["FORMATS", "ImagePromptFormat", "VisionLanguageModel"]
