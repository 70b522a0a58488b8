"""Custom Lava processes (fixed-point ``PyLoihiProcessModel``s) for what Lava 0.10 lacks.

This module depends only on numpy, scipy and lava-nc (it is copied verbatim into Lava
deployment bundles), never on csdc.

Global-clock schedule. Lava runs all processes in lock step; global step ``g`` = Lava's
``time_step`` (1-based). Samples are pipelined: sample ``k`` enters the network at global
step ``1 + k * period`` and every process works on it during its own window, which starts at
``start + k * period`` where ``start`` is the global step at which local step 1 of the
process's *input* arrives. A process is idle (and sends zeros) outside its windows, so
consecutive samples never interact; ``period >= T + max delay`` guarantees the windows of one
process do not overlap, and every process resets its state at local step 1.

Latencies (global steps from input local step t to output local step t):
``CsdcEncode`` -, ``CsdcNeuron``, ``CsdcTernaryNeuron`` and their two-word forms ``delay``,
``CsdcMaxPool`` 0, ``CsdcDelay`` ``steps``,
``CsdcSynapse`` and ``CsdcSpikeMatMul`` 1 (like Lava's Dense/Sparse/Conv, whose output at
step g is the synaptic input of step g - 1), ``CsdcReadout`` -.

Results leave the processes through Lava ``Var``s. ``Var.get()`` moves one float64 per element
(about 45 microseconds each in Lava 0.10), so spike trains and counts are bit-packed into
48-bit words (exact in float64) with :func:`pack_uint` and unpacked with :func:`unpack_uint`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from . import _hook

_hook.prepare_lava()

from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.process.ports.ports import InPort, OutPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.process.variable import Var
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol

WORD_BITS = 48  # bits per packed word: integers below 2**53 survive Var.get()'s float64


# -- bit packing ------------------------------------------------------------------------
def packed_words(n_values: int, bits: int) -> int:
    """Number of 48-bit words that hold ``n_values`` unsigned integers of ``bits`` bits."""
    return max(1, -(-n_values * bits // WORD_BITS))


def pack_uint(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers (< 2**bits) into int64 words of 48 bits (little-endian bits)."""
    flat = np.ascontiguousarray(values, dtype=np.int64).ravel()
    bitarr = ((flat[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.int64).ravel()
    n_words = packed_words(flat.size, bits)
    padded = np.zeros(n_words * WORD_BITS, dtype=np.int64)
    padded[: bitarr.size] = bitarr
    return padded.reshape(n_words, WORD_BITS) @ (np.int64(1) << np.arange(WORD_BITS, dtype=np.int64))


def unpack_uint(words: np.ndarray, bits: int, n_values: int) -> np.ndarray:
    """Inverse of :func:`pack_uint`; ``words`` may be the float64 array ``Var.get()`` returns."""
    w = np.rint(np.asarray(words, dtype=np.float64)).astype(np.int64).ravel()
    bitarr = ((w[:, None] >> np.arange(WORD_BITS, dtype=np.int64)) & 1).ravel()[: n_values * bits]
    return bitarr.reshape(n_values, bits) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def count_bits(T: int) -> int:
    """Bits of a spike count in 0..T."""
    return max(1, int(T).bit_length())


class _Schedule:
    """Where a process is in the pipelined schedule at global step ``g``."""

    def __init__(self, start: int, period: int, n_samples: int):
        self.start, self.period, self.n_samples = int(start), int(period), int(n_samples)

    def locate(self, g: int) -> tuple[int, int]:
        """(sample k, local step u >= 1); k = -1 when idle."""
        phase = g - self.start
        if phase < 0 or phase >= self.n_samples * self.period:
            return -1, 0
        return phase // self.period, phase % self.period + 1


# -- processes --------------------------------------------------------------------------
class CsdcEncode(AbstractProcess):
    """Input source ("direct encoding"): sends the integer input levels of sample k as a
    constant current on local steps 1..T, zeros otherwise."""

    def __init__(self, *, levels: np.ndarray, T: int, period: int, name: str = "encode") -> None:
        levels = np.asarray(levels, dtype=np.int64)
        super().__init__(T=int(T), start=1, period=int(period), n_samples=int(levels.shape[0]), name=name)
        shape = tuple(levels.shape[1:])
        self.levels = Var(shape=levels.shape, init=levels)
        self.a_out = OutPort(shape=shape)


class _DifPopulation(AbstractProcess):
    """Ports, recording Vars and schedule of the DIF populations (one-word and two-word): an
    input port ``a_in``, spikes out on ``s_out``, ``state`` as Vars (integer arrays of the
    population's shape), the largest |membrane| and the packed counts / trains per sample."""

    ternary = False  # graded -1/0/+1 spikes: -1 counts in neg_counts_packed, trains packed in 2 bits

    def __init__(self, *, shape: tuple[int, ...], state: dict[str, np.ndarray], T: int, delay: int, start: int,
                 period: int, n_samples: int, keep_trains: bool, name: str, **params) -> None:
        super().__init__(T=int(T), delay=int(delay), start=int(start), period=int(period), n_samples=int(n_samples),
                         keep_trains=bool(keep_trains), name=name, **params)
        size = int(np.prod(shape))
        self.a_in = InPort(shape=shape)
        self.s_out = OutPort(shape=shape)
        for key, value in state.items():
            setattr(self, key, Var(shape=shape, init=np.broadcast_to(np.asarray(value, dtype=np.int64), shape).copy()))
        self.max_abs_v = Var(shape=(1,), init=0)
        self.counts_packed = Var(shape=(packed_words(n_samples * size, count_bits(T)),), init=0)
        train_bits = 2 if self.ternary else 1
        self.trains_packed = Var(shape=(packed_words(n_samples * T * size if keep_trains else 0, train_bits),), init=0)
        if self.ternary:
            self.neg_counts_packed = Var(shape=(packed_words(n_samples * size, count_bits(T)),), init=0)


class CsdcNeuron(_DifPopulation):
    """Delayed integrate-and-fire population (DIF, reset by subtraction), paper Algorithm 1.

    At local step u (1..T+delay): ``v = v0`` before u = 1; ``v += I(u) + bias`` for u <= T;
    for u > delay, ``v >= threshold`` emits a spike at output step u - delay and subtracts
    ``threshold``. Counts (and, with ``keep_trains``, spike trains) are recorded per sample.
    """

    def __init__(self, *, threshold: np.ndarray, v0: np.ndarray, bias: np.ndarray, T: int, delay: int,
                 start: int, period: int, n_samples: int, keep_trains: bool = False, name: str = "neuron") -> None:
        threshold = np.asarray(threshold, dtype=np.int64)
        super().__init__(shape=tuple(threshold.shape), state={"threshold": threshold, "v0": v0, "bias": bias, "v": v0},
                         T=T, delay=delay, start=start, period=period, n_samples=n_samples, keep_trains=keep_trains,
                         name=name)


class CsdcTernaryNeuron(CsdcNeuron):
    """Delayed integrate-and-fire population with signed (ternary) spikes: as :class:`CsdcNeuron`,
    but for u > delay ``v >= threshold`` sends +1 and subtracts ``threshold``, ``v < 0`` sends -1
    and adds it (a graded spike carrying a sign). Records the +1 counts in ``counts_packed`` and
    the -1 counts in ``neg_counts_packed``; trains are packed as ``spike + 1`` in 2 bits."""

    ternary = True


class CsdcTwoWordNeuron(_DifPopulation):
    """A :class:`CsdcNeuron` whose membrane is two ``word_bits``-bit words (custom neuron
    microcode with two compartments): ``V = hi * 2**shift + lo``, ``0 <= lo < 2**shift``.

    ``a_in`` is the fine compartment (currents in units of 1), ``c_in`` the coarse one (in units
    of ``2**shift``: its synapses' weight exponents are lowered by ``shift``). Threshold, v0 and
    bias come as (hi, lo) words of the same split. Per integration step (u <= T):
    ``lo += I_fine + bias_lo; c = lo >> shift; lo -= c << shift; hi += I_coarse + bias_hi + c``.
    Fire test (u > delay): ``hi > threshold_hi or (hi == threshold_hi and lo >= threshold_lo)``
    (V >= threshold); reset by subtraction with a borrow from ``hi``. V equals the one-word
    membrane at every step, so the spikes are the same. The first word leaving ``word_bits`` signed
    bits (``hi``, the fine word before the carry, the coarse accumulator) is recorded in
    ``overflow``, and the run then fails naming the process (``builder.run_graph``): a mapping
    bug, never a property of the input."""

    def __init__(self, *, threshold: tuple[np.ndarray, np.ndarray], v0: tuple[np.ndarray, np.ndarray],
                 bias: tuple[np.ndarray, np.ndarray], shift: int, word_bits: int, T: int, delay: int, start: int,
                 period: int, n_samples: int, keep_trains: bool = False, name: str = "neuron") -> None:
        shift, word_bits = int(shift), int(word_bits)
        if not 0 < shift < word_bits:
            raise ValueError(f"process '{name}': shift {shift} is not in 1..{word_bits - 1}")
        words = {}
        for key, (hi, lo) in (("threshold", threshold), ("v0", v0), ("bias", bias)):
            hi, lo = np.asarray(hi, dtype=np.int64), np.asarray(lo, dtype=np.int64)
            if lo.size and (lo.min() < 0 or lo.max() >= 1 << shift):
                raise ValueError(f"process '{name}': {key}_lo must lie in [0, 2**{shift})")
            check_word(name, f"{key}_hi", hi, word_bits)
            words[f"{key}_hi"], words[f"{key}_lo"] = hi, lo
        shape = tuple(np.broadcast_shapes(*(w.shape for w in words.values())))
        super().__init__(shape=shape, state={**words, "hi": words["v0_hi"], "lo": words["v0_lo"]}, T=T, delay=delay,
                         start=start, period=period, n_samples=n_samples, keep_trains=keep_trains, name=name,
                         shift=shift, word_bits=word_bits)
        self.c_in = InPort(shape=shape)
        # the first word that left word_bits: [global step, index in TWO_WORD_CHECKS, value]; 0 = none.
        # Recorded, not raised: an exception inside a Lava process model stalls the whole run
        self.overflow = Var(shape=(3,), init=0)


class CsdcTwoWordTernaryNeuron(CsdcTwoWordNeuron):
    """A :class:`CsdcTernaryNeuron` with a two-word membrane (see :class:`CsdcTwoWordNeuron`):
    -1 where V < 0 (``hi < 0``), reset by addition with a carry into ``hi``."""

    ternary = True


#: The words a two-word population checks every step, by their index in its ``overflow`` record.
TWO_WORD_CHECKS = ("the fine word lo (with I_fine + bias_lo before the carry, or during a reset)",
                   "the coarse accumulator I_coarse + bias_hi + carry", "the high word hi",
                   "the fine accumulator I_fine")


def outside_word(values: np.ndarray, bits: int) -> int | None:
    """A value of ``values`` outside the ``bits``-bit signed range, or None."""
    if not values.size:
        return None
    lo, hi = int(values.min()), int(values.max())
    return hi if hi >= 1 << (bits - 1) else lo if lo < -(1 << (bits - 1)) else None


def word_overflow_message(process: str, bits: int, record: np.ndarray) -> str | None:
    """What a two-word population's ``overflow`` record ``[global step, check, value]`` says (None:
    every word stayed within ``bits`` signed bits)."""
    step, check, value = (int(v) for v in np.rint(np.asarray(record, dtype=np.float64)))
    if step == 0:
        return None
    return (f"process '{process}': {TWO_WORD_CHECKS[check]} reached {value} at global step {step}, outside its "
            f"{bits}-bit signed word (a mapping bug: the plan's two-word layout promised it fits)")


def check_word(process: str, word: str, values: np.ndarray, bits: int) -> None:
    """Raise ``ValueError`` naming ``process`` if a parameter word leaves the ``bits``-bit signed range."""
    bad = outside_word(np.asarray(values, dtype=np.int64), bits)
    if bad is not None:
        raise ValueError(f"process '{process}': {word} = {bad} does not fit its {bits}-bit signed word")


class CsdcMBENeuron(AbstractProcess):
    """Multi-basis exponential-decay population (docs/mbe.md): integrates local steps 1..T
    (``v = v0 + sum I``), then at local step T + t (t = 1..S) each basis k fires where
    ``u_k >= threshold[k, t]``, subtracts ``reset[k, t]`` and the population sends the current
    ``sum_k fire_k * weight[k, t]`` (``u_k = v + offset[k]`` after step T). Records the spikes of
    every element (all bases and steps) per sample and the largest |u|."""

    def __init__(self, *, v0: np.ndarray, offset: np.ndarray, threshold: np.ndarray, reset: np.ndarray,
                 weight: np.ndarray, T: int, start: int, period: int, n_samples: int, name: str = "mbe") -> None:
        v0 = np.asarray(v0, dtype=np.int64)
        threshold = np.asarray(threshold, dtype=np.int64)
        shape = tuple(v0.shape)
        size = int(np.prod(shape))
        super().__init__(T=int(T), start=int(start), period=int(period), n_samples=int(n_samples), name=name)
        self.a_in = InPort(shape=shape)
        self.a_out = OutPort(shape=shape)
        self.v0 = Var(shape=shape, init=v0)
        self.v = Var(shape=shape, init=v0)
        self.offset = Var(shape=(threshold.shape[0],), init=np.asarray(offset, dtype=np.int64))
        self.threshold = Var(shape=threshold.shape, init=threshold)
        self.reset = Var(shape=threshold.shape, init=np.asarray(reset, dtype=np.int64))
        self.weight = Var(shape=threshold.shape, init=np.asarray(weight, dtype=np.int64))
        self.max_abs_v = Var(shape=(1,), init=0)
        self.spikes_packed = Var(shape=(packed_words(n_samples * size, count_bits(threshold.size)),), init=0)


class CsdcMaxPool(AbstractProcess):
    """TDEC max pooling: ``y(t) = max_window C(t) - max_window C(t-1)`` with running counts C
    (reset per sample); padding contributes count 0. Records counts / trains like CsdcNeuron."""

    def __init__(self, *, in_shape: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int, int, int], T: int, start: int, period: int, n_samples: int,
                 keep_trains: bool = False, name: str = "maxpool") -> None:
        c, h, w = (int(s) for s in in_shape)
        oh = (h + padding[0] + padding[2] - kernel[0]) // stride[0] + 1
        ow = (w + padding[1] + padding[3] - kernel[1]) // stride[1] + 1
        out_shape = (c, oh, ow)
        size = c * oh * ow
        super().__init__(kernel=tuple(int(k) for k in kernel), stride=tuple(int(s) for s in stride),
                         padding=tuple(int(p) for p in padding), T=int(T), start=int(start), period=int(period),
                         n_samples=int(n_samples), keep_trains=bool(keep_trains), name=name)
        self.s_in = InPort(shape=(c, h, w))
        self.s_out = OutPort(shape=out_shape)
        self.counts_packed = Var(shape=(packed_words(n_samples * size, count_bits(T)),), init=0)
        self.trains_packed = Var(shape=(packed_words(n_samples * T * size if keep_trains else 0, 1),), init=0)


class CsdcDelay(AbstractProcess):
    """Delay line (FIFO) of ``steps`` global steps: ``out(g) = in(g - steps)``; used to balance
    the branches of an Add (steps = 0 is a plain relay)."""

    def __init__(self, *, shape: tuple[int, ...], steps: int, name: str = "delay") -> None:
        super().__init__(steps=int(steps), name=name)
        self.a_in = InPort(shape=tuple(shape))
        self.a_out = OutPort(shape=tuple(shape))


class CsdcSynapse(AbstractProcess):
    """Exact int64 synapses for what Lava's Dense / Sparse / Conv cannot hold exactly (weights
    beyond their fixed-point range, accumulators beyond int32 / 24 bits, asymmetric padding):
    ``a(g) = M @ in(g - 1)`` with a sparse integer matrix M over the flattened tensors."""

    def __init__(self, *, matrix: sp.csr_matrix, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 name: str = "synapse") -> None:
        m = sp.csr_matrix(matrix, dtype=np.int64)
        super().__init__(matrix=m, name=name)
        self.s_in = InPort(shape=tuple(in_shape))
        self.a_out = OutPort(shape=tuple(out_shape))


class CsdcSpikeMatMul(AbstractProcess):
    """TDEC product of two spike tensors A (..., M, K) and B (..., K, N) (SPEC 2.4):
    ``I(t) = weight * (A(t) C_B(t) + C_A(t-1) B(t))`` with running counts C reset per sample;
    the current is delivered one step later (latency 1, like a synapse)."""

    def __init__(self, *, a_shape: tuple[int, ...], b_shape: tuple[int, ...], weight: int, T: int, start: int,
                 period: int, n_samples: int, name: str = "spike_matmul") -> None:
        a_shape, b_shape = tuple(int(s) for s in a_shape), tuple(int(s) for s in b_shape)
        super().__init__(weight=int(weight), T=int(T), start=int(start), period=int(period), n_samples=int(n_samples),
                         name=name)
        self.a_in = InPort(shape=a_shape)
        self.b_in = InPort(shape=b_shape)
        self.a_out = OutPort(shape=(*a_shape[:-1], b_shape[-1]))


class CsdcReadout(AbstractProcess):
    """Network output: accumulates the input current of local steps 1..T per sample."""

    def __init__(self, *, num_classes: int, T: int, start: int, period: int, n_samples: int,
                 name: str = "readout") -> None:
        super().__init__(T=int(T), start=int(start), period=int(period), n_samples=int(n_samples), name=name)
        self.a_in = InPort(shape=(int(num_classes),))
        self.readout = Var(shape=(int(n_samples), int(num_classes)), init=0)


# -- process models (fixed point) --------------------------------------------------------
@implements(proc=CsdcEncode, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcEncodeModel(PyLoihiProcessModel):
    """Sends ``levels[k]`` on local steps 1..T of sample k."""

    levels: np.ndarray = LavaPyType(np.ndarray, np.int64)
    a_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int64)

    def __init__(self, proc_params: dict) -> None:
        super().__init__(proc_params)
        self._sched = _Schedule(proc_params["start"], proc_params["period"], proc_params["n_samples"])
        self._T = proc_params["T"]

    def run_spk(self) -> None:
        k, u = self._sched.locate(self.time_step)
        if k >= 0 and u <= self._T:
            self.a_out.send(self.levels[k].astype(np.int64))
        else:
            self.a_out.send(np.zeros(self.a_out.shape, dtype=np.int64))


class _RecordingModel(PyLoihiProcessModel):
    """Per-sample spike recording shared by the neuron and max-pool models."""

    counts_packed: np.ndarray = LavaPyType(np.ndarray, np.int64)
    trains_packed: np.ndarray = LavaPyType(np.ndarray, np.int64)

    def _init_recording(self, shape: tuple[int, ...]) -> None:
        p = self.proc_params
        self._T, self._keep = p["T"], p["keep_trains"]
        self._n = p["n_samples"]
        self._counts = np.zeros((self._n, *shape), dtype=np.int64)
        self._trains = np.zeros((self._n, self._T, *shape), dtype=np.int8) if self._keep else None

    def _record(self, k: int, t: int, spikes: np.ndarray) -> None:
        self._counts[k] += spikes
        if self._keep:
            self._trains[k, t - 1] = spikes

    def _finish(self) -> None:
        self.counts_packed = pack_uint(self._counts, count_bits(self._T))
        if self._keep:
            self.trains_packed = pack_uint(self._trains, 1)


class _DifModel(_RecordingModel):
    """Integration window, delay, firing and recording of the DIF populations. How the membrane
    is held (one int64 word, or two words) lives in the state hooks of the subclasses:
    ``_receive``, ``_start``, ``_integrate``, ``_at_or_above``, ``_below_zero``, ``_subtract``,
    ``_membrane``. ``_fire`` is the DIF rule (+1 and reset by subtraction at or above threshold)."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int64)
    max_abs_v: np.ndarray = LavaPyType(np.ndarray, np.int64)

    def __init__(self, proc_params: dict) -> None:
        super().__init__(proc_params)
        p = proc_params
        self._sched = _Schedule(p["start"], p["period"], p["n_samples"])
        self._D = p["delay"]
        self._name = p["name"]
        self._recording_ready = False

    def _peak(self) -> None:
        self.max_abs_v[0] = max(int(self.max_abs_v[0]), int(np.abs(self._membrane()).max(initial=0)))

    def _receive(self) -> tuple[np.ndarray, ...]:
        return (self.a_in.recv().astype(np.int64),)

    def _fire(self) -> np.ndarray:
        fire = self._at_or_above().astype(np.int64)
        self._subtract(fire)
        return fire

    def run_spk(self) -> None:
        shape = tuple(self.s_out.shape)
        if not self._recording_ready:
            self._init_recording(shape)
            self._recording_ready = True
        currents = self._receive()  # every port is read every step, inside the window or not
        k, u = self._sched.locate(self.time_step)
        out = np.zeros(shape, dtype=np.int64)
        if k >= 0 and u <= self._T + self._D:
            if u == 1:
                self._start()
                self._peak()
            if u <= self._T:
                self._integrate(*currents)
                self._peak()
            if u > self._D:
                out = self._fire()
                self._record(k, u - self._D, out)
                if k == self._n - 1 and u == self._T + self._D:
                    self._finish()
        self.s_out.send(out)


class _TernaryRule:
    """Firing rule and recording of the ternary populations (mixed in before a state model): +1
    at or above threshold (reset by subtraction), -1 below 0 (reset by addition)."""

    neg_counts_packed: np.ndarray = LavaPyType(np.ndarray, np.int64)

    def _fire(self) -> np.ndarray:
        fire = self._at_or_above().astype(np.int64) - self._below_zero()
        self._subtract(fire)
        # a -1 reset can raise |v| (up to threshold - 1): measured like the numba kernel
        self._peak()
        return fire

    def _init_recording(self, shape: tuple[int, ...]) -> None:
        super()._init_recording(shape)
        self._neg = np.zeros_like(self._counts)

    def _record(self, k: int, t: int, spikes: np.ndarray) -> None:
        self._counts[k] += spikes > 0
        self._neg[k] += spikes < 0
        if self._keep:
            self._trains[k, t - 1] = spikes

    def _finish(self) -> None:
        self.counts_packed = pack_uint(self._counts, count_bits(self._T))
        self.neg_counts_packed = pack_uint(self._neg, count_bits(self._T))
        if self._keep:
            self.trains_packed = pack_uint(self._trains.astype(np.int64) + 1, 2)


class _OneWordModel(_DifModel):
    """The membrane as one int64 word ``v`` (the simulators' datapath)."""

    threshold: np.ndarray = LavaPyType(np.ndarray, np.int64)
    v0: np.ndarray = LavaPyType(np.ndarray, np.int64)
    bias: np.ndarray = LavaPyType(np.ndarray, np.int64)
    v: np.ndarray = LavaPyType(np.ndarray, np.int64)

    def _start(self) -> None:
        self.v = self.v0.astype(np.int64).copy()

    def _integrate(self, current: np.ndarray) -> None:
        self.v = self.v + current + self.bias

    def _at_or_above(self) -> np.ndarray:
        return self.v >= self.threshold

    def _below_zero(self) -> np.ndarray:
        return self.v < 0

    def _subtract(self, n: np.ndarray) -> None:
        self.v = self.v - n * self.threshold

    def _membrane(self) -> np.ndarray:
        return self.v


class _TwoWordModel(_DifModel):
    """The membrane as two words ``V = hi * 2**shift + lo`` with ``0 <= lo < 2**shift``, each
    checked to stay within ``word_bits`` signed bits (docs/lava.md, two-word membranes)."""

    c_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64)
    threshold_hi: np.ndarray = LavaPyType(np.ndarray, np.int64)
    threshold_lo: np.ndarray = LavaPyType(np.ndarray, np.int64)
    v0_hi: np.ndarray = LavaPyType(np.ndarray, np.int64)
    v0_lo: np.ndarray = LavaPyType(np.ndarray, np.int64)
    bias_hi: np.ndarray = LavaPyType(np.ndarray, np.int64)
    bias_lo: np.ndarray = LavaPyType(np.ndarray, np.int64)
    hi: np.ndarray = LavaPyType(np.ndarray, np.int64)
    lo: np.ndarray = LavaPyType(np.ndarray, np.int64)
    overflow: np.ndarray = LavaPyType(np.ndarray, np.int64)

    def __init__(self, proc_params: dict) -> None:
        super().__init__(proc_params)
        self._shift, self._bits = proc_params["shift"], proc_params["word_bits"]

    def _check(self, check: int, values: np.ndarray) -> None:
        if self.overflow[0] == 0:
            bad = outside_word(values, self._bits)
            if bad is not None:
                self.overflow = np.array([self.time_step, check, bad], dtype=np.int64)

    def _receive(self) -> tuple[np.ndarray, ...]:
        return self.a_in.recv().astype(np.int64), self.c_in.recv().astype(np.int64)

    def _start(self) -> None:
        self.hi = self.v0_hi.astype(np.int64).copy()
        self.lo = self.v0_lo.astype(np.int64).copy()

    def _integrate(self, fine: np.ndarray, coarse: np.ndarray) -> None:
        self._check(3, fine)
        lo = self.lo + fine + self.bias_lo
        self._check(0, lo)
        carry = lo >> self._shift  # floor: 0 <= lo < 2**shift afterwards
        self.lo = lo - (carry << self._shift)
        acc = coarse + self.bias_hi + carry
        self._check(1, acc)
        self.hi = self.hi + acc
        self._check(2, self.hi)

    def _at_or_above(self) -> np.ndarray:
        return (self.hi > self.threshold_hi) | ((self.hi == self.threshold_hi) & (self.lo >= self.threshold_lo))

    def _below_zero(self) -> np.ndarray:
        return self.hi < 0

    def _subtract(self, n: np.ndarray) -> None:
        lo = self.lo - n * self.threshold_lo  # n in {-1, 0, 1}: lo stays within (-2**shift, 2**(shift + 1))
        self._check(0, lo)
        borrow = lo >> self._shift  # -1, 0 or 1
        self.lo = lo - (borrow << self._shift)
        self.hi = self.hi + borrow - n * self.threshold_hi
        self._check(2, self.hi)

    def _membrane(self) -> np.ndarray:
        return (self.hi << self._shift) + self.lo  # the one-word V (a simulation-side measurement)


@implements(proc=CsdcNeuron, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcNeuronModel(_OneWordModel):
    """Fixed-point DIF neuron (int64 state)."""


@implements(proc=CsdcTernaryNeuron, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcTernaryNeuronModel(_TernaryRule, _OneWordModel):
    """Fixed-point ternary DIF neuron (int64 state, graded spikes -1/0/+1)."""


@implements(proc=CsdcTwoWordNeuron, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcTwoWordNeuronModel(_TwoWordModel):
    """Fixed-point DIF neuron with a two-word membrane (two compartments)."""


@implements(proc=CsdcTwoWordTernaryNeuron, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcTwoWordTernaryNeuronModel(_TernaryRule, _TwoWordModel):
    """Fixed-point ternary DIF neuron with a two-word membrane (two compartments)."""


@implements(proc=CsdcMBENeuron, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcMBENeuronModel(PyLoihiProcessModel):
    """Fixed-point MBE population (int64 state): integration window, then S encoding steps."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64)
    a_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int64)
    v0: np.ndarray = LavaPyType(np.ndarray, np.int64)
    v: np.ndarray = LavaPyType(np.ndarray, np.int64)
    offset: np.ndarray = LavaPyType(np.ndarray, np.int64)
    threshold: np.ndarray = LavaPyType(np.ndarray, np.int64)
    reset: np.ndarray = LavaPyType(np.ndarray, np.int64)
    weight: np.ndarray = LavaPyType(np.ndarray, np.int64)
    max_abs_v: np.ndarray = LavaPyType(np.ndarray, np.int64)
    spikes_packed: np.ndarray = LavaPyType(np.ndarray, np.int64)

    def __init__(self, proc_params: dict) -> None:
        super().__init__(proc_params)
        p = proc_params
        self._sched = _Schedule(p["start"], p["period"], p["n_samples"])
        self._T, self._n = p["T"], p["n_samples"]
        self._u: np.ndarray | None = None
        self._spikes: np.ndarray | None = None

    def _peak(self, values: np.ndarray) -> None:
        self.max_abs_v[0] = max(int(self.max_abs_v[0]), int(np.abs(values).max(initial=0)))

    def run_spk(self) -> None:
        if self._spikes is None:
            self._spikes = np.zeros((self._n, *self.v.shape), dtype=np.int64)
        current = self.a_in.recv().astype(np.int64)
        k, u = self._sched.locate(self.time_step)
        out = np.zeros(self.v.shape, dtype=np.int64)
        steps = self.threshold.shape[1]
        if k >= 0 and u <= self._T + steps:
            if u == 1:
                self.v = self.v0.astype(np.int64).copy()
            if u <= self._T:
                self.v = self.v + current
            if u == self._T:
                per_basis = (-1,) + (1,) * self.v.ndim
                self._u = self.v[None] + self.offset.reshape(per_basis)
                self._peak(self._u)
            if u > self._T:
                t = u - self._T - 1
                per_basis = (-1,) + (1,) * self.v.ndim
                fire = (self._u >= self.threshold[:, t].reshape(per_basis)).astype(np.int64)
                out = (fire * self.weight[:, t].reshape(per_basis)).sum(axis=0)
                self._u = self._u - fire * self.reset[:, t].reshape(per_basis)
                self._peak(self._u)
                self._spikes[k] += fire.sum(axis=0)
                if k == self._n - 1 and u == self._T + steps:
                    self.spikes_packed = pack_uint(self._spikes, count_bits(self.threshold.size))
        self.a_out.send(out)


@implements(proc=CsdcMaxPool, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcMaxPoolModel(_RecordingModel):
    """TDEC max pooling on running spike counts (latency 0)."""

    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int64)

    def __init__(self, proc_params: dict) -> None:
        super().__init__(proc_params)
        p = proc_params
        self._sched = _Schedule(p["start"], p["period"], p["n_samples"])
        self._kernel, self._stride, self._padding = p["kernel"], p["stride"], p["padding"]
        self._ready = False

    def _pool(self, running: np.ndarray) -> np.ndarray:
        t, l, b, r = self._padding
        xp = np.pad(running, ((0, 0), (t, b), (l, r)))
        win = np.lib.stride_tricks.sliding_window_view(xp, self._kernel, axis=(1, 2))
        return win[:, :: self._stride[0], :: self._stride[1]].max(axis=(-2, -1))

    def run_spk(self) -> None:
        if not self._ready:
            self._init_recording(self.s_out.shape)
            self._running = np.zeros(self.s_in.shape, dtype=np.int64)
            self._prev = np.zeros(self.s_out.shape, dtype=np.int64)
            self._ready = True
        spikes = self.s_in.recv().astype(np.int64)
        k, u = self._sched.locate(self.time_step)
        out = np.zeros(self.s_out.shape, dtype=np.int64)
        if k >= 0 and u <= self._T:
            if u == 1:
                self._running[...] = 0
                self._prev[...] = 0
            self._running += spikes
            m = self._pool(self._running)
            out = m - self._prev
            self._prev = m
            self._record(k, u, out)
            if k == self._n - 1 and u == self._T:
                self._finish()
        self.s_out.send(out)


@implements(proc=CsdcDelay, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcDelayModel(PyLoihiProcessModel):
    """Ring buffer of ``steps`` entries."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64)
    a_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int64)

    def __init__(self, proc_params: dict) -> None:
        super().__init__(proc_params)
        self._steps = proc_params["steps"]
        self._buf: np.ndarray | None = None
        self._pos = 0

    def run_spk(self) -> None:
        x = self.a_in.recv().astype(np.int64)
        if self._steps == 0:
            self.a_out.send(x)
            return
        if self._buf is None:
            self._buf = np.zeros((self._steps, *self.a_in.shape), dtype=np.int64)
        self.a_out.send(self._buf[self._pos].copy())
        self._buf[self._pos] = x
        self._pos = (self._pos + 1) % self._steps


@implements(proc=CsdcSynapse, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcSynapseModel(PyLoihiProcessModel):
    """``a(g) = M @ in(g - 1)`` in int64 (one step of latency, like Lava's Dense)."""

    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64)
    a_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int64)

    def __init__(self, proc_params: dict) -> None:
        super().__init__(proc_params)
        self._m: sp.csr_matrix = proc_params["matrix"]
        self._buf: np.ndarray | None = None

    def run_spk(self) -> None:
        if self._buf is None:
            self._buf = np.zeros(self.a_out.shape, dtype=np.int64)
        self.a_out.send(self._buf)
        x = self.s_in.recv().astype(np.int64).ravel()
        self._buf = np.asarray(self._m @ x, dtype=np.int64).reshape(self.a_out.shape)


@implements(proc=CsdcSpikeMatMul, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcSpikeMatMulModel(PyLoihiProcessModel):
    """Running counts of both inputs; each step adds count rows/columns gated by spikes."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64)
    b_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64)
    a_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int64)

    def __init__(self, proc_params: dict) -> None:
        super().__init__(proc_params)
        p = proc_params
        self._sched = _Schedule(p["start"], p["period"], p["n_samples"])
        self._T, self._w = p["T"], p["weight"]
        self._buf: np.ndarray | None = None

    def run_spk(self) -> None:
        if self._buf is None:
            self._buf = np.zeros(self.a_out.shape, dtype=np.int64)
            self._ca = np.zeros(self.a_in.shape, dtype=np.int64)
            self._cb = np.zeros(self.b_in.shape, dtype=np.int64)
        self.a_out.send(self._buf)
        a = self.a_in.recv().astype(np.int64)
        b = self.b_in.recv().astype(np.int64)
        k, u = self._sched.locate(self.time_step)
        if k >= 0 and u <= self._T:
            if u == 1:
                self._ca[...] = 0
                self._cb[...] = 0
            self._cb += b
            self._buf = self._w * (np.matmul(a, self._cb) + np.matmul(self._ca, b))
            self._ca += a
        else:
            self._buf = np.zeros(self.a_out.shape, dtype=np.int64)


@implements(proc=CsdcReadout, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyCsdcReadoutModel(PyLoihiProcessModel):
    """Accumulates the readout current of each sample's window."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64)
    readout: np.ndarray = LavaPyType(np.ndarray, np.int64)

    def __init__(self, proc_params: dict) -> None:
        super().__init__(proc_params)
        p = proc_params
        self._sched = _Schedule(p["start"], p["period"], p["n_samples"])
        self._T = p["T"]

    def run_spk(self) -> None:
        current = self.a_in.recv().astype(np.int64)
        k, u = self._sched.locate(self.time_step)
        if k >= 0 and u <= self._T:
            self.readout[k] = self.readout[k] + current


#: Custom process -> model, passed to the run config as ``exception_proc_model_map`` so that
#: model selection never depends on module discovery.
PROCESS_MODELS: dict[type, type] = {
    CsdcEncode: PyCsdcEncodeModel,
    CsdcNeuron: PyCsdcNeuronModel,
    CsdcTernaryNeuron: PyCsdcTernaryNeuronModel,
    CsdcTwoWordNeuron: PyCsdcTwoWordNeuronModel,
    CsdcTwoWordTernaryNeuron: PyCsdcTwoWordTernaryNeuronModel,
    CsdcMBENeuron: PyCsdcMBENeuronModel,
    CsdcMaxPool: PyCsdcMaxPoolModel,
    CsdcDelay: PyCsdcDelayModel,
    CsdcSynapse: PyCsdcSynapseModel,
    CsdcSpikeMatMul: PyCsdcSpikeMatMulModel,
    CsdcReadout: PyCsdcReadoutModel,
}

__all__ = [
    "PROCESS_MODELS",
    "CsdcDelay",
    "CsdcEncode",
    "CsdcMBENeuron",
    "CsdcMaxPool",
    "CsdcNeuron",
    "CsdcReadout",
    "CsdcSpikeMatMul",
    "CsdcSynapse",
    "CsdcTernaryNeuron",
    "CsdcTwoWordNeuron",
    "CsdcTwoWordTernaryNeuron",
    "TWO_WORD_CHECKS",
    "check_word",
    "outside_word",
    "word_overflow_message",
    "count_bits",
    "pack_uint",
    "packed_words",
    "unpack_uint",
]
