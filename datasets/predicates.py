"""Split predicates: splits are data (JSON), not code.

Grammar (one JSON value):
    true                                   every row
    {"column": C, "eq": V} | {"column": C, "ne": V}
    {"column": C, "in": [V, ...]} | {"column": C, "not_in": [V, ...]}
    {"all": [P, ...]} | {"any": [P, ...]} | {"not": P}
Compiled to pyarrow compute expressions so Parquet reads can filter rows without Python loops.
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from .errors import DatasetError

_LEAF_OPS = ("eq", "ne", "in", "not_in")


def columns_of(pred: Any) -> set[str]:
    """Every column a predicate refers to."""
    if pred is True:
        return set()
    if isinstance(pred, dict):
        if "column" in pred:
            return {pred["column"]}
        if "all" in pred or "any" in pred:
            return set().union(*(columns_of(p) for p in pred.get("all", pred.get("any", []))))
        if "not" in pred:
            return columns_of(pred["not"])
    return set()


def check(pred: Any, where: str, known_columns: set[str]) -> None:
    """Raise DatasetError (naming `where`) unless `pred` is well formed over `known_columns`."""
    if pred is True:
        return
    if not isinstance(pred, dict) or not pred:
        raise DatasetError(f"{where}: a predicate must be true or an object, got {pred!r}")
    if "column" in pred:
        ops = [k for k in pred if k != "column"]
        if len(ops) != 1 or ops[0] not in _LEAF_OPS:
            raise DatasetError(f"{where}: a column predicate needs exactly one of {_LEAF_OPS}, got keys {sorted(pred)}")
        col = pred["column"]
        if col not in known_columns:
            raise DatasetError(
                f"{where}: predicate names column {col!r}, which does not exist (columns: {sorted(known_columns)})"
            )
        if ops[0] in ("in", "not_in") and not isinstance(pred[ops[0]], list):
            raise DatasetError(f"{where}: {ops[0]!r} needs a list, got {pred[ops[0]]!r}")
        return
    if len(pred) != 1:
        raise DatasetError(f"{where}: combine predicates with exactly one of all/any/not, got keys {sorted(pred)}")
    (op, arg), = pred.items()
    if op in ("all", "any"):
        if not isinstance(arg, list) or not arg:
            raise DatasetError(f"{where}.{op}: needs a non-empty list")
        for i, sub in enumerate(arg):
            check(sub, f"{where}.{op}[{i}]", known_columns)
    elif op == "not":
        check(arg, f"{where}.not", known_columns)
    else:
        raise DatasetError(f"{where}: unknown predicate operator {op!r}")


def to_expression(pred: Any) -> pc.Expression:
    """Compile a checked predicate to a pyarrow expression."""
    if pred is True:
        return pc.scalar(True)
    if "column" in pred:
        field = pc.field(pred["column"])
        if "eq" in pred:
            return field == pred["eq"]
        if "ne" in pred:
            return field != pred["ne"]
        if "in" in pred:
            return field.isin(pred["in"])
        return ~field.isin(pred["not_in"])
    if "all" in pred:
        expr = to_expression(pred["all"][0])
        for sub in pred["all"][1:]:
            expr = expr & to_expression(sub)
        return expr
    if "any" in pred:
        expr = to_expression(pred["any"][0])
        for sub in pred["any"][1:]:
            expr = expr | to_expression(sub)
        return expr
    return ~to_expression(pred["not"])


def evaluate_row(pred: Any, row: dict) -> bool:
    """Evaluate on one row dict (plate-level pruning and tests)."""
    if pred is True:
        return True
    if "column" in pred:
        value = row[pred["column"]]
        if "eq" in pred:
            return value == pred["eq"]
        if "ne" in pred:
            return value != pred["ne"]
        if "in" in pred:
            return value in pred["in"]
        return value not in pred["not_in"]
    if "all" in pred:
        return all(evaluate_row(p, row) for p in pred["all"])
    if "any" in pred:
        return any(evaluate_row(p, row) for p in pred["any"])
    return not evaluate_row(pred["not"], row)


def isin(column: str, values) -> dict:
    return {"column": column, "in": list(values)}


def eq(column: str, value) -> dict:
    return {"column": column, "eq": value}


def all_of(*preds) -> dict:
    preds = [p for p in preds if p is not True]
    return preds[0] if len(preds) == 1 else {"all": list(preds)}


# ---------------------------------------------------------------------------------------------
# can two predicates select a common row?
# ---------------------------------------------------------------------------------------------
_MAX_CONJUNCTS = 4096  # beyond this the question is left to the data


class _TooComplex(Exception):
    pass


def _nnf(pred: Any, negate: bool = False):
    """A checked predicate with negations pushed into the leaves: a bool, ("leaf", column, op, values),
    ("and", [...]) or ("or", [...]). Leaf values are frozensets ("eq" and "ne" become one-element sets)."""
    if pred is True:
        return not negate
    if "column" in pred:
        op = next(k for k in pred if k != "column")
        values = pred[op] if op in ("in", "not_in") else [pred[op]]
        try:
            values = frozenset(values)
        except TypeError:  # an unhashable value: nothing can be proven about this leaf
            raise _TooComplex from None
        positive = op in ("eq", "in")
        return ("leaf", pred["column"], positive != negate, values)
    if "not" in pred:
        return _nnf(pred["not"], not negate)
    op = "all" if "all" in pred else "any"
    kind = "and" if (op == "all") != negate else "or"
    return (kind, [_nnf(p, negate) for p in pred[op]])


def _bind(node, known: dict):
    """Substitute the columns whose value is known and simplify."""
    if isinstance(node, bool):
        return node
    if node[0] == "leaf":
        _, column, positive, values = node
        if column in known:
            return (known[column] in values) == positive
        return node
    items = [_bind(n, known) for n in node[1]]
    stop = node[0] == "or"  # the value that decides an "or" (True) or an "and" (False)
    if any(i is stop for i in items):
        return stop
    items = [i for i in items if i is not (not stop)]
    if not items:
        return not stop
    return items[0] if len(items) == 1 else (node[0], items)


def _dnf(node) -> list[list[tuple]]:
    if node is True:
        return [[]]
    if node is False:
        return []
    if node[0] == "leaf":
        return [[node]]
    if node[0] == "or":
        out = [c for n in node[1] for c in _dnf(n)]
    else:
        out = [[]]
        for n in node[1]:
            out = [a + b for a in out for b in _dnf(n)]
            if len(out) > _MAX_CONJUNCTS:
                raise _TooComplex
    if len(out) > _MAX_CONJUNCTS:
        raise _TooComplex
    return out


def _satisfiable(leaves: list[tuple], finite: dict[str, frozenset]) -> bool:
    allowed: dict[str, frozenset] = {}
    excluded: dict[str, set] = {}
    for _, column, positive, values in leaves:
        if positive:
            allowed[column] = allowed[column] & values if column in allowed else values
        else:
            excluded.setdefault(column, set()).update(values)
    for column in set(allowed) | set(excluded):
        domain = allowed.get(column, finite.get(column))
        if domain is not None and not domain - excluded.get(column, set()):
            return False
    return True


def overlap(a: Any, b: Any, known: dict | None = None, finite: dict[str, frozenset] | None = None) -> bool | None:
    """Can a row satisfy both checked predicates `a` and `b`, given the values of the `known` columns?

    False: no row can (proven from the predicates); True: every such row does; None: it depends on the
    values of other columns, so only the rows can tell. `finite` gives the domains of columns with few
    values (bool columns), so `ne True` with `ne False` is seen to be empty."""
    return overlaps(a, b, [known or {}], finite)[0]


def overlaps(a: Any, b: Any, knowns: list[dict], finite: dict[str, frozenset] | None = None) -> list[bool | None]:
    """`overlap` for each of `knowns` (e.g. every plate's plate-level columns), normalising the predicates once."""
    try:
        both = ("and", [_nnf(a), _nnf(b)])
    except _TooComplex:
        return [None] * len(knowns)
    out: list[bool | None] = []
    for known in knowns:
        node = _bind(both, known)
        try:
            if not isinstance(node, bool):
                node = False if not any(_satisfiable(c, finite or {}) for c in _dnf(node)) else None
        except _TooComplex:
            node = None
        out.append(node)
    return out
