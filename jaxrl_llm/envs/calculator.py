"""The built-in calculator tool: exact integer arithmetic on +, -, * and parentheses."""

from __future__ import annotations

import ast

_MAX_DIGITS = 40  # a bound on operands and results, so no call can hang on a huge product


def _value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
        left, right = _value(node.left), _value(node.right)
        if max(len(str(abs(left))), len(str(abs(right)))) > _MAX_DIGITS:
            raise ValueError(f"numbers are limited to {_MAX_DIGITS} digits")
        if isinstance(node.op, ast.Add):
            return left + right
        return left - right if isinstance(node.op, ast.Sub) else left * right
    raise ValueError("only integers, +, -, * and parentheses are allowed")


def calculator(expression: str) -> str:
    """Evaluate an integer arithmetic expression exactly.

    Args:
        expression: integers joined by +, -, * and parentheses, such as "123 * 45"
    """
    try:
        tree = ast.parse(str(expression).replace("×", "*"), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r} as arithmetic") from None
    result = _value(tree.body)
    if len(str(abs(result))) > _MAX_DIGITS:
        raise ValueError(f"numbers are limited to {_MAX_DIGITS} digits")
    return str(result)


BUILTIN_TOOLS = {"calculator": calculator}
