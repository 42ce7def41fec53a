"""A cache of tensor views for the inner loops of solvers."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

__all__ = ["Views"]

K = TypeVar("K", bound=Hashable)


class Views(dict[K, torch.Tensor], Generic[K]):
    """Views of a solver's buffers, each made on first use and then looked up.

    On small problems a solver step costs about as much per dispatched tensor
    operation as per floating-point operation, and making a view (a slice, a
    transpose) is such a dispatch; a dictionary lookup is not. Making them all
    up front would cost a dispatch per view that a short solve never uses.

    Args:
        make: Returns the view for a key (a slot index, a count of slots in
            use, or a tuple of both).
    """

    def __init__(self, make: Callable[[K], torch.Tensor]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: K) -> torch.Tensor:
        view = self[key] = self.make(key)
        return view
