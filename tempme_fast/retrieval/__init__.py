"""Text-video retrieval: MSR-VTT and generic data, video decoding, metrics and evaluation.

    from tempme_fast.retrieval import VideoProcessor, evaluate_retrieval, load_split
    split = load_split("data/MSRVTT")                       # the 1k-A test split
    processor = VideoProcessor.for_model(model)             # 12 frames at 1 fps, open_clip transform
    result = evaluate_retrieval(model, split, processor, open_clip.get_tokenizer("ViT-B-32"))

Decoding needs PyAV (``pip install av``); it is imported only when a video is read.
"""
from .data import (Caption, PairDataset, RetrievalSplit, VideoDataset, collate, load_generic, load_msrvtt,
                   load_split, make_loader)
from .evaluate import NoReadableVideos, evaluate_retrieval, format_results
from .metrics import (dual_softmax, rank_metrics, retrieval_metrics, text_to_video_ranks,
                      video_to_text_ranks)
from .synthetic import SyntheticPairs
from .video import VideoDecodeError, VideoProcessor, clip_transform, read_frames, sample_frame_indices

__all__ = ["Caption", "NoReadableVideos", "PairDataset", "RetrievalSplit", "SyntheticPairs", "VideoDataset", "VideoDecodeError",
           "VideoProcessor", "clip_transform", "collate", "dual_softmax", "evaluate_retrieval",
           "format_results", "load_generic", "load_msrvtt", "load_split", "make_loader", "rank_metrics",
           "read_frames", "retrieval_metrics", "sample_frame_indices", "text_to_video_ranks",
           "video_to_text_ranks"]
