"""``deepspeed.zero.Init`` without losing the class decorators of modules first imported inside it.

While ZeRO-3's ``zero.Init`` is active, DeepSpeed wraps the ``__init__`` of every ``nn.Module``
subclass (to partition each module once built), a class defined in the meantime included: its
``__init_subclass__`` hook does it as the class statement ends, *before* any class decorator
runs, and keeps the original as ``cls._old_init``. On exit it puts ``_old_init`` back as
``__init__``. A decorator that replaced ``__init__`` in between is thereby dropped: from then on
instances are built by the bare ``__init__``. transformers >= 5.25 with the ``kernels`` package
decorates its attention classes so (``use_kernelized_func``, whose ``__init__`` gives each
instance ``_kernel_funcs`` and whose ``forward`` reads it), so when a model's module was first
imported inside ``zero.Init`` (the first model built in ``configure_model`` or under
``fabric.init_module()``), a model of that class built later, outside it, failed its first
forward: ``AttributeError: 'Qwen2Attention' object has no attribute '_kernel_funcs'``.

``keep_class_decorators`` runs, just before the context exits, over the classes whose
``__init__`` is no longer DeepSpeed's wrapper: where the replacement calls DeepSpeed's wrapper
from its closure (a decorator that wrapped it), ``_old_init`` becomes a copy of the replacement
that calls the original ``__init__`` instead, which DeepSpeed's exit then restores. The
decorator stays, and nothing built later outside the context is partitioned.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from .deepspeed_compat import ORIGINAL_INIT, module_classes, zero_init_active


@contextmanager
def keep_class_decorators(zero_init: AbstractContextManager) -> Iterator[None]:
    """``zero_init`` (a ``deepspeed.zero.Init``), keeping what class decorators did to ``__init__`` inside it."""
    with zero_init:
        try:
            yield
        finally:
            if zero_init_active():  # __init__s are wrapped now (ZeRO-3)
                _restore_decorated_inits()


def _restore_decorated_inits() -> None:
    for cls in module_classes():
        init, original = cls.__dict__.get("__init__"), getattr(cls, ORIGINAL_INIT, None)
        if init is None or original is None or getattr(init, "__wrapped__", None) is original:
            continue  # no __init__ of its own, never wrapped, or still DeepSpeed's wrapper
        unwrapped = _calling(init, original)
        if unwrapped is not None:
            setattr(cls, ORIGINAL_INIT, unwrapped)  # what DeepSpeed's exit puts back as __init__


def _calling(function, original):
    """A copy of ``function`` whose closure holds ``original`` where it held DeepSpeed's wrapper of it; else None."""
    cells = getattr(function, "__closure__", None) or ()
    contents = [_content(cell) for cell in cells]
    if not any(getattr(c, "__wrapped__", None) is original for c in contents):
        return None
    closure = tuple(
        types.CellType(original) if getattr(c, "__wrapped__", None) is original else cell
        for cell, c in zip(cells, contents, strict=True)
    )
    code, defaults = function.__code__, function.__defaults__
    copy = types.FunctionType(code, function.__globals__, function.__name__, defaults, closure)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__module__ = function.__module__
    copy.__doc__ = function.__doc__
    copy.__dict__.update(function.__dict__)
    return copy


def _content(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None
