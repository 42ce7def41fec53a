"""An example plugin package for ``implicit``: one forward solver, one adjoint.

Nothing here needs to be imported by users: ``implicit`` finds both classes
through the entry points declared in this package's ``pyproject.toml`` and
imports them the first time a name that is not built in is asked for.
"""

from __future__ import annotations

from .neumann_damped import DampedNeumann
from .relaxed_picard import RelaxedPicard

__all__ = ["DampedNeumann", "RelaxedPicard"]
__version__ = "0.1.0"
