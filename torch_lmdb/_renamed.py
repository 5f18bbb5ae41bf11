"""Keyword arguments renamed for clarity, still accepted under their old names for a release.

Each renamed keyword names one idea (docs/ARCHITECTURE.md, glossary): ``os_readahead`` (the
operating system's readahead; was ``readahead``), ``page_requests`` and ``page_request_bytes``
(a cold batch requests its pages at once; were ``lookahead`` and ``lookahead_bytes``),
``batches_ahead`` (finished batches queued for the consumer; was ``prefetch``).
"""

import contextvars
import functools
import warnings

__all__ = ["renamed_keywords", "spelled"]

# The old names the caller of the innermost decorated function used: {new: old}.
_spellings: contextvars.ContextVar = contextvars.ContextVar("torch_lmdb_keyword_spellings", default={})


def spelled(name: str) -> str:
    """The keyword ``name`` as the caller of the running decorated function wrote it (its old name
    if it used that), for error messages."""
    return _spellings.get().get(name, name)


def renamed_keywords(**renames: str):
    """Decorator: ``old="new"`` pairs of keyword arguments also accepted under their old names.

    An old name passed alone is handed on under its new name with a ``DeprecationWarning`` naming
    the new keyword (and :func:`spelled` gives the old name back for error messages); passing both
    the old and the new name is a ``TypeError``.
    """

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            used = {}
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{function.__qualname__}() got both {old}= and {new}=; "
                                    f"{old}= is the old name of {new}=: pass {new}= alone")
                warnings.warn(f"{function.__qualname__}(): {old}= is deprecated and will be removed in a "
                              f"future release; use {new}= (the same option)", DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
                used[new] = old
            token = _spellings.set(used)
            try:
                return function(*args, **kwargs)
            finally:
                _spellings.reset(token)

        return wrapper

    return decorate
