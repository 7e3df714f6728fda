"""Exceptions and what they wrap."""

from __future__ import annotations


def walk_exceptions(exc: BaseException):
    """Yield ``exc`` and everything it wraps: ``__cause__``/``__context__`` chains and the
    worker errors Ray Train's wrappers carry (``cause``, ``worker_failures``, ``errors``)."""
    seen: set[int] = set()
    stack: list = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
        for attr in ("worker_failures", "errors"):
            errs = getattr(e, attr, None)
            if isinstance(errs, dict):
                stack.extend(errs.values())
            elif isinstance(errs, (list, tuple)):
                stack.extend(errs)
