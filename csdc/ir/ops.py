"""Operations of the spiking IR: one frozen dataclass per op.

Every op consumes tensors of a declared *kind* and produces one tensor:

- ``SPIKES``: a binary value per element and time step.
- ``TERNARY``: a signed spike, -1, 0 or +1 per element and time step (a :class:`TernaryNeuron`'s
  output; docs/signed_spikes.md).
- ``CURRENT``: an integer per element and time step.

Shapes never include the batch or time axes. ``Op.infer(in_shapes, in_kinds)`` checks the
inputs and returns the output shape; it raises :class:`csdc.errors.IRError` naming the
problem. Array parameters are integer numpy arrays, frozen (read-only) on construction;
synapse weights are ``mantissa * 2**exponent`` with the mantissa in the narrowest dtype the
compiler found (a model's own int8 weights stay int8), and values shared by a channel may be
a broadcast view of the per-channel array (memory and ``.sir`` size of the parameters, not of
the activations). The only floats are the input quantizer step of :class:`Encode` and the
dequantization of :class:`Readout`.

Timing (layer-synchronous semantics, SPEC section 3): every tensor is a sequence over
local steps 1..T. Synapses, pools, adds and routing ops act step by step (latency 0);
a :class:`Neuron` integrates steps 1..T and emits its T output steps after ``delay``
steps (latency ``delay``).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from csdc.errors import IRError

SPIKES = "spikes"
TERNARY = "ternary"
CURRENT = "current"

Shape = tuple[int, ...]

OP_REGISTRY: dict[str, type["Op"]] = {}

# Documented maxima (docs/robustness.md): every op checks its attributes against them on construction,
# so that no backend ever sees a value its int64 kernels or allocations cannot take.
T_MAX = 2**16  # time steps of a network (a quantizer with up to 65 536 levels)
DELAY_MAX = 2**20  # neuron delay in steps (a delay >= T is already exact)
WINDOW_MAX = 2**16  # kernel size, stride, dilation and padding entries of convolutions and pools
DIM_MAX = 2**31 - 1  # one axis of a tensor
ELEMENTS_MAX = 2**40  # elements of one tensor (products computed with Python integers: no wrap-around)
RANK_MAX = 16  # axes of a tensor
ENCODE_MAX = 2**24  # |lo|, |hi| of the input levels: exact in float32, where Encode clips
INT64_MAX = 2**63 - 1


def register_op(cls: type["Op"]) -> type["Op"]:
    """Add an op class to the registry used by serialization and backends."""
    OP_REGISTRY[cls.__name__] = cls
    return cls


def compact(arr: np.ndarray) -> np.ndarray:
    """The smallest array that ``np.broadcast_to(compact(arr), arr.shape)`` equals: axes of stride 0
    (a broadcast view) are cut to length 1. Same ndim; a view, no copy."""
    if not any(st == 0 and n > 1 for st, n in zip(arr.strides, arr.shape)):
        return arr
    return arr[tuple(slice(0, 1) if st == 0 else slice(None) for st in arr.strides)]


def narrowest(arr: np.ndarray) -> np.ndarray:
    """An integer array in the narrowest signed dtype that holds its values (itself if already so)."""
    if arr.dtype.kind not in "iu":
        return arr
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for dt in (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return arr if arr.dtype == dt else arr.astype(dt)
    return arr


def power_of_two_exponent(arr: np.ndarray) -> int:
    """Exponent of the largest power of two dividing every entry of an integer array (0 if all are
    zero): the trailing zeros of their bitwise OR (two's complement keeps those of negatives)."""
    bits = int(np.bitwise_or.reduce(arr, axis=None)) if arr.size else 0
    return (bits & -bits).bit_length() - 1 if bits else 0


def int_attr(value: object, name: str, lo: int, hi: int) -> int:
    """``value`` as a Python int if it is an integer (not a bool, float or string) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise IRError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    v = int(value)
    if not lo <= v <= hi:
        raise IRError(f"{name} must be in {lo}..{hi}, got {v}")
    return v


def shape_attr(value: object, name: str) -> Shape:
    """A tensor shape: a sequence of positive integers, at most ``RANK_MAX`` axes and ``ELEMENTS_MAX`` elements."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, np.ndarray)):
        raise IRError(f"{name} must be a list of integers, got {value!r}")
    if len(value) > RANK_MAX:
        raise IRError(f"{name} has {len(value)} axes, at most {RANK_MAX} are supported")
    dims = tuple(int_attr(d, f"{name} entry {i}", 1, DIM_MAX) for i, d in enumerate(value))
    elements = 1
    for d in dims:
        elements *= d
    if elements > ELEMENTS_MAX:
        raise IRError(f"{name} {dims} has {elements} elements, more than the supported {ELEMENTS_MAX}")
    return dims


def elements(shape: Shape) -> int:
    """Number of elements of ``shape`` (a Python int: never wraps)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _signed_dtype(arr: np.ndarray, name: str) -> np.dtype:
    """The signed integer dtype a parameter is kept in: its own if signed, else the narrowest that holds it."""
    if arr.dtype.kind == "i":
        return arr.dtype
    if arr.dtype.kind == "u":
        hi = int(arr.max()) if arr.size else 0
        for dt in (np.int8, np.int16, np.int32, np.int64):
            if hi <= np.iinfo(dt).max:
                return np.dtype(dt)
        raise IRError(f"parameter '{name}' exceeds the int64 range")
    if (arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
            and (arr.size == 0 or float(np.abs(arr).max()) <= 2.0**53)):  # integral and exact in float64
        return np.dtype(np.int64)
    raise IRError(f"parameter '{name}' must be an integer array, got dtype {arr.dtype}")


def _immutable(arr: np.ndarray) -> bool:
    """True if neither ``arr`` nor any array it views can be written (safe to share)."""
    base: object = arr
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    return base is None or isinstance(base, bytes)


def _int_array(value: object, name: str, dtype: type | None = None) -> np.ndarray:
    """A read-only integer parameter. Signed integer arrays keep their dtype unless ``dtype`` is given
    (weights stay as narrow as the source model stored them). A broadcast view (stride 0, e.g.
    per-channel values of a whole population) stays a view of its compact array, so it costs the
    compact array's memory. An array of the right dtype that nothing can write (read-only, and so is
    every array it views; e.g. a transposed view of a model's weights) is shared, not copied;
    anything else is copied (C order), never aliasing or freezing the caller's array."""
    arr = np.asarray(value)
    small = compact(arr)
    dt = np.dtype(dtype) if dtype is not None else _signed_dtype(small, name)
    if dtype is not None:
        _signed_dtype(small, name)  # validates integer values
    if not (small.dtype == dt and _immutable(small)):
        small = np.array(small, dtype=dt, order="C", copy=True)
        small.flags.writeable = False
    out = small if small.shape == arr.shape else np.broadcast_to(small, arr.shape)
    return out


def _float_array(value: object, name: str) -> np.ndarray:
    src = np.asarray(value)
    if src.dtype.kind not in "iuf":
        raise IRError(f"parameter '{name}' must be a numeric array, got dtype {src.dtype}")
    arr = np.array(src, dtype=np.float64, order="C", copy=True)  # own copy, as in _int_array
    if not np.all(np.isfinite(arr)):
        raise IRError(f"parameter '{name}' has non-finite values")
    arr.flags.writeable = False
    return arr


class Op:
    """Base class. Subclasses are frozen, slotted dataclasses registered with ``register_op``."""

    __slots__ = ()

    in_kinds: ClassVar[tuple[str, ...] | None] = None  # None: any number of inputs, kind checked in infer
    out_kind: ClassVar[str] = CURRENT

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        raise NotImplementedError

    def verify(self) -> None:
        """Check the op's own attributes and arrays (types and documented ranges); raise IRError naming the
        field. Called on construction, so an op that exists is valid; the network verifier checks the rest."""

    def output_kind(self, in_kinds: list[str]) -> str:
        return self.out_kind

    def _check_arity(self, in_shapes: list[Shape], in_kinds: list[str], allowed: tuple[tuple[str, ...], ...]) -> None:
        if len(in_shapes) != len(allowed):
            raise IRError(f"{type(self).__name__} takes {len(allowed)} input(s), got {len(in_shapes)}")
        for i, (kind, ok) in enumerate(zip(in_kinds, allowed)):
            if kind not in ok:
                raise IRError(f"{type(self).__name__} input {i} must carry {' or '.join(ok)}, got {kind}")

    def arrays(self) -> dict[str, np.ndarray]:
        """The array-valued parameters (serialized to the array store)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), np.ndarray)}

    def attributes(self) -> dict[str, object]:
        """The JSON-valued parameters."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, np.ndarray):
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


class _Weighted(Op):
    """Synapses with integer weights ``mantissa * 2**exponent``: a mantissa array of the narrowest
    dtype the compiler found and one power of two shared by the node (Loihi's weight exponent).
    The scale absorption multiplies integer weights by powers of two; keeping that factor apart keeps
    a compiled model's weights as small in memory and on disk as the source model's."""

    __slots__ = ()

    def _init_weight(self) -> None:
        object.__setattr__(self, "mantissa", _int_array(self.mantissa, "weight"))  # type: ignore[attr-defined]
        object.__setattr__(self, "exponent", int_attr(self.exponent, f"{type(self).__name__} weight exponent", 0, 62))  # type: ignore[attr-defined]

    def _verify_weight(self) -> None:
        """Every weight ``mantissa * 2**exponent`` fits int64 (checked with Python integers, which do not wrap)."""
        m = compact(self.mantissa)  # type: ignore[attr-defined]
        if m.size:
            e = self.exponent  # type: ignore[attr-defined]
            lo, hi = int(m.min()) << e, int(m.max()) << e
            if lo < -INT64_MAX - 1 or hi > INT64_MAX:
                raise IRError(f"weight mantissa in [{int(m.min())}, {int(m.max())}] times 2**{e} does not fit int64")
        if any(d < 1 for d in self.mantissa.shape):  # type: ignore[attr-defined]
            raise IRError(f"weight shape {self.mantissa.shape} has an empty axis")  # type: ignore[attr-defined]

    @property
    def weight(self) -> np.ndarray:
        """The integer weights ``mantissa * 2**exponent`` as a new int64 array."""
        w = self.mantissa.astype(np.int64)  # type: ignore[attr-defined]
        return w << self.exponent if self.exponent else w  # type: ignore[attr-defined]


def _pair(v: object, name: str) -> tuple[int, int]:
    # entries below 1 are reported by the op's verify(), which knows what they mean
    t = tuple(int_attr(x, f"'{name}'", -INT64_MAX, WINDOW_MAX) for x in (v if isinstance(v, (tuple, list)) else (v, v)))
    if len(t) != 2:
        raise IRError(f"'{name}' must have 2 entries, got {t}")
    return t  # type: ignore[return-value]


def _quad(v: object, name: str) -> tuple[int, int, int, int]:
    t = tuple(int_attr(x, f"'{name}'", -INT64_MAX, WINDOW_MAX) for x in (v if isinstance(v, (tuple, list)) else (v,) * 4))
    if len(t) != 4 or min(t) < 0:
        raise IRError(f"'{name}' must be 4 non-negative entries (top, left, bottom, right), got {t}")
    return t  # type: ignore[return-value]


def pool_output_hw(h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int, int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """Output spatial size of a convolution or pool window (floor mode)."""
    eh = dilation[0] * (kernel[0] - 1) + 1
    ew = dilation[1] * (kernel[1] - 1) + 1
    oh = (h + padding[0] + padding[2] - eh) // stride[0] + 1
    ow = (w + padding[1] + padding[3] - ew) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise IRError(f"window {kernel} with stride {stride}, padding {padding} does not fit input {h}x{w}")
    return oh, ow


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class Encode(Op):
    """Network input: ``q = clip(round_half_even(x / scale), lo, hi)`` applied to the data,
    delivered as the constant current ``q`` on every step 1..T ("direct encoding")."""

    shape: Shape
    scale: float
    lo: int
    hi: int

    in_kinds: ClassVar = ()
    out_kind: ClassVar = CURRENT

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", shape_attr(self.shape, "Encode shape"))
        object.__setattr__(self, "lo", int_attr(self.lo, "Encode lo", -ENCODE_MAX, ENCODE_MAX))
        object.__setattr__(self, "hi", int_attr(self.hi, "Encode hi", -ENCODE_MAX, ENCODE_MAX))
        if isinstance(self.scale, bool) or not isinstance(self.scale, (numbers.Real, np.floating, np.integer)):
            raise IRError(f"Encode 'scale' must be a number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        self.verify()

    def verify(self) -> None:
        # the data is divided by the scale in float32 (as ONNX QuantizeLinear): it must be a positive float32
        if not (self.scale > 0 and np.isfinite(self.scale) and np.float32(self.scale) > 0 and np.isfinite(np.float32(self.scale))):
            raise IRError(f"Encode scale must be positive and finite, got {self.scale} (it must also be a positive, finite float32)")
        if self.lo > self.hi:
            raise IRError(f"Encode range [{self.lo}, {self.hi}] is empty")

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ())
        return self.shape


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class DenseSynapse(_Weighted):
    """Fully connected synapses over the last axis: ``out[..., o] = sum_i weight[o, i] * in[..., i]``
    with ``weight = mantissa * 2**exponent``.

    A spike input adds column ``weight[:, i]`` (an accumulate, AC); a current input
    multiplies (MAC)."""

    mantissa: np.ndarray  # (out, in)
    exponent: int = 0

    def __post_init__(self) -> None:
        self._init_weight()
        self.verify()

    def verify(self) -> None:
        if self.mantissa.ndim != 2:
            raise IRError(f"DenseSynapse weight must be 2-D (out, in), got shape {self.mantissa.shape}")
        self._verify_weight()

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ((SPIKES, TERNARY, CURRENT),))
        shp = in_shapes[0]
        if len(shp) < 1 or shp[-1] != self.mantissa.shape[1]:
            raise IRError(f"DenseSynapse expects input (..., {self.mantissa.shape[1]}), got {shp}")
        return (*shp[:-1], self.mantissa.shape[0])


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class ConvSynapse(_Weighted):
    """2-D convolution synapses (cross-correlation, as ONNX Conv) on a (C, H, W) tensor, with
    ``weight = mantissa * 2**exponent``."""

    mantissa: np.ndarray  # (O, C // groups, kh, kw)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    exponent: int = 0

    def __post_init__(self) -> None:
        self._init_weight()
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))
        object.__setattr__(self, "padding", _quad(self.padding, "padding"))
        object.__setattr__(self, "dilation", _pair(self.dilation, "dilation"))
        object.__setattr__(self, "groups", int_attr(self.groups, "ConvSynapse groups", -INT64_MAX, DIM_MAX))
        self.verify()

    def verify(self) -> None:
        if self.mantissa.ndim != 4:
            raise IRError(f"ConvSynapse weight must be 4-D (O, C/groups, kh, kw), got {self.mantissa.shape}")
        self._verify_weight()  # also: O, C/groups, kh, kw >= 1
        if max(self.mantissa.shape[2:]) > WINDOW_MAX:
            raise IRError(f"ConvSynapse kernel {self.mantissa.shape[2:]} is larger than the supported {WINDOW_MAX}")
        if self.groups < 1 or self.mantissa.shape[0] % self.groups:
            raise IRError(f"ConvSynapse groups={self.groups} does not divide {self.mantissa.shape[0]} output channels")
        if min(self.stride) < 1 or min(self.dilation) < 1:
            raise IRError("ConvSynapse stride and dilation must be >= 1")

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ((SPIKES, TERNARY, CURRENT),))
        shp = in_shapes[0]
        if len(shp) != 3 or shp[0] != self.mantissa.shape[1] * self.groups:
            raise IRError(f"ConvSynapse expects input ({self.mantissa.shape[1] * self.groups}, H, W), got {shp}")
        oh, ow = pool_output_hw(shp[1], shp[2], self.mantissa.shape[2:], self.stride, self.padding, self.dilation)
        return (self.mantissa.shape[0], oh, ow)


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class DiagonalSynapse(_Weighted):
    """One-to-one synapses: ``out = weight * in`` elementwise (weight has the input's shape;
    per-channel weights are a broadcast view), ``weight = mantissa * 2**exponent``.

    Turns a spike tensor into a current in a chosen integer unit, e.g. a residual branch."""

    mantissa: np.ndarray
    exponent: int = 0

    def __post_init__(self) -> None:
        self._init_weight()
        self.verify()

    def verify(self) -> None:
        self._verify_weight()

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ((SPIKES, TERNARY),))
        if tuple(self.mantissa.shape) != tuple(in_shapes[0]):
            raise IRError(f"DiagonalSynapse weight shape {self.mantissa.shape} != input shape {in_shapes[0]}")
        return tuple(in_shapes[0])


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class Add(Op):
    """Sum of two or more currents of the same shape."""

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        if len(in_shapes) < 2:
            raise IRError(f"Add needs at least 2 inputs, got {len(in_shapes)}")
        for i, (s, k) in enumerate(zip(in_shapes, in_kinds)):
            if k != CURRENT:
                raise IRError(f"Add input {i} must carry {CURRENT}, got {k}")
            if tuple(s) != tuple(in_shapes[0]):
                raise IRError(f"Add input shapes differ: {in_shapes}")
        return tuple(in_shapes[0])


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class Neuron(Op):
    """A population of delayed integrate-and-fire neurons (paper Algorithm 1).

    Per neuron: ``v = v0``; for u in 1..T+D: if u <= T, ``v += I(u) + bias``; if u > D and
    ``v >= threshold``: emit a spike at output step u - D and ``v -= threshold``.
    For ``delay >= T`` the spike count is ``clip(floor((V + T*bias + v0) / threshold), 0, T)``,
    which is the quantizer the population replaces. ``delay = 0`` is the plain IF neuron.
    Arrays ``threshold``, ``v0`` and ``bias`` have the population's shape (int64; values shared by a
    channel are a broadcast view of the per-channel array).
    """

    threshold: np.ndarray
    v0: np.ndarray
    bias: np.ndarray
    delay: int

    out_kind: ClassVar = SPIKES

    def __post_init__(self) -> None:
        for name in ("threshold", "v0", "bias"):
            object.__setattr__(self, name, _int_array(getattr(self, name), name, np.int64))
        object.__setattr__(self, "delay", int_attr(self.delay, "Neuron delay", 0, DELAY_MAX))
        self.verify()

    def verify(self) -> None:
        if self.threshold.size and int(compact(self.threshold).min()) < 1:
            raise IRError(f"Neuron thresholds must be >= 1, got minimum {int(compact(self.threshold).min())}")
        if not (self.threshold.shape == self.v0.shape == self.bias.shape):
            raise IRError(f"Neuron threshold/v0/bias shapes differ: {self.threshold.shape}, {self.v0.shape}, {self.bias.shape}")

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ((CURRENT,),))
        if tuple(self.threshold.shape) != tuple(in_shapes[0]):
            raise IRError(f"Neuron parameters have shape {self.threshold.shape}, input has {in_shapes[0]}")
        return tuple(in_shapes[0])

    def with_delay(self, delay: int) -> "Neuron":
        return type(self)(self.threshold, self.v0, self.bias, delay)


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class TernaryNeuron(Neuron):
    """A population of delayed integrate-and-fire neurons with signed (ternary) spikes, for a
    quantizer symmetric around zero (docs/signed_spikes.md).

    Per neuron: ``v = v0``; for u in 1..T+D: if u <= T, ``v += I(u) + bias``; if u > D:
    ``v >= threshold`` emits +1 at output step u - D and ``v -= threshold``; ``v < 0`` emits -1
    and ``v += threshold``; otherwise 0. ``v`` is pulled back into ``[0, threshold)`` one
    threshold per step, so the neuron never emits both signs in a row without new input.
    For ``delay >= T`` the signed spike count is
    ``clip(floor((V + T*bias + v0) / threshold), -T, T)``: with ``v0 = floor(threshold / 2)`` the
    symmetric quantizer ``clip(round(x / s), -T, T)``, zero costing no spikes. Same parameters,
    integration and delay as :class:`Neuron` (it is one for delays, latency and the D >= T
    check); its output kind is ``TERNARY``.
    """

    out_kind: ClassVar = TERNARY


