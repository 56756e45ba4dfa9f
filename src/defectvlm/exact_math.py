"""sin, cos, exp and atan2 that give the same bits on every processor.

numpy picks a SIMD kernel for its transcendental functions at run time (AVX-512, AVX2 or the
baseline), and the kernels round differently: on one machine `np.sin` on float32 gives other
bits with AVX-512 switched off (`NPY_DISABLE_CPU_FEATURES`), and so did the demo images and the
tiny base's pretraining corpus from one CPU model to the next. The functions here are built from
IEEE-754 basic operations only (+, -, *, /, rint, ldexp, comparisons), which every processor
rounds the same way, in float64: accurate to a few units in the last place of float64, far below
what an 8-bit image can show, and bit-identical everywhere. The data generators use them in place
of numpy's and `math`'s transcendental functions; sqrt, hypot-free distances and the rest are
already exact.

Scalars in, Python floats out; arrays in, float64 arrays out.
"""

from __future__ import annotations

import math

import numpy as np

# pi/2 split in three parts (Cody-Waite): k * _PIO2_HI is exact for |k| < 2**20
_PIO2_HI = 1.57079632673412561417e00
_PIO2_MID = 6.07710050630396597660e-11
_PIO2_LO = 2.02226624871116645580e-21
_TWO_OVER_PI = 0.6366197723675814
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_TAN_PI_8 = 0.41421356237309503
_PI = 3.141592653589793
_PI_4 = 0.7853981633974483
_PI_8_COUNT = 24  # terms of the atan series for |t| <= tan(pi/8): 0.4142**49 / 49 < 1e-20


def _horner(t: np.ndarray, coefficients: tuple[float, ...]) -> np.ndarray:
    result = np.full_like(t, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result * t + c
    return result


# Taylor coefficients in r**2, |r| <= pi/4: the next term is below 1e-17
_SIN_TAYLOR = tuple((-1) ** n / math.factorial(2 * n + 1) for n in range(10))
_COS_TAYLOR = tuple((-1) ** n / math.factorial(2 * n) for n in range(11))
_EXP_TAYLOR = tuple(1 / math.factorial(n) for n in range(16))  # |r| <= ln2/2


def _as_float64(x) -> tuple[np.ndarray, bool]:
    array = np.asarray(x, dtype=np.float64)
    return array, array.ndim == 0


def _out(result: np.ndarray, scalar: bool):
    return float(result) if scalar else result


def _reduce_quadrant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x = k * pi/2 + r with |r| <= pi/4 (plus rounding); k mod 4 as integers."""
    if np.any(np.abs(x) > 2.0**19):
        raise ValueError("exact_math: |x| > 2**19 is outside the range this reduction keeps exact")
    k = np.rint(x * _TWO_OVER_PI)
    r = ((x - k * _PIO2_HI) - k * _PIO2_MID) - k * _PIO2_LO
    return r, k.astype(np.int64) & 3


def _sin_cos_reduced(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r2 = r * r
    return r * _horner(r2, _SIN_TAYLOR), _horner(r2, _COS_TAYLOR)


def sin(x):
    """sin(x), bit-identical on every IEEE-754 processor."""
    array, scalar = _as_float64(x)
    r, quadrant = _reduce_quadrant(array)
    s, c = _sin_cos_reduced(r)
    result = np.select([quadrant == 0, quadrant == 1, quadrant == 2], [s, c, -s], -c)
    return _out(result, scalar)


def cos(x):
    """cos(x), bit-identical on every IEEE-754 processor."""
    array, scalar = _as_float64(x)
    r, quadrant = _reduce_quadrant(array)
    s, c = _sin_cos_reduced(r)
    result = np.select([quadrant == 0, quadrant == 1, quadrant == 2], [c, -s, -c], s)
    return _out(result, scalar)


def exp(x):
    """exp(x), bit-identical on every IEEE-754 processor (0 below -745, inf above 709.7)."""
    array, scalar = _as_float64(x)
    clipped = np.clip(array, -746.0, 710.0)
    k = np.rint(clipped * _INV_LN2)
    r = (clipped - k * _LN2_HI) - k * _LN2_LO
    with np.errstate(over="ignore", under="ignore"):
        result = np.ldexp(_horner(r, _EXP_TAYLOR), k.astype(np.int32))
    return _out(result, scalar)


def _atan_unit(t: np.ndarray) -> np.ndarray:
    """atan(t) for 0 <= t <= 1."""
    high = t > _TAN_PI_8
    u = np.where(high, (t - 1.0) / (t + 1.0), t)  # atan(t) = pi/4 + atan((t-1)/(t+1))
    u2 = u * u
    series = u * _horner(u2, tuple((-1) ** n / (2 * n + 1) for n in range(_PI_8_COUNT)))
    return np.where(high, _PI_4 + series, series)


def atan2(y, x):
    """atan2(y, x) in [-pi, pi], bit-identical on every IEEE-754 processor; atan2(0, 0) = 0."""
    ys, y_scalar = _as_float64(y)
    xs, x_scalar = _as_float64(x)
    ys, xs = np.broadcast_arrays(ys, xs)
    ay, ax = np.abs(ys), np.abs(xs)
    big, small = np.maximum(ay, ax), np.minimum(ay, ax)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(big > 0, small / np.where(big > 0, big, 1.0), 0.0)
    angle = _atan_unit(t)
    angle = np.where(ay > ax, _PI / 2 - angle, angle)
    angle = np.where(xs < 0, _PI - angle, angle)
    angle = np.where(np.signbit(ys), -angle, angle)
    return _out(angle, y_scalar and x_scalar)
