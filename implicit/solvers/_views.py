"""A cache of tensor views for the inner loops of solvers."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Views"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Views(dict[K, V], Generic[K, V]):
    """Views of a solver's buffers, each made on first use and then looked up.

    On small problems a solver step costs about as much per dispatched tensor
    operation as per floating-point operation, and making a view (a slice, a
    transpose) is such a dispatch; a dictionary lookup is not. Making them all
    up front would cost a dispatch per view that a short solve never uses. A
    value may be a tuple of all the views one step needs, so that the step
    makes one lookup.

    Args:
        make: Returns the view (or views) for a key (a slot index, a count of
            slots in use, or a tuple of both).
    """

    def __init__(self, make: Callable[[K], V]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: K) -> V:
        view = self[key] = self.make(key)
        return view
