"""The data-efficiency curve's training sets: n images of each class drawn from the train split, one seeded
draw per seed, nested (a draw's 5 images of a class hold its 3). The validation and test splits are never
drawn from: every point is scored on the same test images as the main models.

numpy only: a stage names its point and checks it within a second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .paths import EFFICIENCY

log = logging.getLogger("transferlab.subsets")


@dataclass(frozen=True)
class Subset:
    """``per_class`` training images of each class, drawn with seed ``draw``."""

    per_class: int
    draw: int

    def run(self, model: str) -> str:
        """The name ``model`` trained on this subset writes under (``efficiency/finetune_n5_d0``)."""
        return f"{EFFICIENCY}/{model}_n{self.per_class}_d{self.draw}"

    def rows(self, labels: np.ndarray) -> np.ndarray:
        """The subset's rows of the train split whose labels are ``labels``: per class, the first
        ``per_class`` of a permutation seeded by the draw and the class, so a larger subset of the same draw
        holds a smaller one. A class with fewer images than ``per_class`` gives all it has (logged)."""
        chosen = []
        for label in np.unique(labels):
            pool = np.flatnonzero(labels == label)
            if len(pool) < self.per_class:
                log.warning(
                    "class %d has %d training images, fewer than %d: all of them train this point",
                    label,
                    len(pool),
                    self.per_class,
                )
            order = np.random.default_rng([self.draw, int(label)]).permutation(len(pool))
            chosen.append(pool[order[: self.per_class]])
        return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
