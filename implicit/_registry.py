"""Names of solvers and adjoints: built-ins, decorators and entry-point plugins.

One :class:`Registry` per kind, :data:`SOLVERS` and :data:`ADJOINTS`, filled
with the built-in names when ``implicit`` is imported.
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
from typing import Any, Generic, TypeVar

from ._adjoint import AdjointSolver
from ._solver import Solver

__all__ = [
    "ADJOINTS",
    "SOLVERS",
    "Registry",
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

S = TypeVar("S", bound=Solver)
A = TypeVar("A", bound=AdjointSolver)
T = TypeVar("T")


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


class Registry(Generic[T]):
    """Names of one kind of plugin (solvers, or adjoints): built-ins, registered classes and entry points.

    Built-in names are filled in when ``implicit`` is imported; the entry
    points of :attr:`group` load once, the first time a name that is not
    there is asked for or the names are listed. A registry may fall back to
    another one (adjoints to solvers: a forward solver serves as an adjoint
    through an adapter, :meth:`fall_back_to`).

    Args:
        kind: ``"solver"`` or ``"adjoint"``, as messages call them.
        base: The class every registered one must subclass.
        group: The entry-point group of plugins.
    """

    def __init__(self, kind: str, base: type[T], group: str) -> None:
        self.kind, self.base, self.group = kind, base, group
        self.classes: dict[str, type[T]] = {}
        self._loaded = False
        self._fallback: tuple[Registry[Any], Callable[[type], type[T]]] | None = None

    def fall_back_to(self, other: Registry[Any], adapt: Callable[[type], type[T]]) -> None:
        """Serve the names of ``other`` not registered here, as ``adapt(other's class)``."""
        self._fallback = (other, adapt)

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """A class decorator registering a subclass of :attr:`base` under ``name`` (replacing any earlier one)."""

        def decorate(cls: type[T]) -> type[T]:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(
                    f"register_{self.kind}({name!r}) needs a subclass of implicit.{self.base.__name__}; got {cls!r}"
                )
            cls.name = name  # type: ignore[attr-defined]
            self.classes[name] = cls
            return cls

        return decorate

    def load_plugins(self) -> None:
        """Load the entry points of :attr:`group` once; a plugin that fails to load only warns."""
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self.classes or self._builtin_fallback(ep.name):
                continue
            try:
                obj = ep.load()
                if not (isinstance(obj, type) and issubclass(obj, self.base)):
                    raise TypeError(f"it points to {obj!r}, not a subclass of implicit.{self.base.__name__}")
            except Exception as exc:  # noqa: BLE001 - any failure of third-party code is reported, not raised
                warnings.warn(
                    f"implicit: could not load {self.kind} plugin {ep.name!r} (entry point {ep.value!r} "
                    f"in group {self.group!r}): {exc!r}",
                    RuntimeWarning,
                    stacklevel=4,
                )
                continue
            if ep.name not in self.classes:
                obj.name = ep.name  # type: ignore[attr-defined]
                self.classes[ep.name] = obj

    def _builtin_fallback(self, name: str) -> bool:
        """Whether ``name`` is a built-in of the fallback registry (served without loading plugins)."""
        if self._fallback is None:
            return False
        cls = self._fallback[0].classes.get(name)
        return cls is not None and cls.__module__.startswith(__package__ + ".")

    def available(self) -> list[str]:
        """Every name, sorted: registered, from plugins, and those served by the fallback."""
        self.load_plugins()
        names = set(self.classes)
        if self._fallback is not None:
            names |= set(self._fallback[0].available())
        return sorted(names)

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``; :class:`RegistryError` listing the names if there is none."""
        if name not in self.classes and not self._builtin_fallback(name):
            self.load_plugins()
        if name in self.classes:
            return self.classes[name]
        if self._fallback is not None:
            other, adapt = self._fallback
            if name in other.classes or name in other.available():  # built-ins first: no plugin loaded
                return adapt(other.get(name))
        names = self.available()
        raise RegistryError(f"unknown {self.kind} {name!r}{_suggest(name, names)} Available: {', '.join(names)}")

    def make(self, spec: Any, options: Mapping[str, Any] | None = None) -> T:
        """A configured instance from a name, a class or an instance, with ``options`` (each checked)."""
        options = dict(options or {})
        if isinstance(spec, str):
            return self._instantiate(self.get(spec), options)
        if isinstance(spec, self.base):
            if not options:
                return spec
            self._instantiate(type(spec), options)  # validate the names
            return dataclasses.replace(spec, **options)  # type: ignore[type-var,no-any-return]
        if isinstance(spec, type) and issubclass(spec, self.base):
            return self._instantiate(spec, options)
        raise TypeError(
            f"{self.kind} must be a registered name, a subclass of implicit.{self.base.__name__} or an instance "
            f"of one; got {spec!r}"
        )

    def _instantiate(self, cls: type[T], options: Mapping[str, Any]) -> T:
        known = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else None
        label = getattr(cls, "name", "") or cls.__name__
        if known is not None:
            for key in options:
                if key not in known:
                    raise RegistryError(
                        f"unknown option {key!r} for {self.kind} {label!r}{_suggest(key, known)} "
                        f"Options: {', '.join(known) if known else '(none)'}"
                    )
        try:
            return cls(**options)
        except ValueError as exc:  # an invalid value: say whose option it is
            raise ValueError(f"{self.kind} {label!r}: {exc}") from exc


SOLVERS: Registry[Solver] = Registry("solver", Solver, "implicit.solvers")
ADJOINTS: Registry[AdjointSolver] = Registry("adjoint", AdjointSolver, "implicit.adjoints")
# The dicts behind them, and the entry-point group of each kind.
_SOLVERS = SOLVERS.classes
_ADJOINTS = ADJOINTS.classes
_GROUPS = {"solver": SOLVERS.group, "adjoint": ADJOINTS.group}


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

    return SOLVERS.register(name)  # type: ignore[return-value]


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

    return ADJOINTS.register(name)  # type: ignore[return-value]


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
    return SOLVERS.available()


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
    return ADJOINTS.available()


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
    return SOLVERS.get(name)


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
    return ADJOINTS.get(name)


def make_solver(spec: str | Solver | type[Solver], options: Mapping[str, Any] | None = None) -> Solver:
    """A configured :class:`Solver` from a name, a class or an instance, with ``options``."""
    return SOLVERS.make(spec, options)


def make_adjoint(
    spec: str | AdjointSolver | type[AdjointSolver], options: Mapping[str, Any] | None = None
) -> AdjointSolver:
    """A configured :class:`AdjointSolver` from a name, a class or an instance, with ``options``."""
    return ADJOINTS.make(spec, options)
