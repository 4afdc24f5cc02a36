"""Elementwise arithmetic, activations, comparisons and logic, MatMul, Gemm and Einsum."""

from __future__ import annotations

import functools

import numpy as np

from q4c.errors import UnsupportedOpError
from q4c.interp.registry import op

# --- binary arithmetic (numpy broadcasting since opset 7) -----------------------------------


@op("Add", since=7)
def add(a, b):
    return (np.add(a, b),)


@op("Sub", since=7)
def sub(a, b):
    return (np.subtract(a, b),)


@op("Mul", since=7)
def mul(a, b):
    return (np.multiply(a, b),)


@op("Div", since=7)
def div(a, b):
    if a.dtype.kind in "iu":
        return (_int_divide(a, b),)
    return (np.divide(a, b),)


def _int_divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C-style integer division (truncation toward zero), as ONNX Runtime computes it."""
    with np.errstate(divide="ignore"):
        q = np.floor_divide(a, b)
        if a.dtype.kind == "i":
            q = q + ((np.remainder(a, b) != 0) & ((a < 0) != (b < 0))).astype(q.dtype)
    return q


@op("Pow", since=7)
def pow_(x, y):
    # Pow-12+: the result has the base's type whatever the exponent's type.
    if x.dtype == y.dtype and not (x.dtype.kind in "iu" and np.any(y < 0)):
        return (np.power(x, y),)
    if x.dtype.kind == "f":
        return (np.power(x, y.astype(x.dtype)),)
    return (np.power(x.astype(np.float64), y.astype(np.float64)).astype(x.dtype),)


@op("Mod", since=10)
def mod_10(a, b, *, fmod: int = 0):
    if not fmod and a.dtype.kind == "f":
        raise UnsupportedOpError("Mod-10 with fmod=0 on floating-point inputs is invalid (set fmod=1)")
    return mod(a, b, fmod=fmod)


@op("Mod", since=28)
def mod(a, b, *, fmod: int = 0):
    # Mod-28 defines fmod=0 on floats too: a - floor(a / b) * b, numpy's np.mod.
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((np.fmod if fmod else np.mod)(a, b),)


# --- unary math ---------------------------------------------------------------------------


def _unary(name: str, since: int, fn):
    def impl(x):
        return (fn(x),)

    impl.__name__ = impl.__qualname__ = name
    return op(_CAMEL[name], since=since)(impl)


_CAMEL = {
    "sqrt": "Sqrt", "exp": "Exp", "log": "Log", "abs": "Abs", "neg": "Neg", "floor": "Floor",
    "ceil": "Ceil", "sin": "Sin", "cos": "Cos", "tan": "Tan", "asin": "Asin", "acos": "Acos",
    "atan": "Atan", "sinh": "Sinh", "cosh": "Cosh", "asinh": "Asinh", "acosh": "Acosh",
    "atanh": "Atanh", "tanh": "Tanh", "sign": "Sign", "is_nan": "IsNaN", "not_": "Not",
    "softsign": "Softsign", "reciprocal": "Reciprocal", "round": "Round", "erf": "Erf",
}


def _errstate(fn):
    @functools.wraps(fn)
    def quiet(x):
        with np.errstate(all="ignore"):
            return fn(x)

    return quiet


sqrt = _unary("sqrt", 6, _errstate(np.sqrt))
exp = _unary("exp", 6, _errstate(np.exp))
log = _unary("log", 6, _errstate(np.log))
abs_ = _unary("abs", 6, np.abs)
neg = _unary("neg", 6, np.negative)
floor = _unary("floor", 6, np.floor)
ceil = _unary("ceil", 6, np.ceil)
reciprocal = _unary("reciprocal", 6, _errstate(lambda x: np.divide(x.dtype.type(1), x)))
round_ = _unary("round", 11, np.round)  # np.round rounds half to even, as Round-11 specifies
sin = _unary("sin", 7, np.sin)
cos = _unary("cos", 7, np.cos)
tan = _unary("tan", 7, np.tan)
asin = _unary("asin", 7, _errstate(np.arcsin))
acos = _unary("acos", 7, _errstate(np.arccos))
atan = _unary("atan", 7, np.arctan)
sinh = _unary("sinh", 9, _errstate(np.sinh))
cosh = _unary("cosh", 9, _errstate(np.cosh))
asinh = _unary("asinh", 9, np.arcsinh)
acosh = _unary("acosh", 9, _errstate(np.arccosh))
atanh = _unary("atanh", 9, _errstate(np.arctanh))
tanh = _unary("tanh", 6, np.tanh)
sign = _unary("sign", 9, np.sign)
is_nan = _unary("is_nan", 9, np.isnan)
not_ = _unary("not_", 1, np.logical_not)
softsign = _unary("softsign", 1, lambda x: x / (1 + np.abs(x)))


@op("IsInf", since=10)
def is_inf(x, *, detect_negative: int = 1, detect_positive: int = 1):
    return (np.isinf(x) & (((x > 0) & bool(detect_positive)) | ((x < 0) & bool(detect_negative))),)


# Maclaurin coefficients of erf(z) * sqrt(pi) / 2 in powers of z^2: (-1)^n / (n! (2n + 1)).
_ERF_SERIES = [(-1) ** n / (np.prod(np.arange(1, n + 1, dtype=np.float64)) * (2 * n + 1)) for n in range(10)]
# Numerical Recipes' erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z / 2): relative error < 1.2e-7.
_ERFC_POLY = [-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
              1.48851587, -0.82215223, 0.17087277]


def erf_array(x: np.ndarray) -> np.ndarray:
    """erf computed in float64, then cast back: numpy has no erf.

    |x| < 0.5: the Maclaurin series (error < 1e-13); beyond: 1 - erfc with Numerical Recipes'
    erfc, relative error < 1.2e-7. Both sit below float32 resolution.
    """
    z = np.asarray(x, dtype=np.float64)
    out = np.empty_like(z)
    a = np.abs(z)
    small = a < 0.5
    zs = z[small]
    z2 = zs * zs
    series = np.full_like(zs, _ERF_SERIES[-1])
    for c in reversed(_ERF_SERIES[:-1]):
        series *= z2
        series += c
    out[small] = series * zs * (2.0 / np.sqrt(np.pi))
    large = ~small
    al = a[large]
    t = 1.0 / (1.0 + 0.5 * al)
    poly = np.full_like(al, _ERFC_POLY[-1])
    for c in reversed(_ERFC_POLY[:-1]):
        poly *= t
        poly += c
    poly -= al * al
    with np.errstate(under="ignore"):
        erfc = t * np.exp(poly)
    out[large] = np.copysign(1.0 - erfc, z[large])
    return out.astype(x.dtype) if x.dtype.kind == "f" else out


erf = _unary("erf", 9, erf_array)


# --- activations --------------------------------------------------------------------------


def sigmoid_array(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) written as 0.5 * tanh(x / 2) + 0.5: same value, no overflow for x << 0.

    Half-precision inputs are computed in float32 and rounded once at the end.
    """
    if x.dtype.itemsize < 4:
        return sigmoid_array(x.astype(np.float32)).astype(x.dtype)
    y = np.tanh(x * x.dtype.type(0.5))
    y *= 0.5
    y += 0.5
    return y


