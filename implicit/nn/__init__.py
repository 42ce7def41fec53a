"""Equilibrium layers and their stabilisers.

:class:`DEQ` wraps a cell ``z ↦ cell(z, x)`` as a layer returning its fixed
point. :func:`jacobian_regularization` and :func:`spectral_radius` measure the
Jacobian of any fixed-point map at its solution (they are not specific to
:class:`DEQ`, which offers both as methods with its cell bound).
"""

from ._deq import DEQ
from ._stabilisers import jacobian_regularization, spectral_radius

__all__ = ["DEQ", "jacobian_regularization", "spectral_radius"]
