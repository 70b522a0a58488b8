"""Per-element values kept at the size of what varies (per channel, per feature, or one scalar).

The compiler's units, biases, thresholds and bit-width bounds are logically per element of an
activation tensor, but almost always constant within a channel: storing them per element
costs memory and time that grow with the image size, not with the model. A *broadcast array*
here has the tensor's number of axes, and length 1 on every axis along which it is constant;
``np.broadcast_to(a, shape)`` gives the per-element values.
"""

from __future__ import annotations

import numpy as np


def squeeze_constant(a: np.ndarray, rtol: float = 0.0) -> np.ndarray:
    """``a`` with every axis along which it does not vary (within ``rtol``) cut to length 1 (same ndim)."""
    a = np.asarray(a)
    for axis in range(a.ndim):
        if a.shape[axis] > 1:
            first = np.take(a, [0], axis=axis)
            same = (np.array_equal(np.broadcast_to(first, a.shape), a) if rtol == 0
                    else np.allclose(a, first, rtol=rtol, atol=0))
            if same:
                a = first
    return a


def per_axis(values: object, ndim: int, axis: int) -> np.ndarray:
    """A scalar or a 1-D array of values along ``axis`` as a broadcast array of ``ndim`` axes (float64)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def reshape(a: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> np.ndarray:
    """The broadcast array of the values of ``a`` (broadcast to ``in_shape``) reshaped to ``out_shape``."""
    if a.size == 1:
        return np.asarray(a).reshape((1,) * len(out_shape))
    return squeeze_constant(np.broadcast_to(a, in_shape).reshape(out_shape))


def reduce_sum(a: np.ndarray, in_shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """Sum over ``axes`` (removed) of the values of ``a`` broadcast to ``in_shape``."""
    out = np.asarray(a)
    for axis in sorted(axes, reverse=True):
        out = out[(slice(None),) * axis + (0,)] * in_shape[axis] if out.shape[axis] == 1 else out.sum(axis=axis)
    return out