MBE_BASES_MAX = 64  # bases of one MBE neuron
MBE_STEPS_MAX = 64  # encoding steps of one MBE neuron (a 64-bit successive approximation at most)


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class MBENeuron(Op):
    """A population of multi-basis exponential-decay (MBE) neurons in integers (docs/mbe.md).

    Each element integrates its whole input window first, then encodes it with K bases over
    S steps (S <= T) and emits the decoded value as a current. Per element and basis n:
    ``u_n = v0 + sum_{u=1..T} I(u) + offset[n]``; for encoding step t = 1..S:
    ``s_n(t) = [u_n >= threshold[n, t]]``, ``u_n -= s_n(t) * reset[n, t]``; the output current at
    local step t is ``sum_n s_n(t) * weight[n, t]`` (0 for t > S), so the window's total is
    ``f(V) = sum_{n,t} s_n(t) weight[n, t]``: a spike of basis n at step t carries the output
    weight d_n(t) = ``weight[n, t]`` to the target. With ``threshold[n, t] = reset[n, t] =
    A_n 2^-t`` a basis is a successive-approximation (bit-serial) encoder: the paper's neuron with
    every time constant equal to dt / ln 2.

    Latency: the output's local step 1 follows the input's local step T (a delay of T: the value
    must be complete before its first bit is decided), whatever delay the DIF neurons have.
    ``threshold``, ``reset``, ``weight`` are (K, S) int64 shared by the population; ``offset`` (K,);
    ``v0`` has the population's shape (per-element constants: biases and zero points).
    """

    threshold: np.ndarray
    reset: np.ndarray
    weight: np.ndarray
    offset: np.ndarray
    v0: np.ndarray

    out_kind: ClassVar = CURRENT

    def __post_init__(self) -> None:
        for name in ("threshold", "reset", "weight", "offset", "v0"):
            object.__setattr__(self, name, _int_array(getattr(self, name), f"MBENeuron {name}", np.int64))
        self.verify()

    @property
    def bases(self) -> int:
        return int(self.threshold.shape[0])

    @property
    def steps(self) -> int:
        return int(self.threshold.shape[1])

    def verify(self) -> None:
        if self.threshold.ndim != 2 or not 1 <= self.threshold.shape[0] <= MBE_BASES_MAX \
                or not 1 <= self.threshold.shape[1] <= MBE_STEPS_MAX:
            raise IRError(f"MBENeuron threshold must be (bases, steps) with 1..{MBE_BASES_MAX} bases and "
                          f"1..{MBE_STEPS_MAX} steps, got shape {self.threshold.shape}")
        if self.reset.shape != self.threshold.shape or self.weight.shape != self.threshold.shape:
            raise IRError(f"MBENeuron threshold/reset/weight shapes differ: {self.threshold.shape}, "
                          f"{self.reset.shape}, {self.weight.shape}")
        if self.offset.shape != (self.bases,):
            raise IRError(f"MBENeuron offset must have one entry per basis ({self.bases}), got shape {self.offset.shape}")
        if int(self.threshold.min()) < 1:
            raise IRError(f"MBENeuron thresholds must be >= 1, got minimum {int(self.threshold.min())}")
        if int(self.reset.min()) < 0:
            raise IRError(f"MBENeuron resets must be >= 0, got minimum {int(self.reset.min())}")
        # |u| stays below |v0 + V + offset| + sum of the resets, every output step below sum |weight|:
        # keep each parameter far enough from int64's range that these sums cannot wrap
        for name in ("threshold", "reset", "weight", "offset"):
            arr = getattr(self, name)
            if int(np.abs(arr.astype(np.float64)).max()) > 2**47:
                raise IRError(f"MBENeuron {name} entries must be within +-2^47, got {int(np.abs(arr).max())}")

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ((CURRENT,),))
        if tuple(self.v0.shape) != tuple(in_shapes[0]):
            raise IRError(f"MBENeuron v0 has shape {self.v0.shape}, input has {in_shapes[0]}")
        return tuple(in_shapes[0])


