"""The compile pipeline: ONNX file -> canonical quantized graph -> spiking IR, with a report."""

from __future__ import annotations

import functools
import os
import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np

from csdc import __version__
from csdc.compiler.bitwidth import PROFILES, BitReport, HardwareProfile, analyze_bitwidth, bit_widths, budget_excess
from csdc.compiler.frontend import NONLINEAR_MODES, load_qgraph
from csdc.compiler.integerize import PrecisionReport, integerize, split_for_profile
from csdc.compiler.lower import MBEOptions, lower
from csdc.compiler.passes import PassManager
from csdc.compiler.passes.canonicalize_linear import make_canonicalize_linear
from csdc.compiler.passes.canonicalize_lsq_arithmetic import canonicalize_lsq_arithmetic
from csdc.compiler.passes.canonicalize_qonnx_quant import canonicalize_qonnx_quant
from csdc.compiler.passes.canonicalize_quant import canonicalize_quant
from csdc.compiler.passes.canonicalize_zero_point import canonicalize_zero_point
from csdc.compiler.passes.cleanup_routing import cleanup_routing
from csdc.compiler.passes.fold_affine_constants import fold_affine_constants
from csdc.compiler.passes.fold_batchnorm import fold_batchnorm
from csdc.compiler.passes.fold_constants import fold_constants
from csdc.compiler.passes.fuse_elementwise import fuse_elementwise
from csdc.compiler.passes.fuse_layernorm import fuse_layernorm
from csdc.compiler.passes.move_input_quant import move_input_quant
from csdc.compiler.passes.move_maxpool import move_maxpool
from csdc.compiler.passes.remove_identities import remove_identities
from csdc.compiler.passes.validate_numbers import validate_numbers
from csdc.compiler.qgraph import QGraph
from csdc.errors import BudgetError, CsdcError, in_model
from csdc.ir.graph import Network
from csdc.ir.ops import MBE_BASES_MAX, MBE_STEPS_MAX, ConvSynapse, DenseSynapse, DiagonalSynapse, MBENeuron, Neuron


@dataclass(frozen=True)
class CompileOptions:
    delay: int | None = None  # None: D = T (exact)
    frac_bits: int | None = None  # None: chosen per population (integerize); else thresholds of this many significant bits
    weight_bits: int = 8  # for float weights that csdc quantizes itself
    profile: str = "generic"
    nonlinear: str = "refuse"  # "mbe": approximate GELU with MBE populations (docs/mbe.md); default refuses
    mbe_bases: int | None = None  # None: the fewest bases whose worst-case error is within MBE_TARGET_LEVELS
    mbe_steps: int = 16  # encoding steps of an MBE population (at most T)

    def __post_init__(self) -> None:
        if self.delay is not None and self.delay < 0:
            raise CsdcError(f"--delay must be >= 0, got {self.delay}")
        if self.frac_bits is not None and not 0 <= self.frac_bits <= 24:
            raise CsdcError(f"--frac-bits must be in 0..24, got {self.frac_bits}")
        if not 2 <= self.weight_bits <= 16:
            raise CsdcError(f"--weight-bits must be in 2..16, got {self.weight_bits}")
        if self.profile not in PROFILES:
            raise CsdcError(f"unknown --profile '{self.profile}'; choose one of {', '.join(PROFILES)}")
        if self.nonlinear not in NONLINEAR_MODES:
            raise CsdcError(f"unknown --nonlinear '{self.nonlinear}'; choose one of {', '.join(NONLINEAR_MODES)}")
        if self.mbe_bases is not None and not 1 <= self.mbe_bases <= MBE_BASES_MAX:
            raise CsdcError(f"--mbe-bases must be in 1..{MBE_BASES_MAX}, got {self.mbe_bases}")
        if not 1 <= self.mbe_steps <= MBE_STEPS_MAX:
            raise CsdcError(f"--mbe-steps must be in 1..{MBE_STEPS_MAX}, got {self.mbe_steps}")


@dataclass
class CompileReport:
    source: str
    T: int
    delay: int
    latency: int
    populations: int
    neurons: int
    synapses: int
    threshold_error: float
    weight_error: float
    bias_error: float
    float_weight_error: float
    error_bound: float  # worst-case integerization error of any population, in quantization levels
    error_population: str  # the population with that error
    precision: dict  # per population: bound, site, k, ... (integerize.PrecisionReport.to_dict)
    synapses_before_split: int
    bits: dict
    seconds: float
    warnings: list[str] = field(default_factory=list)
    explain: dict[str, list[str]] = field(default_factory=dict)
    approximations: list[dict] = field(default_factory=list)  # one per op approximated by MBE populations

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("explain")
        return d


