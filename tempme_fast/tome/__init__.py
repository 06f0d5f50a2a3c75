"""Drop-in fast token merging for code written against ToMe or the released TempMe code.

``from tempme_fast.tome import bipartite_soft_matching, merge_wavg, merge_source`` in place of
``from tome.merge import ...``; ``tempme_fast.tome.tempme_compat`` for TempMe's variant.
:func:`apply_tome` and :func:`patch_timm` put ToMe into open_clip and timm image towers.
"""
from .merge import (Merge, Unmerge, bipartite_soft_matching, kth_bipartite_soft_matching, merge_source, merge_wavg,
                    random_bipartite_soft_matching)

__all__ = ["Merge", "Unmerge", "bipartite_soft_matching", "kth_bipartite_soft_matching", "merge_source",
           "merge_wavg", "random_bipartite_soft_matching"]