class _Window(Op):
    """Shared attribute handling of the pooling ops (kernel, stride, padding on (C, H, W))."""

    __slots__ = ()

    def _normalize(self) -> None:
        object.__setattr__(self, "kernel", _pair(self.kernel, "kernel"))  # type: ignore[attr-defined]
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))  # type: ignore[attr-defined]
        object.__setattr__(self, "padding", _quad(self.padding, "padding"))  # type: ignore[attr-defined]
        self.verify()

    def verify(self) -> None:
        if min(self.kernel) < 1 or min(self.stride) < 1:  # type: ignore[attr-defined]
            raise IRError(f"{type(self).__name__} kernel and stride must be >= 1")

    def _infer_window(self, in_shapes: list[Shape], in_kinds: list[str], kinds: tuple[str, ...] = (SPIKES,)) -> Shape:
        self._check_arity(in_shapes, in_kinds, (kinds,))
        shp = in_shapes[0]
        if len(shp) != 3:
            raise IRError(f"{type(self).__name__} expects a (C, H, W) input, got {shp}")
        oh, ow = pool_output_hw(shp[1], shp[2], self.kernel, self.stride, self.padding)  # type: ignore[attr-defined]
        return (shp[0], oh, ow)


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class SpikeMaxPool(_Window):
    """Max pooling by temporal decomposition: ``y(t) = max_i C_i(t) - max_i C_i(t-1)`` over each
    window, with ``C`` the running spike counts. The output is binary and its count is the
    max of the input counts. Padding contributes count 0."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)

    out_kind: ClassVar = SPIKES

    def __post_init__(self) -> None:
        self._normalize()

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        if in_kinds[:1] == [TERNARY]:
            raise IRError("SpikeMaxPool takes binary spikes, got ternary (signed) spikes: its TDEC max assumes running "
                          "counts that never fall, with zero padding below every count; max-pool before the signed "
                          "quantizer instead (max-pooling commutes with a monotone quantizer)")
        return self._infer_window(in_shapes, in_kinds)


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class SumPool(_Window):
    """Sum of the spikes in each window (average pooling with 1/k absorbed downstream)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)

    out_kind: ClassVar = CURRENT

    def __post_init__(self) -> None:
        self._normalize()

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        return self._infer_window(in_shapes, in_kinds, (SPIKES, TERNARY))


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class ReduceSum(Op):
    """Sum of a current over the given axes (removed from the shape): the currents of many
    sources meeting on one dendrite. Adds only; e.g. a classifier on the token average of a
    transformer is one shared dense synapse per token followed by a sum over tokens."""

    axes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.axes, (tuple, list)):
            raise IRError(f"ReduceSum 'axes' must be a list of integers, got {self.axes!r}")
        object.__setattr__(self, "axes", tuple(sorted(int_attr(a, "ReduceSum axes", -INT64_MAX, RANK_MAX) for a in self.axes)))
        self.verify()

    def verify(self) -> None:
        if not self.axes or len(set(self.axes)) != len(self.axes) or min(self.axes) < 0:
            raise IRError(f"ReduceSum axes must be distinct non-negative axes, got {self.axes}")

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ((CURRENT,),))
        shp = tuple(in_shapes[0])
        if max(self.axes) >= len(shp) or len(self.axes) == len(shp):
            raise IRError(f"ReduceSum axes {self.axes} do not fit input {shp} (at least one axis must remain)")
        return tuple(n for i, n in enumerate(shp) if i not in self.axes)


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class SpikeMatMul(Op):
    """Product of two spike tensors by temporal decomposition (SPEC 2.4).

    Inputs ``A`` (..., M, K) and ``B`` (..., K, N) with equal leading axes, each binary or ternary
    spikes; output current (..., M, N): ``I(t) = weight * (A(t) C_B(t) + C_A(t-1) B(t))`` with
    running (signed) spike counts ``C(t) = sum_{u<=t} s(u)``. Every elementary operation adds
    (spike +1) or subtracts (spike -1) an accumulated count gated by a spike; summed over the
    window ``sum_t I(t) = weight * C_A(T) C_B(T)`` exactly.
    ``weight`` is the integer synaptic weight of every such event (the unit rescaling that the
    compiler would otherwise put into synapses)."""

    weight: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", int_attr(self.weight, "SpikeMatMul weight", -INT64_MAX, INT64_MAX))
        self.verify()

    def verify(self) -> None:
        if self.weight == 0:
            raise IRError("SpikeMatMul weight must be non-zero")

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ((SPIKES, TERNARY), (SPIKES, TERNARY)))
        a, b = tuple(in_shapes[0]), tuple(in_shapes[1])
        if len(a) < 2 or len(a) != len(b) or a[:-2] != b[:-2] or a[-1] != b[-2]:
            raise IRError(f"SpikeMatMul needs (..., M, K) x (..., K, N) with equal leading axes, got {a} x {b}")
        return (*a[:-1], b[-1])


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class Reshape(Op):
    """Routing: the same elements in a new shape (C order). Carries either kind."""

    shape: Shape

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", shape_attr(self.shape, "Reshape shape"))

    def output_kind(self, in_kinds: list[str]) -> str:
        return in_kinds[0]

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ((SPIKES, TERNARY, CURRENT),))
        if elements(in_shapes[0]) != elements(self.shape):
            raise IRError(f"Reshape from {in_shapes[0]} to {self.shape} changes the element count")
        return self.shape


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class Transpose(Op):
    """Routing: permute axes. Carries either kind."""

    perm: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.perm, (tuple, list)):
            raise IRError(f"Transpose 'perm' must be a list of integers, got {self.perm!r}")
        object.__setattr__(self, "perm", tuple(int_attr(p, "Transpose perm", -INT64_MAX, RANK_MAX) for p in self.perm))

    def output_kind(self, in_kinds: list[str]) -> str:
        return in_kinds[0]

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ((SPIKES, TERNARY, CURRENT),))
        shp = in_shapes[0]
        if sorted(self.perm) != list(range(len(shp))):
            raise IRError(f"Transpose perm {self.perm} does not fit input rank {len(shp)}")
        return tuple(shp[p] for p in self.perm)


