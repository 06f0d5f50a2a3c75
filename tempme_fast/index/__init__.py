"""Index a video collection with TempMe and search it by text or by example video.

    from tempme_fast.index import IndexSpec, VideoIndex, build_index
    build_index("my_videos/", "my_index", IndexSpec(pretrained="openai"), workers=4)
    hits = VideoIndex.open("my_index").search_text("a dog catches a frisbee", k=10)

The command-line tools are ``tempme index`` and ``tempme search`` (:mod:`tempme_fast.index.cli`).
"""
from .build import build_index
from .search import SearchHit, VideoIndex, search_index
from .sources import list_videos, rank_share
from .spec import IndexSpec, SpecMismatch, load_encoder
from .store import IndexContents, load_contents
from .vectors import FaissMissing, VectorSearch, brute_force

__all__ = ["FaissMissing", "IndexContents", "IndexSpec", "SearchHit", "SpecMismatch", "VectorSearch",
           "VideoIndex", "brute_force", "build_index", "list_videos", "load_contents", "load_encoder",
           "rank_share", "search_index"]
