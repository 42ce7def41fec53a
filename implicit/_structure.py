"""The state of a problem: a dict, tuple/list or single tensor, flattened to ``(B, N)``.

Solvers only ever see one 2-D tensor whose row ``b`` holds every variable of
sample ``b`` (an unbatched problem is one sample, ``B = 1``). This module maps
between that layout and the user's structure, and validates what a residual
returns against the structure it was given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import _compat
from ._transforms import VMAP_UNSUPPORTED, vmapped

__all__ = ["Structure"]


_wrapped = _compat.is_wrapped
_HALF = (torch.float16, torch.bfloat16)


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


class Structure:
    """The layout of a state: variable names, shapes, dtype, device and batch size.

    Args:
        z0: The initial state (dict of tensors, tuple/list of tensors, or a tensor).
        batched: Whether dim 0 of every variable indexes independent samples.

    Raises:
        TypeError: ``z0`` is not a tensor, a dict of tensors or a tuple/list of tensors.
        ValueError: the variables disagree in dtype, device or batch size, or a
            variable is not floating point.
    """

    def __init__(self, z0: Any, batched: bool) -> None:
        if isinstance(z0, torch.Tensor):
            self.kind = "tensor"
            self.keys: list[Any] = [None]
            tensors = [z0]
        elif isinstance(z0, Mapping):
            self.kind = "dict"
            self.keys = list(z0.keys())
            tensors = [z0[k] for k in self.keys]
        elif isinstance(z0, (tuple, list)):
            self.kind = type(z0).__name__
            self.keys = list(range(len(z0)))
            tensors = list(z0)
        else:
            raise TypeError(
                f"z0 must be a tensor, a dict of tensors or a tuple/list of tensors; got {type(z0).__name__}"
            )
        if not tensors:
            raise ValueError("z0 holds no variables; give at least one tensor")
        self.names = [self.name(k) for k in self.keys]
        for name, t in zip(self.names, tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
            if not t.is_floating_point():
                raise ValueError(f"{name} has dtype {t.dtype}; expected a floating-point dtype")
        for name, t in zip(self.names, tensors):
            if vmapped(t):
                raise NotImplementedError(VMAP_UNSUPPORTED.format(where=f"z0 ({name})"))
        first = tensors[0]
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        # The dtype of the flat state the solvers see: a half-precision state is
        # solved in float32 (see flatten), the dtype of its variables kept for f.
        self.work_dtype: torch.dtype = torch.float32 if self.dtype in _HALF else self.dtype
        for name, t in zip(self.names, tensors):
            if t.dtype != self.dtype:
                raise ValueError(
                    f"{name} has dtype {t.dtype}; expected {self.dtype} as in {self.names[0]} "
                    "(all variables share one dtype)"
                )
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}; expected {self.device} as in {self.names[0]}")
        self.batched = batched
        if batched:
            for name, t in zip(self.names, tensors):
                if t.dim() == 0:
                    raise ValueError(
                        f"{name} is 0-dim but the problem is batched; every variable needs dim 0 "
                        "to index samples (or pass batched=False)"
                    )
            self.batch = int(first.shape[0])
            for name, t in zip(self.names, tensors):
                if t.shape[0] != self.batch:
                    raise ValueError(
                        f"{name} has batch size {t.shape[0]}; expected {self.batch} as in "
                        f"{self.names[0]} (dim 0 indexes samples when batched=True)"
                    )
        else:
            self.batch = 1
        self.shapes = [_shape(t.shape) for t in tensors]
        self.sizes = [math.prod(t.shape[1:]) if batched else t.numel() for t in tensors]  # per sample
        self.size = sum(self.sizes)
        # Flatten concatenates, and unflatten splits, rows of shape (B, n) when batched and
        # (n,) when not: a variable already of that shape needs no view either way.
        rows = [(self.batch, n) if batched else (n,) for n in self.sizes]
        self._is_row = [shape == row for shape, row in zip(self.shapes, rows)]
        self._all_rows = all(self._is_row)

    def name(self, key: Any) -> str:
        """How a variable is called in messages: ``z['x']``, ``z[0]`` or ``z``."""
        if self.kind == "tensor":
            return "z"
        return f"z[{key!r}]"

    def variables(self, state: Any) -> list[torch.Tensor]:
        """The tensors of ``state`` in this structure's order (no validation)."""
        if self.kind == "tensor":
            return [state]
        return [state[k] for k in self.keys]

    def flatten(self, state: Any) -> torch.Tensor:
        """``state`` as one ``(B, N)`` tensor of :attr:`work_dtype` (a view of a single variable already in it).

        A ``float16`` or ``bfloat16`` state is flattened to ``float32``: the
        solvers' own arithmetic (Anderson's normal equations, GMRES's
        rotations, sums over many terms) needs more than half precision,
        and their small dense factorisations exist for ``float32`` on every
        device. :meth:`unflatten` turns the values back for ``f``.
        """
        if self.kind == "tensor":
            return self._to_work(state.reshape(self.batch, self.size))
        return self._concatenate(self.variables(state))

    def flatten_output(self, out: Any, what: str) -> torch.Tensor:
        """:meth:`check` then :meth:`flatten`, ``out`` returned by ``what``.

        What a function returns is nearly always right: that case is
        recognised with a few comparisons per variable (plain tensors of the
        right shape, dtype and device), and anything else goes through
        :meth:`check`, which names what is wrong.
        """
        kind = self.kind
        if kind == "tensor":
            tensors = [out]
        elif kind == "dict":
            tensors = []
            if (type(out) is dict or isinstance(out, Mapping)) and len(out) == len(self.keys):
                try:
                    tensors = [out[k] for k in self.keys]
                except KeyError:  # check() names the keys
                    pass
        else:
            ok = isinstance(out, (tuple, list)) and len(out) == len(self.keys)
            tensors = list(out) if ok else []
        dtype, device = self.dtype, self.device
        plain = len(tensors) == len(self.shapes)
        for t, shape in zip(tensors, self.shapes):
            if not (
                isinstance(t, torch.Tensor)
                and t.shape == shape
                and t.dtype == dtype
                and t.device == device
                and not _wrapped(t)  # under torch.func: check() looks through the wrappers
            ):
                plain = False
                break
        if not plain:
            self.check(out, what)
            tensors = self.variables(out)
        if kind == "tensor":
            return self._to_work(tensors[0].reshape(self.batch, self.size))
        return self._concatenate(tensors)

    def recast(self, out: Any, dtype: torch.dtype) -> Any:
        """``out`` with its variables of ``dtype`` (autocast's) turned into this structure's dtype.

        Anything that does not fit the structure is returned as it is, for
        :meth:`check` to name.
        """
        if self.dtype == dtype:
            return out

        def back(t: Any) -> Any:
            return t.to(self.dtype) if isinstance(t, torch.Tensor) and t.dtype == dtype else t

        if self.kind == "tensor":
            return back(out)
        if isinstance(out, Mapping):
            return {k: back(v) for k, v in out.items()}
        if isinstance(out, list):
            return [back(t) for t in out]
        if isinstance(out, tuple):
            return tuple(back(t) for t in out)
        return out

    def _to_work(self, flat: torch.Tensor) -> torch.Tensor:
        return flat if self.work_dtype == self.dtype else flat.to(self.work_dtype)

    def _concatenate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.batched:
            if not self._all_rows:
                tensors = [
                    t if row else t.reshape(self.batch, n) for t, n, row in zip(tensors, self.sizes, self._is_row)
                ]
            flat = torch.cat(tensors, dim=1)
        else:
            if not self._all_rows:
                tensors = [t if row else t.reshape(-1) for t, row in zip(tensors, self._is_row)]
            flat = torch.cat(tensors).view(1, self.size)
        return self._to_work(flat)

    def unflatten(self, flat: torch.Tensor) -> Any:
        """The inverse of :meth:`flatten`; returns views of ``flat`` (copies in the variables' dtype if it differs)."""
        if self.kind == "tensor":
            out = flat.view(self.shapes[0])
            return out if self.work_dtype == self.dtype else out.to(self.dtype)
        parts: Sequence[torch.Tensor]
        parts = flat.split_with_sizes(self.sizes, 1) if self.batched else flat.reshape(-1).split_with_sizes(self.sizes)
        if not self._all_rows:
            parts = [p if row else p.view(s) for p, s, row in zip(parts, self.shapes, self._is_row)]
        if self.work_dtype != self.dtype:
            parts = [p.to(self.dtype) for p in parts]
        if self.kind == "dict":
            return dict(zip(self.keys, parts))
        if self.kind == "tuple":
            return tuple(parts)
        return list(parts)

    def check(self, out: Any, what: str) -> None:
        """Validate ``out`` (returned by ``what``) against this structure.

        Raises:
            ValueError: naming the variable, the expected and the actual value.
        """
        if self.kind == "tensor":
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"{what} returned {type(out).__name__}; expected a tensor as in z0")
            tensors = [out]
        elif self.kind == "dict":
            if not isinstance(out, Mapping):
                raise ValueError(f"{what} returned {type(out).__name__}; expected a dict as in z0")
            if set(out.keys()) != set(self.keys):
                missing = [k for k in self.keys if k not in out]
                extra = [k for k in out if k not in self.keys]
                raise ValueError(
                    f"{what} returned keys {sorted(map(str, out.keys()))}; expected {sorted(map(str, self.keys))} "
                    f"as in z0 (missing {missing}, unexpected {extra})"
                )
            tensors = [out[k] for k in self.keys]
        else:
            if not isinstance(out, (tuple, list)) or len(out) != len(self.keys):
                got = (
                    f"{type(out).__name__} of length {len(out)}"
                    if isinstance(out, (tuple, list))
                    else type(out).__name__
                )
                raise ValueError(f"{what} returned {got}; expected a {self.kind} of length {len(self.keys)} as in z0")
            tensors = list(out)
        for name, shape, t in zip(self.names, self.shapes, tensors):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{what} returned {name} of type {type(t).__name__}; expected a tensor")
            if t.shape != shape:
                raise ValueError(f"{what} returned {name} with shape {_shape(t.shape)}; expected {shape} as in z0")
            if t.dtype != self.dtype:
                raise ValueError(f"{what} returned {name} with dtype {t.dtype}; expected {self.dtype} as in z0")
            if t.device != self.device:
                raise ValueError(f"{what} returned {name} on {t.device}; expected {self.device} as in z0")
            if vmapped(t):
                raise NotImplementedError(
                    VMAP_UNSUPPORTED.format(where=f"{name} returned by {what} (it reads a vmapped tensor)")
                )

    def nonfinite(self, flat: torch.Tensor) -> list[str]:
        """Names of the variables holding a NaN or infinity in ``flat``."""
        bad = []
        for name, part in zip(self.names, flat.split(self.sizes, dim=1)):
            if not bool(torch.isfinite(part).all()):
                bad.append(name)
        return bad

    def describe(self) -> str:
        """One line listing the variables and their shapes."""
        return ", ".join(f"{n}: {s}" for n, s in zip(self.names, self.shapes))
