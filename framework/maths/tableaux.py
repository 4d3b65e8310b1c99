"""Butcher tableaux of explicit Runge–Kutta methods, in σ or in λ = −log σ (the tableau solver's
data, ``plugins/solver/tableau.py``).

A tableau has nodes c, a strictly lower-triangular matrix a and weights b, one entry per stage.

- ``space: sigma`` — a classical explicit Runge–Kutta method on dx/dσ = (x − D)/σ, step
  Δ = σ' − σ: stage i is at σ_i = σ + c_i·Δ, x_i = x + Δ·Σ_j a_ij·k_j, k_i = (x_i − D(x_i, σ_i))/σ_i,
  and x' = x + Δ·Σ_i b_i·k_i. Entries are numbers (fractions such as ``1/3`` are allowed).
- ``space: lambda`` — an exponential Runge–Kutta method (Hochbruck & Ostermann 2005, 2010) in the
  data-prediction form of DPM-Solver++: in λ the ODE is dx/dλ = −x + D, a linear part −1 and the
  non-linear part D. With h = λ' − λ and z = −h, stage i is at σ_i = σ·e^(−c_i·h),
  x_i = e^(c_i·z)·x + h·Σ_j a_ij(z)·D_j, and x' = e^z·x + h·Σ_i b_i(z)·D_i. Entries are
  expressions in φ-functions (``framework.maths.exponential.phi``): ``phi1`` … ``phi9`` and ``exp``
  (φ₀) stand for φ_k(c_i·z) in row i of a (Hochbruck–Ostermann's φ_{k,i}) and for φ_k(z) in b;
  ``phi2(1/2)`` is φ₂(z/2) anywhere (the argument is a multiple of z). A number is a constant
  weight. The one-stage method b = [phi1] is DDIM (x' = D + (σ'/σ)·(x − D)).

Checks (each a one-line :class:`~framework.core.errors.ConfigError` naming the fix): one row of a per
weight, the method explicit (a_ij = 0 for j ≥ i), every row summing to its node (Σ_j a_ij = c_i;
for φ-weights in the limit h → 0), the weights summing to 1 (idem), σ-space nodes in [0, 1] (a
stage past σ' could reach σ ≤ 0), φ-functions only in λ. When c is omitted it is the row sums.

``TABLEAUX`` holds the presets: name → :class:`Preset` (tableau data, classical order, source).
"""
from __future__ import annotations

import ast
import difflib
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from framework.core.errors import ConfigError
from framework.maths.exponential import phi

SPACES = ("sigma", "lambda")
#: A coefficient as a function of z = −h (constant in σ-space).
Coefficient = Callable[[float], float]
_TOL = 1e-12
_PHI_NAMES = {f"phi{k}": k for k in range(10)} | {"exp": 0}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_HOW = ("write a number, a fraction such as 1/3, or (space: lambda) a combination of phi1..phi9 and exp, "
        "e.g. 'phi1 - 2*phi2' or 'phi2(1/2)'")


@dataclass(frozen=True)
class _Expr:
    """A parsed coefficient: ``fn(z)``, and whether it uses φ-functions at all."""

    fn: Coefficient
    uses_phi: bool
    literal_zero: bool


