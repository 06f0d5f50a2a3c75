"""tempme_fast: TempMe video token merging for open_clip ViTs, with Triton kernels for the merge ops.

    import open_clip, tempme_fast
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained="openai")
    tempme_fast.apply_tempme(model)                 # the released 12-frame ViT-B/32 schedule
    video_emb = model.encode_video(video, mask)     # video [B, 12, 3, 224, 224] -> [B, 512]
"""
from . import derive, ops  # derive attaches TempMeConfig.for_model
from .config import TempMeConfig
from .geometry import ViTGeometry
from .graphs import GraphedVideoEncoder
from .lora import add_lora, mark_trainable, merge_lora
from .model import ScheduleClampWarning, TempMeSettings, apply_tempme, encode_video, remove_tempme, trace_sources
from .official import load_official_checkpoint
from .precompile import compile_kernels
from .schedule import LayerPlan, TokenSchedule, token_schedule
from .tome import apply_tome, remove_tome
from .tracking import SourceMap
from .train import train_step
from .trainer import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = ["GraphedVideoEncoder", "LayerPlan", "ScheduleClampWarning", "SourceMap", "TempMeConfig", "TempMeSettings",
           "TokenSchedule", "TrainConfig", "Trainer", "ViTGeometry", "add_lora", "apply_tempme", "apply_tome",
           "compile_kernels", "derive", "encode_video", "load_official_checkpoint", "mark_trainable", "merge_lora", "ops",
           "remove_tempme", "remove_tome", "token_schedule", "trace_sources", "train_step"]
