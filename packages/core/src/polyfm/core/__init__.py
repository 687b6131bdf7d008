"""polyfm.core: the shared engine (encoder contract, tasks, pretraining, adaptation,
weights, trainer, studies and CLI). Import the submodules directly; this module
re-exports the names users reach for most."""

from polyfm.core.adaptation import Adaptation, apply_adaptation, greedy_soup, merge_lora, uniform_soup
from polyfm.core.encoder import Encoder
from polyfm.core.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, PolyfmError
from polyfm.core.pretrain import InfoNCE, MultiTaskSupervised, Pretraining, SoftContrastive
from polyfm.core.tasks import Classification, Forecasting, OptimConfig, Regression, Segmentation
from polyfm.core.trainer import build_trainer
from polyfm.core.weights import PretrainedMixin, WeightSpec, load_checkpoint_file, load_state_dict_checked

__all__ = [
    "Adaptation",
    "CheckpointError",
    "Classification",
    "ConfigError",
    "DataError",
    "Encoder",
    "Forecasting",
    "InfoNCE",
    "MultiTaskSupervised",
    "NonFiniteLossError",
    "OptimConfig",
    "PolyfmError",
    "PretrainedMixin",
    "Pretraining",
    "Regression",
    "Segmentation",
    "SoftContrastive",
    "WeightSpec",
    "apply_adaptation",
    "build_trainer",
    "greedy_soup",
    "load_checkpoint_file",
    "load_state_dict_checked",
    "merge_lora",
    "uniform_soup",
]
