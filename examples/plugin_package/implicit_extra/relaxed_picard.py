"""``relaxed_picard``: the built-in Picard solver with a different default damping."""

from __future__ import annotations

from dataclasses import dataclass

import implicit

# A built-in name never triggers the loading of plugins, so a plugin may look
# up the class it extends while it is itself being loaded.
_Picard = implicit.get_solver("fixed_point")

__all__ = ["RelaxedPicard"]


@dataclass(frozen=True, kw_only=True)
class RelaxedPicard(_Picard):  # type: ignore[misc, valid-type]
    """Damped Picard iteration ``z ← (1 - β) z + β f(z)`` with ``β = 0.5`` by default.

    Halving each step makes the iteration converge for maps whose Jacobian
    has eigenvalues in ``(-3, 1)`` instead of ``(-1, 1)``, at the price of
    slower convergence on maps that plain iteration already handles.

    Args:
        damping: ``β``, the weight of the new map value, in ``(0, 1]``.
    """

    damping: float = 0.5
