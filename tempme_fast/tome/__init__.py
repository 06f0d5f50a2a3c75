"""Drop-in fast token merging for code written against ToMe or the released TempMe code.

``from tempme_fast.tome import bipartite_soft_matching, merge_wavg, merge_source`` in place of
``from tome.merge import ...``; ``tempme_fast.tome.tempme_compat`` for TempMe's variant.
:func:`apply_tome` and :func:`patch_timm` put ToMe into open_clip and timm image towers.
"""
from .merge import (Merge, Unmerge, bipartite_soft_matching, kth_bipartite_soft_matching, merge_source, merge_wavg,
                    random_bipartite_soft_matching)
from .open_clip_patch import ToMeSettings, apply_tome, remove_tome
from .schedule import parse_r
from .timm_patch import patch_timm, unpatch_timm

__all__ = ["Merge", "ToMeSettings", "Unmerge", "apply_tome", "bipartite_soft_matching", "kth_bipartite_soft_matching",
           "merge_source", "merge_wavg", "parse_r", "patch_timm", "random_bipartite_soft_matching", "remove_tome",
           "unpatch_timm"]
