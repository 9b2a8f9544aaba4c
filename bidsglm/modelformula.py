"""Text of a BIDS Stats Model that other libraries would evaluate, checked first.

formulaic evaluates every factor of a formula as Python (``{...}`` blocks,
calls, attribute access), pandas evaluates Filter queries, and pybids' Split
builds a formula from the names it is given. A model is written by someone
else, so nothing of it reaches those evaluators unless it is in a small,
parsed subset:

- formulas: variable names (dotted names in backquotes), ``0``, ``1``,
  ``+``, ``-``, ``:``, ``*`` and parentheses;
- queries: comparisons of a variable with a number or a quoted string,
  joined by and/or/not (``&``, ``|``, ``~``);
- variable names: no quotes, backquotes, braces, parentheses or newlines.

Anything else is a ``FormulaError`` whose message says what was refused; the
model loader adds the node and field.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTED = re.compile(r"`([^`{}\\\n\r]+)`")
_UNSAFE_VARIABLE_CHARS = set("`'\"{}()\\;\n\r@#$%!&|^~<>")


class FormulaError(ValueError):
    """Text refused by the safe subset; the message says what and where."""


@dataclass(frozen=True)
class Term:
    """An interaction of variables (``a:b``); the empty term is the intercept."""

    factors: tuple[str, ...]


def _tokens(text: str) -> list[tuple[str, str]]:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "+-:*()":
            out.append(("op", ch))
            i += 1
        elif ch == "`":
            m = _QUOTED.match(text, i)
            if not m:
                raise FormulaError(f"unterminated or unsafe backquoted name at character {i + 1}")
            out.append(("name", m.group(1)))
            i = m.end()
        elif ch in "01" and (i + 1 == len(text) or not text[i + 1].isalnum()):
            out.append(("num", ch))
            i += 1
        else:
            m = _NAME.match(text, i)
            if not m:
                raise FormulaError(f"{ch!r} at character {i + 1} is not allowed (formulas may use variable "
                                   "names, `quoted names`, 0, 1, +, -, :, * and parentheses)")
            j = m.end()
            if j < len(text) and text[j] == ".":
                raise FormulaError(f"dotted name at character {i + 1}: write it in backquotes, "
                                   f"`{text[i:].split()[0]}`")
            if j < len(text) and text[j] in "([":
                raise FormulaError(f"{m.group(0)}{text[j]}...: function calls and indexing are not allowed")
            out.append(("name", m.group(0)))
            i = j
    return out


class _Parser:
    """expr := ['-'] term (('+'|'-') term)* ; term := atom ((':'|'*') atom)* ;
    atom := name | 0 | 1 | '(' expr ')'. Returns the terms added and removed."""

    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expr(self) -> tuple[list, list]:
        plus, minus = [], []
        sign = "+"
        if self.peek() == ("op", "-"):
            self.take()
            sign = "-"
        while True:
            terms = self.term()
            (plus if sign == "+" else minus).extend(terms)
            kind, value = self.peek()
            if kind == "op" and value in "+-":
                self.take()
                sign = value
                continue
            return plus, minus

    def term(self) -> list:
        result = self.atom()
        while self.peek() in (("op", ":"), ("op", "*")):
            _, op = self.take()
            right = self.atom()
            inter = [Term(tuple(dict.fromkeys(a.factors + b.factors))) for a in result for b in right]
            result = (result + right + inter) if op == "*" else inter
        return result

    def atom(self) -> list:
        kind, value = self.take()
        if kind == "name":
            return [Term((value,))]
        if kind == "num":
            return [Term(())] if value == "1" else [Term(("0",))]
        if (kind, value) == ("op", "("):
            plus, minus = self.expr()
            if self.take() != ("op", ")"):
                raise FormulaError("unbalanced parentheses")
            if minus:
                raise FormulaError("'-' inside parentheses is not allowed")
            return plus
        raise FormulaError(f"expected a variable, 0, 1 or '(' but found {value or 'the end'!r}")


def parse_formula(text: str) -> list[Term]:
    """The terms of a right-hand-side Wilkinson formula in the safe subset, in order,
    the intercept (``Term(())``) included unless removed by ``0`` or ``- 1``."""
    if not isinstance(text, str):
        raise FormulaError(f"must be a string, not {type(text).__name__}")
    if not text.strip():
        raise FormulaError("an empty formula")
    if "~" in text:
        raise FormulaError("only the right-hand side of a formula is allowed (no '~')")
    parser = _Parser(_tokens(text))
    plus, minus = parser.expr()
    if parser.i != len(parser.tokens):
        raise FormulaError(f"unexpected {parser.peek()[1]!r}")
    intercept = Term(())
    zero = Term(("0",))
    terms = [intercept] + [t for t in plus if t != zero]
    if zero in plus or intercept in minus:
        terms = [t for t in terms if t != intercept]
    terms = [t for t in dict.fromkeys(terms) if t not in minus]
    if any("0" in t.factors for t in terms):
        raise FormulaError("0 can only remove the intercept")
    return terms


def formulaic_text(terms: list[Term]) -> str:
    """The checked terms written back for formulaic: every name backquoted, so none is evaluated."""
    parts = ["1" if Term(()) in terms else "0"]
    parts += [":".join(f"`{f}`" for f in t.factors) for t in terms if t.factors]
    return " + ".join(parts)


def check_variable_name(name: str) -> None:
    """A variable name (Input, Output, By, X) that may reach a formula or query unchanged."""
    if not isinstance(name, str) or not name or set(name) & _UNSAFE_VARIABLE_CHARS:
        bad = sorted(set(name) & _UNSAFE_VARIABLE_CHARS) if isinstance(name, str) else []
        raise FormulaError(f"variable name {name!r} contains {' '.join(bad) or 'nothing usable'}; "
                           "names may not contain quotes, braces, parentheses or operators")


# --- Filter queries ----------------------------------------------------------------

_COMPARE = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)


def check_query(text: str, names: set[str]) -> None:
    """A Filter query pandas may evaluate: comparisons of the named variables with
    literals, combined with and/or/not (&, |, ~). No calls, attributes, subscripts,
    ``@`` locals or backquotes."""
    if not isinstance(text, str) or not text.strip():
        raise FormulaError("an empty query")
    if set(text) & set("`@{}\\;\n\r"):
        raise FormulaError(f"query {text!r}: backquotes, @, braces and backslashes are not allowed")
    # pybids renames non-identifier characters in the variable names to _ before pandas sees them
    mapped = text
    safe_names = set()
    for n in sorted(names, key=len, reverse=True):
        safe = re.sub("[^a-zA-Z0-9_]+", "_", n)
        mapped = mapped.replace(n, safe)
        safe_names.add(safe)
    try:
        tree = ast.parse(mapped.strip(), mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"query {text!r} is not an expression") from exc
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in safe_names:
                raise FormulaError(f"query {text!r} names {node.id!r}, not one of the transformation's "
                                   f"variables ({', '.join(sorted(names))})")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, str)) or isinstance(node.value, bool):
                raise FormulaError(f"query {text!r}: literal {node.value!r} is not a number or string")
        elif isinstance(node, (ast.List, ast.Tuple)):
            if not all(isinstance(e, ast.Constant) for e in node.elts):
                raise FormulaError(f"query {text!r}: lists may hold literals only")
        elif not isinstance(node, (ast.Expression, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Load,
                                   ast.And, ast.Or, ast.Not, ast.BitAnd, ast.BitOr, ast.Invert, ast.USub,
                                   *_COMPARE)):
            raise FormulaError(f"query {text!r}: {type(node).__name__} is not allowed (comparisons of "
                               "variables with numbers or strings, joined by and/or/not)")
        if isinstance(node, ast.BinOp) and not isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            raise FormulaError(f"query {text!r}: arithmetic is not allowed")
