"""One training run as a value: the model it trains, the name it writes under, its checked recipe and the
params it reads. The training stages, the learning-rate range test and the benchmark each describe what
they train with a :class:`Run`; ``training.assemble`` builds the model, trainer and batches from it.

Light on purpose (no torch): a stage says what it will train before the heavy libraries load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import MODEL_SECTIONS, Params, RuntimeConfig, TrainConfig
from .paths import holdout as holdout_name
from .subsets import Subset


@dataclass(frozen=True)
class Run:
    """What a training run computes and where it writes."""

    model: str  # the model it trains: finetune or scratch (config.TRAINED_MODELS)
    name: str  # the name it writes under: the model's, or its holdout twin's (paths.holdout)
    cfg: TrainConfig  # the model's section, checked against the rest of the params
    arch: str
    weights: str  # model.weights, or none for a run from scratch
    runtime: RuntimeConfig
    layers: list[str] = field(default_factory=list)  # features.layers, which a fine-tuned head reads too
    probe: str = "probe"  # the linear probe's run that LP-FT starts from (init_head: probe)
    tensorboard: bool = False  # logging.tensorboard
    subset: Subset | None = None  # a point of the data-efficiency curve: trains on this subset of train only

    @classmethod
    def of(cls, params: Params, model: str, holdout: bool = False, subset: Subset | None = None) -> Run:
        """The run of ``model``, or with ``holdout`` of its holdout twin (on the train split, from the probe
        fitted on the train split), or with ``subset`` of its point on the data-efficiency curve; bad params
        fail here."""
        run = cls(
            model=model,
            name=holdout_name(model) if holdout else model,
            cfg=params.train_config(model, holdout),
            arch=params.model.arch,
            weights=params.weights_for(model),
            runtime=params.runtime,
            layers=params.features.layers,
            probe=holdout_name("probe") if holdout else "probe",
            tensorboard=params.logging.tensorboard,
        )
        return run if subset is None else run.on_subset(subset, params.efficiency.compile)

    def on_subset(self, subset: Subset, compile: bool) -> Run:
        """The run's recipe as a point of the data-efficiency curve: trained on ``subset`` of the train split,
        no validation (the last epoch is kept, as in a final fit), LP-FT from the probe fitted on the same
        subset; ``compile``: ``efficiency.compile``."""
        return dataclasses.replace(
            self,
            name=subset.run(self.model),
            cfg=dataclasses.replace(self.cfg, train_on_val=True, compile=compile and self.cfg.compile),
            probe=subset.run("probe"),
            subset=subset,
        )

    @property
    def section(self) -> str:
        """The model's params section: ``train`` or ``scratch``."""
        return MODEL_SECTIONS[self.model]

    def key(self, setting: str) -> str:
        """The params key of the run's ``setting`` (``train.lr``, ``scratch.lr``)."""
        return f"{self.section}.{setting}"

    def with_recipe(self, **changes) -> Run:
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, **changes))

    def with_runtime(self, **changes) -> Run:
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))

    def described(self) -> dict:
        """The run's params as they are logged and saved with its resumable state."""
        named = {"run": self.name, "arch": self.arch, "weights": self.weights}
        if self.subset is not None:
            named |= {"images_per_class": self.subset.per_class, "draw": self.subset.draw}
        return named | dataclasses.asdict(self.cfg) | dataclasses.asdict(self.runtime)
