"""The quantized graph: the ONNX model after loading, as a small mutable-free structure that the
compiler passes rewrite (each pass builds a new node list; no list is mutated while iterated).

Internal op types created by passes (besides ONNX op types):

- ``Quant``: one activation quantizer ``y = scale * (clip(round(x / scale) + zero_point, lo, hi) - zero_point)``
  (attrs: scale, zero_point, lo, hi), the canonical form of QDQ / QCDQ.
- ``Linear``: ``y[o] = w_scale[o] * (W_int (*) x)[o] + bias[o]`` for a Conv (attrs kind='conv',
  strides, pads, dilations, group) or a dense layer over the last axis (kind='dense'), with
  integer weights ``w_int`` and float ``w_scale``/``bias`` per output channel (attrs hold arrays).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np

from csdc.ir.ops import narrowest


@dataclass(frozen=True)
class QNode:
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict = field(default_factory=dict)
    domain: str = ""

    def with_(self, **changes: object) -> "QNode":
        return replace(self, **changes)


class Dequantized:
    """A constant that dequantizes integer weights, ``ints * scale`` (float32 in ONNX), held as its
    integers: the float values are computed only when a pass asks for them (``np.asarray``), so the
    weights of a large quantized model are never held as floats. ``scale`` broadcasts against ``ints``."""

    __slots__ = ("ints", "scale")

    def __init__(self, ints: np.ndarray, scale: np.ndarray) -> None:
        self.ints, self.scale = ints, np.asarray(scale, dtype=np.float64)

    shape = property(lambda self: self.ints.shape)
    ndim = property(lambda self: self.ints.ndim)
    size = property(lambda self: self.ints.size)
    dtype = np.dtype(np.float32)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        # float64 products of small integers and float32 scales are exact: the cast rounds once, as float32 ONNX does
        out = np.asarray(self.ints * self.scale).astype(np.float32)  # a 0-d product is a scalar: make it an array
        return out if dtype is None else out.astype(dtype)


@dataclass
class QGraph:
    """Nodes in topological order, constant tensors, per-tensor shapes (with the batch axis)."""

    nodes: list[QNode]
    constants: dict[str, np.ndarray | Dequantized]  # read with np.asarray
    shapes: dict[str, tuple[int, ...]]
    input: str
    output: str
    path: str = "<model>"
    opset: int = 13
    # integer view of constants that came out of a DequantizeLinear: name -> (ints, scale, axis)
    qconstants: dict[str, tuple[np.ndarray, np.ndarray, int | None]] = field(default_factory=dict)
    # source node name -> what it became (for --explain); filled by passes and lowering
    provenance: dict[str, str] = field(default_factory=dict)
    # what passes report to the user (approximations they made), shown with the compile report
    warnings: list[str] = field(default_factory=list)
    # names of the model's nodes in source order, including those folded into constants by the frontend
    source_nodes: tuple[str, ...] = ()

    def with_nodes(self, nodes: Iterable[QNode]) -> "QGraph":
        return replace(self, nodes=list(nodes), constants=dict(self.constants), shapes=dict(self.shapes),
                       qconstants=dict(self.qconstants), provenance=dict(self.provenance),
                       warnings=list(self.warnings))

    def add_dequantized(self, name: str, ints: np.ndarray, scale: np.ndarray, axis: int | None) -> None:
        """Record the constant ``name = ints * scale`` (per tensor, or per index of ``axis``) with its integer view."""
        ints = narrowest(ints)
        scale = np.asarray(scale, dtype=np.float64)
        if scale.size == 1:
            axis, shaped = None, scale.reshape(())
        elif scale.ndim == 1 and isinstance(axis, int):
            shaped = scale.reshape([scale.size if d == axis else 1 for d in range(ints.ndim)])
        else:  # already broadcastable against the integers
            shaped = scale
        self.constants[name] = Dequantized(ints, shaped)
        self.qconstants[name] = (ints, scale.reshape(-1), axis)

    def producers(self) -> dict[str, QNode]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[QNode]]:
        out: dict[str, list[QNode]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def is_const(self, name: str) -> bool:
        return name in self.constants

    def sample_shape(self, name: str) -> tuple[int, ...]:
        """Shape without the batch axis."""
        return tuple(self.shapes[name][1:])
