"""Adapting SAM-family models to your own data: the survey's recipes, one training loop.

``medfm train --recipe full|decoder|lora|adapter|autoprompt --base MODEL --data DIR -o RUN_DIR``;
see `medfm.segment.variants` for what each recipe trains and `medfm.train.trainer` for the loop;
``--engine ray --workers N`` runs that loop on Ray Train (`medfm.train.ray_engine`).
"""

from medfm.segment.variants import RECIPES, Recipe
from medfm.train.trainer import TrainConfig, TrainResult, train

__all__ = ["RECIPES", "Recipe", "TrainConfig", "TrainResult", "train"]
