"""The model card: what a trained model file (``data/models/<run>/model.pt``) holds, defined once.

The probe (``linear_probe.save_probe``) and the training stages (``training.save_model``) write it;
``TrainedModel``, ``evaluate``, ``predict``, ``export`` and ``ensemble`` read it
(``checkpoint.read_model``). On disk a model file is a torch-saved dict: the weights under ``"model"``, then
every field of the card under its own name (each one required), then the extras its stage recorded, which
a reader may not find in an older file:

- ``layers``: the backbone blocks whose pooled features the head reads besides its own (``features.layers``);
- ``at_chance``: training ended at chance and the model was kept on purpose (``training.LearningCheck``);
- ``val_acc``, and ``epoch`` (training) or ``C`` (the probe): what was chosen on the validation images.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .inputs import Preprocessing


@dataclass(frozen=True)
class EvalInput:
    """How a network takes cached images at evaluation: their centre ``preprocessing.crop_pct`` resized to
    ``image_size``, normalised as ``preprocessing`` says, channels-last in memory or not."""

    preprocessing: Preprocessing
    image_size: int
    channels_last: bool = True


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to use a trained model besides its weights, and how it was made."""

    run: str
    mode: str  # finetune, feature_extract, scratch or linear_probe
    arch: str
    weights: str  # the weights it started from (model.weights)
    classes: list[str]
    head: str  # the classifier's module name
    preprocessing: Preprocessing  # how the weights expect their input
    cache_size: int  # images were decoded to this square size before the evaluation crop
    eval_image_size: int
    channels_last: bool
    config: dict  # the run's settings (its params section)
    extra: dict = field(default_factory=dict)  # the extras (the module's docstring), in the order written

    @classmethod
    def from_dict(cls, data: dict) -> ModelCard:
        """The card in a model file's dict (it must hold every key of ``CARD_KEYS``; its weights are left
        out)."""
        card = {key: data[key] for key in CARD_KEYS}
        return cls(
            **(card | {"preprocessing": Preprocessing.from_dict(card["preprocessing"])}),
            extra={key: value for key, value in data.items() if key not in CARD_KEYS and key != "model"},
        )

    def as_dict(self, state: dict) -> dict:
        """What the model file holds: the weights ``state``, the card's fields in their order (the
        preprocessing as a plain dict), the extras."""
        card = {key: getattr(self, key) for key in CARD_KEYS}
        return {"model": state, **(card | {"preprocessing": self.preprocessing.as_dict()}), **self.extra}

    @property
    def eval_input(self) -> EvalInput:
        return EvalInput(self.preprocessing, self.eval_image_size, self.channels_last)

    @property
    def layers(self) -> list[str]:
        return self.extra.get("layers", [])  # a model made before features.layers reads none

    @property
    def at_chance(self) -> bool:
        return self.extra.get("at_chance", False)  # probes, and models trained before the check, carry none


CARD_KEYS = tuple(f.name for f in fields(ModelCard) if f.name != "extra")  # every one required in a file