def _parse(value: Any, node: float, where: str) -> _Expr:
    """A tableau entry (number or expression string) as a function of z; ``node`` is the default
    multiple of z for bare ``phiK``/``exp`` (c_i in row i of a, 1 in b)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where} = {value!r} is not a coefficient: {_HOW}")
    if not isinstance(value, str):
        v = float(value)
        if not math.isfinite(v):
            raise ConfigError(f"{where} = {value!r} is not finite: {_HOW}")
        return _Expr(lambda z, v=v: v, False, v == 0.0)
    try:
        tree = ast.parse(value.strip(), mode="eval").body
    except SyntaxError:
        raise ConfigError(f"{where} = {value!r} cannot be read: {_HOW}") from None
    uses_phi = False

    def build(n: ast.AST) -> Coefficient:
        nonlocal uses_phi
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
            v = float(n.value)
            return lambda z: v
        if isinstance(n, ast.BinOp) and type(n.op) in _BINARY:
            op, left, right = _BINARY[type(n.op)], build(n.left), build(n.right)
            return lambda z: op(left(z), right(z))
        if isinstance(n, ast.UnaryOp) and type(n.op) in _UNARY:
            op1, inner = _UNARY[type(n.op)], build(n.operand)
            return lambda z: op1(inner(z))
        if isinstance(n, ast.Name) and n.id in _PHI_NAMES:
            uses_phi = True
            k = _PHI_NAMES[n.id]
            return lambda z: phi(k, node * z)
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _PHI_NAMES
                and len(n.args) == 1 and not n.keywords):
            before = uses_phi
            arg = build(n.args[0])
            if uses_phi != before:
                raise ConfigError(f"{where} = {value!r}: the argument of {n.func.id}(…) is a number (the multiple "
                                  f"of z = −h), e.g. {n.func.id}(1/2)")
            uses_phi = True
            k, scale = _PHI_NAMES[n.func.id], arg(0.0)
            return lambda z: phi(k, scale * z)
        raise ConfigError(f"{where} = {value!r} cannot be read: {_HOW}")

    fn = build(tree)
    try:
        at0, at1 = fn(0.0), fn(-1.0)
    except (ZeroDivisionError, OverflowError, ValueError) as e:
        raise ConfigError(f"{where} = {value!r} cannot be evaluated ({e}): {_HOW}") from None
    if not (math.isfinite(at0) and math.isfinite(at1)):
        raise ConfigError(f"{where} = {value!r} is not finite: {_HOW}")
    return _Expr(fn, uses_phi, not uses_phi and at0 == 0.0)


def _fmt(v: float) -> str:
    return f"{v:.6g}"


@dataclass(frozen=True)
class Tableau:
    """A checked explicit tableau. ``a[i]`` has i entries (stage i uses stages 0..i−1), ``used[i]``
    says whether stage i feeds a later stage or the result (stages that do not are never evaluated)."""

    space: str
    c: tuple[float, ...]
    a: tuple[tuple[Coefficient, ...], ...]
    b: tuple[Coefficient, ...]
    a_zero: tuple[tuple[bool, ...], ...]
    b_zero: tuple[bool, ...]
    used: tuple[bool, ...]

    @property
    def stages(self) -> int:
        return len(self.b)

    def weights(self, z: float = 0.0) -> tuple[list[list[float]], list[float]]:
        """(a(z), b(z)) as numbers; in σ-space z is ignored."""
        return [[f(z) for f in row] for row in self.a], [f(z) for f in self.b]


def _rows(a: Sequence[Sequence[Any]], s: int, space: str, nodes: Sequence[float]) -> list[list[_Expr]]:
    """The strictly lower part of a, parsed (bare phiK in row i is φ_k(c_i·z)); entries on or above
    the diagonal must be zero."""
    rows = []
    for i, row in enumerate(a):
        row = list(row or [])
        if len(row) > s:
            raise ConfigError(f"solver.a row {i + 1} has {len(row)} entries for {s} stages: give at most {s} (only the "
                              f"first {i} may be non-zero)")
        parsed = []
        for j, v in enumerate(row):
            e = _parse(v, nodes[i], f"solver.a[{i}][{j}]")
            if space == "sigma" and e.uses_phi:
                raise ConfigError(f"solver.a[{i}][{j}] = {v!r} uses φ-functions: those need space: lambda")
            if j >= i and (e.fn(0.0) != 0.0 or e.fn(-1.0) != 0.0):
                raise ConfigError(f"solver.a[{i}][{j}] = {v!r}: the tableau is not explicit (a_ij ≠ 0 for j ≥ i); "
                                  f"stage {i + 1} may use only the stages before it (row {i + 1} has {i} entries)")
            parsed.append(e)
        rows.append((parsed + [_parse(0, 0.0, "")] * i)[:i])
    return rows


def build(space: str, a: Sequence[Sequence[Any]] | None, b: Sequence[Any] | None,
          c: Sequence[Any] | None = None) -> Tableau:
    """A :class:`Tableau` from YAML-shaped data (rows of a, weights b, nodes c), checked."""
    space = str(space)
    if space not in SPACES:
        raise ConfigError(f"solver.space must be sigma or lambda, got {space!r}")
    if not b:
        raise ConfigError("solver.b is missing: give the weights b of your tableau (one per stage), e.g. b: [1/2, 1/2]")
    s = len(b)
    if a is None and s == 1:
        a = [[]]
    if a is None or len(a) != s:
        rows = "no" if a is None else len(a)
        raise ConfigError(f"solver.a has {rows} rows for {s} weights b: give one row per stage, the first one empty "
                          "([]), e.g. a: [[], [1]] for b: [1/2, 1/2]")
    # row sums at h → 0 do not depend on the node of bare φ's (φ_k(0) = 1/k!)
    sums = [sum(e.fn(0.0) for e in row) for row in _rows(a, s, space, [0.0] * s)]
    limit = " in the limit h → 0" if space == "lambda" else ""
    if c is None:
        nodes = sums
    else:
        if len(c) != s:
            raise ConfigError(f"solver.c has {len(c)} nodes for {s} stages: give one per stage (c_1 = 0), or omit c "
                              "(then c_i is the sum of row i of a)")
        parsed = [_parse(v, 0.0, f"solver.c[{i}]") for i, v in enumerate(c)]
        if any(n.uses_phi for n in parsed):
            raise ConfigError("solver.c: nodes are numbers (fractions such as 1/3), not φ-expressions")
        nodes = [n.fn(0.0) for n in parsed]
        for i, (total, node) in enumerate(zip(sums, nodes)):
            if abs(total - node) > _TOL * max(1.0, abs(node)):
                raise ConfigError(f"row {i + 1} of solver.a sums to {_fmt(total)}, not its node "
                                  f"c_{i + 1} = {_fmt(node)}"
                                  f"{limit}: rows of a Runge–Kutta tableau sum to their node (Σ_j a_ij = c_i); fix the "
                                  "row or the node")
    if nodes[0] != 0.0:
        raise ConfigError(f"solver.c_1 = {_fmt(nodes[0])}: the first stage of an explicit method is the step's start "
                          "(c_1 = 0)")
    if space == "sigma" and any(not 0.0 <= n <= 1.0 for n in nodes):
        raise ConfigError(f"solver.c = {[_fmt(n) for n in nodes]}: σ-space nodes must lie in [0, 1] (a stage past σ' "
                          "could reach σ ≤ 0)")
    if space == "lambda" and any(n < 0.0 for n in nodes):
        raise ConfigError(f"solver.c = {[_fmt(n) for n in nodes]}: nodes must be ≥ 0 (stages lie inside the step)")
    at = _rows(a, s, space, nodes)
    bt = []
    for i, v in enumerate(b):
        e = _parse(v, 1.0, f"solver.b[{i}]")
        if space == "sigma" and e.uses_phi:
            raise ConfigError(f"solver.b[{i}] = {v!r} uses φ-functions: those need space: lambda")
        bt.append(e)
    total = sum(e.fn(0.0) for e in bt)
    if abs(total - 1.0) > _TOL:
        raise ConfigError(f"solver.b sums to {_fmt(total)}, not 1{limit}: the weights of a consistent method sum to 1")
    used = [False] * s
    for i in reversed(range(s)):
        later = any(used[k] and not at[k][i].literal_zero for k in range(i + 1, s))
        used[i] = i == 0 or not bt[i].literal_zero or later
    return Tableau(space, tuple(nodes), tuple(tuple(e.fn for e in row) for row in at), tuple(e.fn for e in bt),
                   tuple(tuple(e.literal_zero for e in row) for row in at), tuple(e.literal_zero for e in bt),
                   tuple(used))


@dataclass(frozen=True)
class Preset:
    """A named tableau: its data as a user would write it, its classical order and where it is from."""

    space: str
    c: tuple[Any, ...]
    a: tuple[tuple[Any, ...], ...]
    b: tuple[Any, ...]
    order: int
    source: str

    def tableau(self) -> Tableau:
        return build(self.space, [list(r) for r in self.a], list(self.b), list(self.c))


# Hochbruck & Ostermann (2005), "Explicit exponential Runge–Kutta methods for semilinear parabolic
# problems", SIAM J. Numer. Anal. 43(3), the five-stage method of stiff order 4 (RES4LYF's res_5s).
# φ_{k,4} = φ_k(z) since c_4 = 1: written phiK(1); bare phiK in row 5 is φ_k(z/2).
_HO_A52 = "phi2/2 - phi3(1) + phi2(1)/4 - phi3/2"

TABLEAUX: dict[str, Preset] = {
    # --- σ-space: classical explicit Runge–Kutta methods on dx/dσ = (x − D)/σ -----------------------
    "euler": Preset("sigma", (0,), ((),), (1,), 1, "Euler's method"),
    "heun": Preset("sigma", (0, 1), ((), (1,)), ("1/2", "1/2"), 2,
                   "Heun's method (Karras et al. 2022, Alg. 1; = solver=heun)"),
    "ralston": Preset("sigma", (0, "2/3"), ((), ("2/3",)), ("1/4", "3/4"), 2,
                      "Ralston (1962), the second-order method of minimal error bound"),
    "kutta3": Preset("sigma", (0, "1/2", 1), ((), ("1/2",), (-1, 2)), ("1/6", "2/3", "1/6"), 3,
                     "Kutta's third-order method (1901)"),
    "bogacki_shampine": Preset("sigma", (0, "1/2", "3/4"), ((), ("1/2",), (0, "3/4")), ("2/9", "1/3", "4/9"), 3,
                               "Bogacki & Shampine (1989), the third-order solution (the FSAL error stage is not "
                               "evaluated)"),
    "rk4": Preset("sigma", (0, "1/2", "1/2", 1), ((), ("1/2",), (0, "1/2"), (0, 0, 1)), ("1/6", "1/3", "1/3", "1/6"), 4,
                  "the classical Runge–Kutta method (Kutta 1901)"),
    # --- λ-space: exponential Runge–Kutta methods, data prediction (x' = e^z·x + h·Σ b_i(z)·D_i) ----
    "ddim": Preset("lambda", (0,), ((),), ("phi1",), 1,
                   "exponential Euler = DDIM = DPM-Solver++(1) (Song et al. 2021; Lu et al. 2022b)"),
    "dpmpp_2s": Preset("lambda", (0, "1/2"), ((), ("phi1/2",)), (0, "phi1"), 2,
                       "DPM-Solver++(2S), r = 1/2 (Lu et al. 2022b, Alg. 1; = dpmpp_2s_ancestral with eta=0)"),
    "res_2s": Preset("lambda", (0, "1/2"), ((), ("phi1/2",)), ("phi1 - 2*phi2", "2*phi2"), 2,
                     "RES second order, c2 = 1/2: b2 = φ₂/c2 (Zhang et al. 2023, the Hochbruck–Ostermann second-order "
                     "conditions; RES4LYF res_2s)"),
    "res_3s": Preset("lambda", (0, "1/2", 1),
                     ((), ("phi1/2",), ("phi1 - 2*phi2(1/2) - 2*phi2", "2*phi2(1/2) + 2*phi2")),
                     ("phi1 - 5*phi2/3", "4*phi2/3", "phi2/3"), 3,
                     "RES third order, c2 = 1/2, c3 = 1, γ = (3c3³ − 2c3)/(c2(2 − 3c2)) = 4: a32 = γc2·φ_{2,2} + "
                     "(c3²/c2)·φ_{2,3}, b3 = φ₂/(γc2 + c3), b2 = γ·b3 (RES4LYF res_3s; classical limit: Kutta's "
                     "third order)"),
    "res_5s": Preset("lambda", (0, "1/2", "1/2", 1, "1/2"),
                     ((), ("phi1/2",), ("phi1/2 - phi2", "phi2"), ("phi1 - 2*phi2", "phi2", "phi2"),
                      ("phi1/2 - 3*phi2/4 + phi3(1) - phi2(1)/4 + phi3/2", _HO_A52, _HO_A52,
                       f"phi2/4 - ({_HO_A52})")),
                     ("phi1 - 3*phi2 + 4*phi3", 0, 0, "-phi2 + 4*phi3", "4*phi2 - 8*phi3"), 4,
                     "Hochbruck & Ostermann (2005), five stages, stiff order 4 (RES4LYF res_5s)"),
    "etdrk2": Preset("lambda", (0, 1), ((), ("phi1",)), ("phi1 - phi2", "phi2"), 2,
                     "ETD2RK (Cox & Matthews 2002, J. Comput. Phys. 176); = the Hochbruck–Ostermann second-order "
                     "method with c2 = 1"),
    "etdrk3": Preset("lambda", (0, "1/2", 1), ((), ("phi1/2",), ("-phi1", "2*phi1")),
                     ("phi1 - 3*phi2 + 4*phi3", "4*phi2 - 8*phi3", "-phi2 + 4*phi3"), 3,
                     "ETD3RK (Cox & Matthews 2002)"),
    "etdrk4": Preset("lambda", (0, "1/2", "1/2", 1),
                     ((), ("phi1/2",), (0, "phi1/2"), ("phi1(1/2) * (exp(1/2) - 1) / 2", 0, "phi1(1/2)")),
                     ("phi1 - 3*phi2 + 4*phi3", "2*phi2 - 4*phi3", "2*phi2 - 4*phi3", "-phi2 + 4*phi3"), 4,
                     "ETDRK4 (Cox & Matthews 2002; classical order 4, stiff order 2 in the worst case, Hochbruck & "
                     "Ostermann 2005)"),
    "lawson": Preset("lambda", (0, "1/2", "1/2", 1),
                     ((), ("exp/2",), (0, "1/2"), (0, 0, "exp(1/2)")),
                     ("exp/6", "exp(1/2)/3", "exp(1/2)/3", "1/6"), 4,
                     "Lawson RK4 (Lawson 1967, 'generalized Runge–Kutta processes'): the classical RK4 on the "
                     "integrating-factor variable e^λ·x, a_ij = a_ij·e^((c_i − c_j)z), b_i = b_i·e^((1 − c_i)z)"),
}


def preset(name: str) -> Tableau:
    """The checked tableau of a preset; an unknown name is a ConfigError with a did-you-mean."""
    if name not in TABLEAUX:
        close = difflib.get_close_matches(name, TABLEAUX, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"solver.preset: unknown tableau {name!r}: {hint}presets: {', '.join(TABLEAUX)} (or give "
                          "your own a, b, c and space with solver.preset=null)")
    return TABLEAUX[name].tableau()
