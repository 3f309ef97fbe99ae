"""Vision-language models: an image encoder, a connector and a causal language model (LLaVA-Med,
LLaVA, XrayGPT's layout and medfm's own), and the experts-to-text pipeline of Visual Med-Alpaca."""

from medfm.vlm.model import FORMATS, ImagePromptFormat, VisionLanguageModel

__all__ = ["FORMATS", "ImagePromptFormat", "VisionLanguageModel"]