def canonical_passes(options: CompileOptions) -> list:
    """Quantizers first: every dialect (QONNX Quant, LSQ arithmetic, QDQ/QCDQ) becomes one ``Quant``
    op (weights become integer constants) before any structural pass; then zero points are
    normalized, max-pools moved onto spikes, linear layers, constants and BatchNorms folded (the
    frontend has already folded every constant subgraph; ``fold_constants`` runs again after the
    quantizer passes have turned QONNX / LSQ weight quantizers into constants); the model input's quantizer
    moves in front of routing that reads the input (``move_input_quant``, while a per-axis QuantizeLinear still
    has its axis to remap) so that the input's encoder reads the model input itself. ``validate_numbers``
    runs in the frontend on the constants as loaded and here again on the values folding computed
    (a weight step the model derives in-graph from its weights is a constant only after folding). With
    ``--nonlinear mbe``, decomposed LayerNorms become LayerNormalization nodes and elementwise nonlinear regions
    between quantizers are fused, last (docs/mbe.md)."""
    return [validate_numbers, remove_identities, fold_constants, canonicalize_qonnx_quant, canonicalize_lsq_arithmetic, fold_constants,
            move_input_quant, canonicalize_quant, canonicalize_zero_point, move_maxpool, remove_identities,
            make_canonicalize_linear(options.weight_bits), fold_affine_constants, fold_batchnorm, fold_affine_constants] + (
                [fuse_layernorm, fuse_elementwise] if options.nonlinear == "mbe" else [])


def canonicalize(graph: QGraph, options: CompileOptions, check=None, contracts: bool = False) -> QGraph:
    """Run the canonicalization passes on a loaded graph; ``check(graph, pass_name)`` runs after each pass,
    and ``contracts`` checks every pass's declared requires/ensures and that it leaves its input intact."""
    return PassManager(canonical_passes(options), check=contracts, verify=check).run(graph).graph


def depth(net: Network) -> int:
    """Largest number of neuron populations on any path from the input to the readout."""
    d: dict[str, int] = {}
    for name, op in net.nodes():
        prev = max((d[s] for s in net.inputs(name)), default=0)
        d[name] = prev + (1 if isinstance(op, Neuron) else 0)
    return d[net.output_name]


def latency(net: Network, delay: int) -> int:
    """Steps from the input's first step to the readout's last with every neuron population's delay
    taken as ``delay``: T plus, on the slowest path, D per neuron population and T per MBE population
    (it integrates its whole window before its first encoding step, whatever D). ``T + depth x D``
    when there is no MBE population."""
    d: dict[str, int] = {}
    for name, op in net.nodes():
        prev = max((d[s] for s in net.inputs(name)), default=0)
        d[name] = prev + (delay if isinstance(op, Neuron) else net.T if isinstance(op, MBENeuron) else 0)
    return net.T + d[net.output_name]


def count_synapses(net: Network) -> int:
    total = 0
    for name, op in net.nodes():
        if isinstance(op, DenseSynapse):
            total += int(np.count_nonzero(op.mantissa)) * int(np.prod(net.info(name).shape[:-1]))
        elif isinstance(op, ConvSynapse):
            oh, ow = net.info(name).shape[1:]
            total += int(np.count_nonzero(op.mantissa)) * oh * ow
        elif isinstance(op, DiagonalSynapse):
            total += int(np.count_nonzero(op.mantissa))
    return total


def explain_sources(source: QGraph, graph: QGraph, lowered: dict[str, list[str]]) -> dict[str, list[str]]:
    """For every source node, in source order, what it became: the IR nodes made from it, else what a
    pass turned it into (``graph.provenance``: folded, absorbed, part of a quantizer, a constant)."""
    out: dict[str, list[str]] = {}
    for name in source.source_nodes or [n.name for n in source.nodes]:  # including those the frontend folded
        if name in lowered:
            out[name] = list(lowered[name])
        elif name in graph.provenance:
            out[name] = [graph.provenance[name]]
        else:
            out[name] = ["no IR node of its own (a constant scale/shift, pooling or routing folded into the next population's "
                           "weights, bias or threshold)"]
    for k, v in lowered.items():
        out.setdefault(k, list(v))
    return out


