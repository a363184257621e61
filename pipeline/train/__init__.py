"""Training of the multi-fidelity potential: data (graphs + masked labels), losses, trainer, fine-tuning,
evaluation, and the strategy harness (mf / single / transfer / delta / multihead / meta / finetune-mf0)."""

from pipeline.train.data import FrameData, Labels, apply_label_policy, split_by_group, structure_groups
from pipeline.train.evaluation import FRAME_ERRORS_SCHEMA, evaluate, evaluate_frames, frame_errors
from pipeline.train.finetune import expand_model, freeze, parse_new_fidelities
from pipeline.train.losses import LossWeights
from pipeline.train.trainer import TrainConfig, TrainResult, prepare_config, train

__all__ = ["FRAME_ERRORS_SCHEMA", "FrameData", "Labels", "LossWeights", "TrainConfig", "TrainResult",
           "apply_label_policy", "evaluate", "evaluate_frames", "expand_model", "frame_errors", "freeze",
           "parse_new_fidelities", "prepare_config", "split_by_group", "structure_groups", "train"]
