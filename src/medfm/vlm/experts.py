"""Visual Med-Alpaca's idea, "visual experts -> text -> LM", with medfm's own experts: medfm's
zero-shot classifier (``medfm-clip-small`` by default) describes the image as text (the kind of
image, then class probabilities for the findings medfm-clip-small was trained on), and a language
model (SmolLM2-135M-Instruct by default) answers from that text. The LM never sees pixels: what it
says about the image can only come from the classifier's findings, which the prompt tells it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medfm.io import MedicalImage
from medfm.vlm.model import Turns

#: the kinds of image the classifier tells apart, by a softmax over these descriptions
IMAGE_KINDS = {"X-ray": "a chest x-ray", "CT": "a chest CT scan", "dermoscopy": "a dermoscopic image of a skin lesion"}
#: findings per image kind: (labels, method) scored by `medfm.clip.zero_shot_probabilities`
FINDINGS: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "X-ray": ((("pneumonia", "normal"), "softmax"), (("COVID-19",), "pos-neg")),
    "CT": ((("COVID-19",), "pos-neg"),),
    "dermoscopy": ((("melanocytic nevus", "benign keratosis-like lesion", "melanoma", "basal cell carcinoma",
                     "actinic keratosis or intraepithelial carcinoma (Bowen's disease)", "vascular lesion",
                     "dermatofibroma"), "softmax"),),
}
SYSTEM = ("You are a medical imaging assistant for research, not diagnosis. You cannot see the image: an automatic "
          "image classifier has described it below as probabilities. Answer only from its findings, briefly; say when "
          "they do not answer the question.")


@dataclass
class ExpertPipeline:
    """A zero-shot classifier that describes the image, and a `medfm.lm.LanguageModel` that answers."""

    classifier: Any  # medfm.clip.DualEncoder
    language_model: Any  # medfm.lm.LanguageModel
    name: str = "medfm-experts-smollm2"
    _described: tuple[MedicalImage, str] | None = field(default=None, repr=False)

    def findings(self, image: MedicalImage) -> str:
        """The classifier's description of a 2D image, as the text the LM is given (kept for the
        last image, so a conversation about it classifies it once)."""
        if self._described is None or self._described[0] is not image:
            self._described = (image, self._describe(image))
        return self._described[1]

    def _describe(self, image: MedicalImage) -> str:
        from medfm.clip import zero_shot_probabilities

        embedding = self.classifier.encode_image(image)
        kind = image.modality if image.modality in IMAGE_KINDS else None
        lines = []
        if kind is None:
            probabilities = zero_shot_probabilities(self.classifier, embedding, list(IMAGE_KINDS.values()))[0]
            kind = list(IMAGE_KINDS)[int(probabilities.argmax())]
            lines.append(f"Image type: {IMAGE_KINDS[kind]} (probability {float(probabilities.max()):.2f}).")
        else:
            lines.append(f"Image type: {IMAGE_KINDS[kind]} (from the file).")
        templates = self.classifier.templates(kind)
        for labels, method in FINDINGS[kind]:
            probabilities = zero_shot_probabilities(self.classifier, embedding, labels, templates, method)[0]
            ranked = sorted(zip(labels, probabilities.tolist()), key=lambda item: -item[1])
            what = "probability of each" if method == "softmax" else "probability that it is present"
            lines.append(f"Findings ({what}): " + ", ".join(f"{label} {p:.2f}" for label, p in ranked) + ".")
        return f"Image classifier ({self.classifier.name}) findings:\n" + "\n".join(lines)

    def prompt(self, turns: Turns, image: MedicalImage | None) -> str:
        """The chat prompt: the system text, the findings with the first question, the turns so far."""
        messages = [{"role": "system", "content": SYSTEM}]
        for index, (question, answer) in enumerate(turns):
            text = f"{self.findings(image)}\n\nQuestion: {question}" if index == 0 and image is not None else question
            messages.append({"role": "user", "content": text})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return self.language_model.chat_prompt(messages)

    def answer(self, turns: Turns, image: MedicalImage | None, *, max_new_tokens: int = 128, temperature: float = 0.0,
               seed: int | None = None, stream: Callable[[str], None] | None = None) -> str:
        """The LM's reply to the last turn."""
        return self.language_model.generate(self.prompt(turns, image), max_new_tokens, temperature=temperature,
                                            seed=seed, stream=stream).strip()

    def score(self, turns: Turns, image: MedicalImage | None, choices: Sequence[str]) -> list[float]:
        """The log-likelihood of each choice as the LM's reply."""
        return self.language_model.score(self.prompt(turns, image), list(choices))