def _internal_errors_named(fn):  # type: ignore[no-untyped-def]
    """Every error names the model once, and the ONNX node being lowered where known (``errors.in_model``:
    the library and ``csdc compile`` say the same); an exception that no check turned into a CsdcError
    becomes one naming the model and where it happened (passes name themselves through PassManager)."""
    @functools.wraps(fn)
    def wrapped(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return fn(path, *args, **kwargs)
        except CsdcError as exc:
            named = in_model(exc, os.fspath(path))
            if named is exc:
                raise
            raise named from exc
        except Exception as exc:
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}csdc{os.sep}" in f.filename]
            where = f" in {os.path.basename(frames[-1].filename)}:{frames[-1].name}" if frames else ""
            raise CsdcError(f"{os.fspath(path)}: internal error{where} ({type(exc).__name__}: {exc}); "
                            "the model is malformed in a way csdc does not check yet") from exc
    return wrapped


def map_onto_profile(net: Network, precision: PrecisionReport, profile: HardwareProfile) -> tuple[Network, BitReport, int]:
    """An integerized network mapped onto ``profile``: synapses split (:func:`integerize.split_for_profile`:
    exact), checked against its budget (two-word membranes where it has words); returns the network, its
    bit widths and the synapses before splitting (recorded in ``precision``). Raises BudgetError naming the
    first node that does not fit."""
    before = count_synapses(net)
    net, split = split_for_profile(net, profile)
    precision.split_synapses, precision.synapses_before_split = split, before
    net.verify()
    net.verify_arithmetic()  # e.g. a huge bias that wrapped around in the lowering's int64 rounding
    return net, analyze_bitwidth(net, profile), before


def unmapped_nodes(net: Network, profile: HardwareProfile) -> list[str]:
    """The nodes of an integerized network that exceed ``profile`` once its synapses are split for it."""
    split, _ = split_for_profile(net, profile)
    return [name for name, entry in bit_widths(split, profile).per_node.items() if budget_excess(entry, profile)]


def _do_not_map(nodes: list[str], profile: HardwareProfile) -> str:
    shown = ", ".join(f"'{n}'" for n in nodes[:4]) + (f" and {len(nodes) - 4} more" if len(nodes) > 4 else "")
    many = len(nodes) > 1
    return f"population{'s' if many else ''} {shown} {'do' if many else 'does'} not map onto profile '{profile.name}'"


@_internal_errors_named
def compile_onnx(path: str | os.PathLike, options: CompileOptions = CompileOptions()) -> tuple[Network, CompileReport]:
    """Compile an ONNX file into a verified spiking network and a report."""
    t0 = time.perf_counter()
    source = load_qgraph(path, options.nonlinear)
    graph = canonicalize(source, options)
    profile = PROFILES[options.profile]
    mbe = MBEOptions(options.mbe_bases, options.mbe_steps) if options.nonlinear == "mbe" else None

    def lower_round(precision):
        net, low = lower(graph, precision, options.delay, mbe)
        return cleanup_routing(net), low

    units = PROFILES[profile.units] if profile.units else profile
    net, low = integerize(lower_round, units, options.frac_bits)
    try:
        net, bits, before = map_onto_profile(net, low.precision, profile)
    except BudgetError as exc:
        if units is profile:
            raise
        # the units of `units` need more than this profile maps: its own policy (caps by its budget) instead
        unmapped = unmapped_nodes(net, profile)
        del net
        try:
            net, low = integerize(lower_round, profile, options.frac_bits)
            net, bits, before = map_onto_profile(net, low.precision, profile)
        except CsdcError as own:
            raise BudgetError(f"under the units of --profile {units.name}, {_do_not_map(unmapped, profile)} ({exc}); "
                              f"with that profile's own budget: {own}") from own
        low.precision.warnings.append(
            f"not spike-identical to --profile {units.name}: under its units, {_do_not_map(unmapped, profile)} ({exc}); "
            "compiled with the precision that profile's own budget allows")
        units = profile
    if profile.units:
        low.precision.units = units.name
    worst_pop, worst = low.precision.worst
    neurons = [n for n in net.neurons()]
    D = options.delay if options.delay is not None else net.T
    report = CompileReport(
        source=os.path.basename(os.fspath(path)), T=net.T, delay=D, latency=latency(net, D),
        populations=len(neurons), neurons=int(sum(np.prod(net.info(n).shape) for n in neurons)),
        synapses=count_synapses(net), threshold_error=low.threshold_error, weight_error=low.weight_error,
        bias_error=low.bias_error, float_weight_error=low.float_weight_error, error_bound=worst, error_population=worst_pop,
        precision=low.precision.to_dict(), synapses_before_split=before, bits=bits.to_dict(),
        seconds=time.perf_counter() - t0, warnings=graph.warnings + low.warnings + low.precision.warnings,
        explain=explain_sources(source, graph, low.explain), approximations=low.approximations)
    net.metadata.update({"csdc_version": __version__, "compile": report.to_dict(),
                         "options": asdict(options)})
    return net, report
