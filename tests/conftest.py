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
from implicit._registry import forms_of

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "default", max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# The contract tests solve root and fixed-point problems: the tables hold the
# solvers and adjoints that accept them (``forms``, see docs/plugins.md); the
# solvers of optimisation problems only are tested on those (OPTIM_SOLVERS).
SOLVERS = [s for s in implicit.available_solvers() if "root" in forms_of(implicit.get_solver(s))]
OPTIM_SOLVERS = [s for s in implicit.available_solvers() if s not in SOLVERS]
ADJOINTS = [a for a in implicit.available_adjoints() if "root" in forms_of(implicit.get_adjoint(a))]
# Adjoints that give the implicit gradient of any problem; those for symmetric Jacobians only
# (argmin and least squares: cg, minres) are tested on symmetric problems, from their own table.
EXACT_ADJOINTS = [
    a for a in ADJOINTS if not implicit.get_adjoint(a).approximate and not implicit.get_adjoint(a).symmetric
]
SYMMETRIC_ADJOINTS = [a for a in ADJOINTS if implicit.get_adjoint(a).symmetric]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
