"""Names of solvers and adjoints: built-ins, decorators and entry-point plugins.

Built-in names live in two plain dicts filled when ``implicit`` is imported.
Third-party packages add names through the entry-point groups
``implicit.solvers`` and ``implicit.adjoints``; these load lazily, the first
time a name that is not built in is asked for or the names are listed, so a
plugin module may itself call ``get_solver("anderson")`` at import time. A
plugin that fails to load is reported in a warning naming its entry point and
leaves every other name working.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from ._adjoint import AdjointSolver
from ._solver import Solver

__all__ = [
    "RegistryError",
    "available_adjoints",
    "available_solvers",
    "forms_of",
    "get_adjoint",
    "get_solver",
    "make_adjoint",
    "make_solver",
    "register_adjoint",
    "register_solver",
]

_SOLVERS: dict[str, type[Solver]] = {}
_ADJOINTS: dict[str, type[AdjointSolver]] = {}
_GROUPS = {"solver": "implicit.solvers", "adjoint": "implicit.adjoints"}
_loaded: set[str] = set()

S = TypeVar("S", bound=Solver)
A = TypeVar("A", bound=AdjointSolver)


class RegistryError(ValueError, LookupError):
    """An unknown solver, adjoint or option; the message lists what exists."""


ALL_FORMS = ("root", "fixed_point", "argmin", "least_squares")


def forms_of(cls: type) -> tuple[str, ...]:
    """The problem forms a solver or adjoint class accepts: its ``forms`` class attribute.

    A class without one accepts every form. An adjoint made from a forward
    solver accepts the forms of that solver; its own problem, the adjoint
    equation, is a linear root problem, so it serves only where the solver
    accepts ``"root"``.
    """
    forms: Any = getattr(cls, "forms", None)
    if forms is None:
        forms = getattr(getattr(cls, "solver_class", None), "forms", ALL_FORMS)
    return tuple(forms)


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def register_solver(name: str) -> Callable[[type[S]], type[S]]:
    """Class decorator registering a :class:`Solver` subclass under ``name``.

    The registry is global to the process: the name becomes usable in
    :func:`solve`, :func:`get_solver` and :func:`available_solvers` (and, as
    the solver applied to the adjoint equation, as an adjoint), and a class
    registered earlier under the same name is replaced.

    Args:
        name: The name users pass as ``solver=...``; it is also stored as the
            class's ``name`` (and reported in :attr:`SolverStats.solver`).

    Returns:
        A decorator that registers the class and returns it unchanged.

    Raises:
        TypeError: (from the decorator) when the decorated object is not a
            subclass of :class:`Solver`.

    Examples:
        A built-in with another default, under a name unlikely to clash
        (registration is global):

        >>> import implicit
        >>> @implicit.register_solver("doc_example_damped_picard")
        ... class DampedPicard(implicit.get_solver("fixed_point")):
        ...     damping: float = 0.5
        >>> "doc_example_damped_picard" in implicit.available_solvers()
        True
        >>> implicit.get_solver("doc_example_damped_picard")().damping
        0.5
    """

    def decorate(cls: type[S]) -> type[S]:
        if not (isinstance(cls, type) and issubclass(cls, Solver)):
            raise TypeError(f"register_solver({name!r}) needs a subclass of implicit.Solver; got {cls!r}")
        cls.name = name
        _SOLVERS[name] = cls
        return cls

    return decorate


def register_adjoint(name: str) -> Callable[[type[A]], type[A]]:
    """Class decorator registering an :class:`AdjointSolver` subclass under ``name``.

    The registry is global to the process: the name becomes usable as
    ``adjoint=...`` in :func:`solve` and listed by :func:`available_adjoints`;
    a class registered earlier under the same name is replaced.

    Args:
        name: The name users pass as ``adjoint=...``; it is also stored as the
            class's ``name`` (and reported in :attr:`SolverStats.solver` of
            ``sol.adjoint_stats``).

    Returns:
        A decorator that registers the class and returns it unchanged.

    Raises:
        TypeError: (from the decorator) when the decorated object is not a
            subclass of :class:`AdjointSolver`.

    Examples:
        The built-in ``neumann`` with a larger default ``max_iter``, under a
        name unlikely to clash (registration is global):

        >>> import torch, implicit
        >>> @implicit.register_adjoint("doc_example_long_neumann")
        ... class LongNeumann(implicit.get_adjoint("neumann")):
        ...     max_iter: int = 1000
        >>> theta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        >>> sol = implicit.solve(implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z + theta), torch.zeros((), dtype=torch.float64), solver="fixed_point", adjoint="doc_example_long_neumann", tol=1e-10)
        >>> sol.z.backward()
        >>> round(theta.grad.item(), 8), sol.adjoint_stats.solver
        (2.0, 'doc_example_long_neumann')
    """

    def decorate(cls: type[A]) -> type[A]:
        if not (isinstance(cls, type) and issubclass(cls, AdjointSolver)):
            raise TypeError(f"register_adjoint({name!r}) needs a subclass of implicit.AdjointSolver; got {cls!r}")
        cls.name = name
        _ADJOINTS[name] = cls
        return cls

    return decorate


def _load_plugins(kind: str) -> None:
    """Load the entry points of one group once; a failing plugin only warns."""
    group = _GROUPS[kind]
    if group in _loaded:
        return
    _loaded.add(group)
    registry: dict[str, Any] = _SOLVERS if kind == "solver" else _ADJOINTS
    base = Solver if kind == "solver" else AdjointSolver
    for ep in entry_points(group=group):
        if ep.name in registry or (kind == "adjoint" and _builtin_solver(ep.name)):
            continue
        try:
            obj = ep.load()
            if not (isinstance(obj, type) and issubclass(obj, base)):
                raise TypeError(f"it points to {obj!r}, not a subclass of implicit.{base.__name__}")
        except Exception as exc:  # noqa: BLE001 - any failure of third-party code is reported, not raised
            warnings.warn(
                f"implicit: could not load {kind} plugin {ep.name!r} (entry point {ep.value!r} "
                f"in group {group!r}): {exc!r}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        if ep.name not in registry:
            obj.name = ep.name
            registry[ep.name] = obj


def _builtin_solver(name: str) -> bool:
    """Whether ``name`` is a solver of this package (usable as an adjoint without loading plugins)."""
    cls = _SOLVERS.get(name)
    return cls is not None and cls.__module__.startswith(__package__ + ".")


def available_solvers() -> list[str]:
    """Sorted names of every registered forward solver, plugins included.

    Lists the built-ins, the classes registered with :func:`register_solver`
    and those of the entry-point group ``implicit.solvers`` (loaded on the
    first call; a plugin that fails to load is left out with a warning).

    Returns:
        The names, each usable as ``solver=...`` and in :func:`get_solver`.

    Examples:
        >>> import implicit
        >>> {"anderson", "broyden", "fixed_point", "newton_krylov", "scipy"} <= set(implicit.available_solvers())
        True
    """
    _load_plugins("solver")
    return sorted(_SOLVERS)


def available_adjoints() -> list[str]:
    """Sorted names of every registered adjoint solver, plugins included.

    Every forward solver is also usable as an adjoint, under its own name,
    when no adjoint of that name exists (the adjoint equation is a linear
    fixed point); those names are listed too.

    Returns:
        The names, each usable as ``adjoint=...`` and in :func:`get_adjoint`.

    Examples:
        >>> import implicit
        >>> {"exact", "gmres", "jfb", "neumann"} <= set(implicit.available_adjoints())
        True
        >>> "anderson" in implicit.available_adjoints()  # a forward solver, run on the adjoint equation
        True
    """
    _load_plugins("adjoint")
    return sorted(set(_ADJOINTS) | set(available_solvers()))


def get_solver(name: str) -> type[Solver]:
    """The :class:`Solver` subclass registered under ``name``.

    Built-in names never load plugins; any other name loads the entry-point
    group ``implicit.solvers`` once.

    Args:
        name: A name listed by :func:`available_solvers`.

    Returns:
        The class itself (not an instance): call it with keyword options to
        configure it, or subclass it to change its defaults.

    Raises:
        RegistryError: (a ``ValueError`` and a ``LookupError``) for an unknown
            name, listing the names that exist and the closest match.

    Examples:
        >>> import implicit
        >>> Anderson = implicit.get_solver("anderson")
        >>> issubclass(Anderson, implicit.Solver), Anderson.name, Anderson(m=3).m
        (True, 'anderson', 3)
        >>> try:
        ...     implicit.get_solver("andersen")
        ... except LookupError as err:
        ...     print("did you mean 'anderson'?" in str(err))
        True
    """
    if name not in _SOLVERS:
        _load_plugins("solver")
    if name not in _SOLVERS:
        names = sorted(_SOLVERS)
        raise RegistryError(f"unknown solver {name!r}{_suggest(name, names)} Available: {', '.join(names)}")
    return _SOLVERS[name]


def get_adjoint(name: str) -> type[AdjointSolver]:
    """The :class:`AdjointSolver` subclass registered under ``name``.

    A forward solver's name gives that solver applied to the adjoint
    equation, when no adjoint of that name is registered.

    Args:
        name: A name listed by :func:`available_adjoints`.

    Returns:
        The class itself (not an instance): call it with keyword options
        (``tol``, ``max_iter``, ...) to configure it.

    Raises:
        RegistryError: (a ``ValueError`` and a ``LookupError``) for an unknown
            name, listing the names that exist and the closest match.

    Examples:
        >>> import implicit
        >>> GMRES = implicit.get_adjoint("gmres")
        >>> issubclass(GMRES, implicit.AdjointSolver), GMRES.approximate, GMRES(tol=1e-8).tol
        (True, False, 1e-08)
        >>> implicit.get_adjoint("jfb").approximate  # Jacobian-free backprop does not solve the adjoint equation
        True
    """
    if name not in _ADJOINTS and not _builtin_solver(name):
        _load_plugins("adjoint")
    if name in _ADJOINTS:
        return _ADJOINTS[name]
    if name in _SOLVERS or name in available_solvers():
        from .adjoints.from_solver import adjoint_from_solver

        return adjoint_from_solver(_SOLVERS[name])
    names = available_adjoints()
    raise RegistryError(f"unknown adjoint {name!r}{_suggest(name, names)} Available: {', '.join(names)}")


def _instantiate(cls: type, options: Mapping[str, Any], kind: str) -> Any:
    known = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else None
    if known is not None:
        for key in options:
            if key not in known:
                raise RegistryError(
                    f"unknown option {key!r} for {kind} {getattr(cls, 'name', cls.__name__)!r}{_suggest(key, known)} "
                    f"Options: {', '.join(known) if known else '(none)'}"
                )
    try:
        return cls(**options)
    except ValueError as exc:  # an invalid value: say whose option it is
        raise ValueError(f"{kind} {getattr(cls, 'name', '') or cls.__name__!r}: {exc}") from exc


def _make(spec: Any, options: Mapping[str, Any] | None, kind: str, base: type, get: Callable[[str], type]) -> Any:
    options = dict(options or {})
    if isinstance(spec, str):
        return _instantiate(get(spec), options, kind)
    if isinstance(spec, base):
        if not options:
            return spec
        _instantiate(type(spec), options, kind)  # validate the names
        return dataclasses.replace(spec, **options)  # type: ignore[type-var]
    if isinstance(spec, type) and issubclass(spec, base):
        return _instantiate(spec, options, kind)
    raise TypeError(
        f"{kind} must be a registered name, a subclass of implicit.{base.__name__} or an instance of one; got {spec!r}"
    )


def make_solver(spec: str | Solver | type[Solver], options: Mapping[str, Any] | None = None) -> Solver:
    """A configured :class:`Solver` from a name, a class or an instance, with ``options``."""
    return _make(spec, options, "solver", Solver, get_solver)


def make_adjoint(
    spec: str | AdjointSolver | type[AdjointSolver], options: Mapping[str, Any] | None = None
) -> AdjointSolver:
    """A configured :class:`AdjointSolver` from a name, a class or an instance, with ``options``."""
    return _make(spec, options, "adjoint", AdjointSolver, get_adjoint)