@register_op
@dataclass(frozen=True, slots=True, eq=False)
class Readout(Op):
    """Network output: accumulates ``V = sum_t I(t)`` per class and reports the float
    logit ``V * scale + offset``."""

    scale: np.ndarray
    offset: np.ndarray

    in_kinds: ClassVar = (CURRENT,)
    out_kind: ClassVar = CURRENT

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _float_array(self.scale, "scale"))
        object.__setattr__(self, "offset", _float_array(self.offset, "offset"))
        self.verify()

    def verify(self) -> None:
        if self.scale.ndim != 1 or self.scale.shape != self.offset.shape:
            raise IRError(f"Readout scale/offset must be 1-D of equal length, got {self.scale.shape}, {self.offset.shape}")

    def infer(self, in_shapes: list[Shape], in_kinds: list[str]) -> Shape:
        self._check_arity(in_shapes, in_kinds, ((CURRENT,),))
        if tuple(in_shapes[0]) != (self.scale.shape[0],):
            raise IRError(f"Readout expects input ({self.scale.shape[0]},), got {in_shapes[0]}")
        return tuple(in_shapes[0])


def op_from_dict(op_name: str, attributes: dict[str, object], arrays: dict[str, np.ndarray]) -> Op:
    """Rebuild an op from its serialized parts; unknown op names are rejected."""
    cls = OP_REGISTRY.get(op_name)
    if cls is None:
        raise IRError(f"unknown op '{op_name}' (known: {', '.join(sorted(OP_REGISTRY))})")
    names = {f.name for f in dataclasses.fields(cls)}
    given = set(attributes) | set(arrays)
    if given != names:
        raise IRError(f"op {op_name}: fields {sorted(given)} do not match {sorted(names)}")
    kwargs: dict[str, object] = {}
    for k, v in attributes.items():
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    kwargs.update(arrays)
    return cls(**kwargs)  # type: ignore[arg-type]


def ops_equal(a: Op, b: Op) -> bool:
    """Structural equality of two ops (arrays compared exactly)."""
    if type(a) is not type(b) or a.attributes() != b.attributes():
        return False
    aa, ba = a.arrays(), b.arrays()
    return aa.keys() == ba.keys() and all(
        aa[k].shape == ba[k].shape and np.array_equal(aa[k], ba[k]) for k in aa
    )