@op("Sigmoid", since=6)
def sigmoid(x):
    return (sigmoid_array(x),)


@op("Relu", since=6)
def relu(x):
    return (np.maximum(x, x.dtype.type(0)),)


@op("LeakyRelu", since=6)
def leaky_relu(x, *, alpha: float = 0.01):
    return (np.where(x < 0, x * x.dtype.type(alpha), x),)


@op("PRelu", since=7)
def prelu(x, slope):
    return (np.where(x < 0, x * slope, x).astype(x.dtype, copy=False),)


@op("ThresholdedRelu", since=10)
def thresholded_relu(x, *, alpha: float = 1.0):
    return (np.where(x > x.dtype.type(alpha), x, x.dtype.type(0)),)


@op("Elu", since=6)
def elu(x, *, alpha: float = 1.0):
    with np.errstate(over="ignore"):
        return (np.where(x < 0, x.dtype.type(alpha) * np.expm1(x), x),)


@op("Celu", since=12)
def celu(x, *, alpha: float = 1.0):
    a = x.dtype.type(alpha)
    with np.errstate(over="ignore"):
        return (np.maximum(x, 0) + np.minimum(0, a * np.expm1(x / a)),)


@op("Selu", since=6)
def selu(x, *, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875):
    a, g = x.dtype.type(alpha), x.dtype.type(gamma)
    with np.errstate(over="ignore"):
        return (np.where(x <= 0, g * (a * np.exp(x) - a), g * x),)


@op("HardSigmoid", since=6)
def hard_sigmoid(x, *, alpha: float = 0.2, beta: float = 0.5):
    return (np.clip(x * x.dtype.type(alpha) + x.dtype.type(beta), 0, 1).astype(x.dtype, copy=False),)


@op("HardSwish", since=14)
def hard_swish(x):
    gate = np.clip(x * x.dtype.type(1 / 6) + x.dtype.type(0.5), 0, 1).astype(x.dtype, copy=False)
    return (x * gate,)


