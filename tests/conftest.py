"""Shared fixtures and the plugin tables that drive parametrisation.

Every registered solver and adjoint (built-in or plugin) is picked up here, so a
new one is exercised by every contract test without editing the tests.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

import implicit

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "default", max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

SOLVERS = implicit.available_solvers()
ADJOINTS = implicit.available_adjoints()
# Adjoints that give the implicit gradient of any problem; those for symmetric Jacobians only
# (argmin and least squares: cg, minres) are tested on symmetric problems, from their own table.
EXACT_ADJOINTS = [
    a for a in ADJOINTS if not implicit.get_adjoint(a).approximate and not implicit.get_adjoint(a).symmetric
]
SYMMETRIC_ADJOINTS = [a for a in ADJOINTS if implicit.get_adjoint(a).symmetric]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
