"""Classes that patch a model in place (``model.__class__ = ...``) and still pickle.

``apply_tempme``, ``apply_tome`` and ``patch_timm`` give the model (or its tower) a subclass of its own
class made at run time, with the patch's mixin in front. Such a class is not importable by name, so
``torch.save(model)`` would fail, and a process that loads the file has not made it yet. Its objects
therefore pickle as "the subclass of this mixin and this original class", both importable, and the
loading process makes (or reuses) that subclass.
"""
from __future__ import annotations

import copyreg
from typing import Dict, Tuple

_CLASSES: Dict[Tuple[type, type], type] = {}


def patched_class(mixin: type, cls: type, prefix: str, original_attr: str) -> type:
    """The subclass ``(mixin, cls)`` named ``prefix + cls.__name__``, with ``original_attr`` set to ``cls``;
    made once per pair."""
    key = (mixin, cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), {
            original_attr: cls, "_patch_key": (prefix, original_attr), "__reduce_ex__": _reduce_ex,
            "__module__": mixin.__module__})
    return _CLASSES[key]


def _reduce_ex(self, protocol: int):
    cls = type(self)
    mixin, original = cls.__bases__
    reduced = object.__reduce_ex__(self, max(protocol, 2))  # (copyreg.__newobj__, (cls, *args), state, ...)
    if reduced[0] is not copyreg.__newobj__ or reduced[1][0] is not cls:
        raise TypeError(f"cannot pickle a {cls.__name__}: its reduction is {reduced[:2]!r}")
    return (_new_patched, (mixin, original, *cls._patch_key, *reduced[1][1:]), *reduced[2:])


def _new_patched(mixin: type, cls: type, prefix: str, original_attr: str, *args):
    patched = patched_class(mixin, cls, prefix, original_attr)
    return patched.__new__(patched, *args)
