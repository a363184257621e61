"""Training of the multi-fidelity potential: data (graphs + masked labels), losses, trainer."""

from pipeline.train.data import FrameData, Labels, split_by_group
from pipeline.train.losses import LossWeights
from pipeline.train.trainer import TrainConfig, TrainResult, evaluate, evaluate_frames, prepare_config, train

__all__ = ["FrameData", "Labels", "LossWeights", "TrainConfig", "TrainResult", "evaluate",
           "evaluate_frames", "prepare_config", "split_by_group",
           "train"]
