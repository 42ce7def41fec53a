"""Placeholder: filled in by the solver suite."""