@op("Softplus", since=1)
def softplus(x):
    return (np.logaddexp(x.dtype.type(0), x),)


@op("Mish", since=18)
def mish(x):
    return (x * np.tanh(np.logaddexp(x.dtype.type(0), x)),)


@op("Swish", since=24)
def swish(x, *, alpha: float = 1.0):
    return (x * sigmoid_array(x * x.dtype.type(alpha)),)


@op("Gelu", since=20)
def gelu(x, *, approximate: str = "none"):
    half = x.dtype.type(0.5)
    if approximate == "tanh":
        inner = x.dtype.type(np.sqrt(2 / np.pi)) * (x + x.dtype.type(0.044715) * x * x * x)
        return (half * x * (1 + np.tanh(inner)),)
    if approximate != "none":
        raise UnsupportedOpError(f"Gelu approximate='{approximate}' (expected 'none' or 'tanh')")
    return (half * x * (1 + erf_array(x * x.dtype.type(1 / np.sqrt(2)))),)


@op("Shrink", since=9)
def shrink(x, *, bias: float = 0.0, lambd: float = 0.5):
    y = np.where(x < -lambd, x + bias, np.where(x > lambd, x - bias, 0))
    return (y.astype(x.dtype),)


@op("Clip", since=6)
def clip_6(x, *, max: float = 3.4028234663852886e38, min: float = -3.4028234663852886e38):  # noqa: A002
    return (np.minimum(np.maximum(x, x.dtype.type(min)), x.dtype.type(max)),)


@op("Clip", since=11)
def clip(x, min=None, max=None):  # noqa: A002
    # "When 'min' is greater than 'max', the clip operator sets all the 'input' values to 'max'."
    y = x if min is None else np.maximum(x, min)
    y = y if max is None else np.minimum(y, max)
    return (y if y is not x else x.copy(),)


# --- variadic (numpy broadcasting since opset 8) ----------------------------------------------


@op("Max", since=8)
def max_(*data):
    return (functools.reduce(np.maximum, data),)


@op("Min", since=8)
def min_(*data):
    return (functools.reduce(np.minimum, data),)


@op("Sum", since=8)
def sum_(*data):
    return (functools.reduce(np.add, data),)


@op("Mean", since=8)
def mean(*data):
    total = functools.reduce(np.add, data)
    return ((total / total.dtype.type(len(data))).astype(total.dtype, copy=False),)


# --- comparisons and logic ------------------------------------------------------------------


@op("Equal", since=7)
def equal(a, b):
    return (np.equal(a, b),)


@op("Less", since=7)
def less(a, b):
    return (np.less(a, b),)


@op("Greater", since=7)
def greater(a, b):
    return (np.greater(a, b),)


@op("LessOrEqual", since=12)
def less_or_equal(a, b):
    return (np.less_equal(a, b),)


@op("GreaterOrEqual", since=12)
def greater_or_equal(a, b):
    return (np.greater_equal(a, b),)


@op("And", since=7)
def and_(a, b):
    return (np.logical_and(a, b),)


@op("Or", since=7)
def or_(a, b):
    return (np.logical_or(a, b),)


@op("Xor", since=7)
def xor(a, b):
    return (np.logical_xor(a, b),)


@op("BitShift", since=11)
def bit_shift(x, y, *, direction: str):
    return ((np.left_shift if direction == "LEFT" else np.right_shift)(x, y),)


@op("Where", since=9)
def where(condition, x, y):
    return (np.where(condition, x, y),)


# --- linear algebra ---------------------------------------------------------------------------


@op("MatMul", since=1)
def mat_mul(a, b):
    return (np.matmul(a, b).astype(a.dtype, copy=False),)  # ml_dtypes' bfloat16 matmul widens


@op("Gemm", since=7)
def gemm(a, b, c=None, *, alpha: float = 1.0, beta: float = 1.0, transA: int = 0, transB: int = 0):  # noqa: N803
    a = a.T if transA else a
    b = b.T if transB else b
    y = np.matmul(a, b)
    if alpha != 1.0:
        y = y * y.dtype.type(alpha)
    if c is not None and beta != 0.0:
        y = y + (c if beta == 1.0 else c * c.dtype.type(beta))
    return (y.astype(a.dtype, copy=False),)


@op("Einsum", since=12)
def einsum(*inputs, equation: str):
    equation = equation.replace(" ", "")
    dtype = inputs[0].dtype
    if dtype.kind == "V":  # ml_dtypes' bfloat16: numpy's einsum does not take it
        inputs = tuple(x.astype(np.float32) for x in inputs)
    y = np.einsum(equation, *inputs, optimize=len(inputs) > 2)
    return (np.asarray(y).astype(dtype, copy=False),)
