"""NIR export: round trip through nir.read, a NIR consumer (nirtorch's graph executor) running the
exported digits CNN (D = 0) reproduces csdc's spike counts and readout exactly, and ops NIR
cannot express are refused by name."""

from __future__ import annotations

import os

import numpy as np
import pytest

nir = pytest.importorskip("nir")
torch = pytest.importorskip("torch")
nirtorch = pytest.importorskip("nirtorch")

from csdc.backends.nir import CONVERTERS, export_nir, to_nir  # noqa: E402
from csdc.backends.numba import NumbaBackend  # noqa: E402
from csdc.cli import main  # noqa: E402
from csdc.compiler.pipeline import CompileOptions, compile_onnx  # noqa: E402
from csdc.errors import CsdcError  # noqa: E402
from csdc.ir import serialize  # noqa: E402
from csdc.ir.graph import Network  # noqa: E402
from csdc.ir.ops import OP_REGISTRY, ConvSynapse, DenseSynapse, Encode, Neuron, Readout, Reshape, SumPool  # noqa: E402
from csdc.ir.semantics import encode  # noqa: E402
from csdc.runtime.datasets import load_digits_split  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CNN = os.path.join(ROOT, "examples", "digits_cnn", "model.onnx")
CSDFORMER = os.path.join(ROOT, "examples", "digits_csdformer", "model.onnx")


@pytest.fixture(scope="module")
def cnn0():
    net, _ = compile_onnx(CNN, CompileOptions(delay=0))
    return net


# -- a consumer: nirtorch's graph executor with modules that follow NIR's node definitions --------
class Integrator(torch.nn.Module):
    """nir.I, dv/dt = R I, stepped with dt = 1; the output is v."""

    def __init__(self, node):
        super().__init__()
        self.r = torch.nn.Parameter(torch.from_numpy(np.asarray(node.r, dtype=np.float64)), requires_grad=False)

    def forward(self, x, state=None):
        v = (state if state is not None else 0) + self.r * x
        return v, v


class Heaviside(torch.nn.Module):
    """nir.Threshold: 1 where v > threshold."""

    def __init__(self, node):
        super().__init__()
        self.level = torch.nn.Parameter(torch.from_numpy(np.asarray(node.threshold, dtype=np.float64)),
                                        requires_grad=False)

    def forward(self, x):
        return (x > self.level).to(x.dtype)


class Hadamard(torch.nn.Module):
    """nir.Scale."""

    def __init__(self, node):
        super().__init__()
        self.s = torch.nn.Parameter(torch.from_numpy(np.asarray(node.scale, dtype=np.float64)), requires_grad=False)

    def forward(self, x):
        return x * self.s


def _affine(node):
    m = torch.nn.Linear(node.weight.shape[1], node.weight.shape[0])
    m.weight.data = torch.from_numpy(np.asarray(node.weight, dtype=np.float64))
    m.bias.data = torch.from_numpy(np.asarray(node.bias, dtype=np.float64))
    return m


def _conv2d(node):
    w = np.asarray(node.weight, dtype=np.float64)
    m = torch.nn.Conv2d(w.shape[1] * node.groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(node.stride),
                        padding=tuple(node.padding), dilation=tuple(node.dilation), groups=node.groups)
    m.weight.data = torch.from_numpy(w)
    m.bias.data = torch.from_numpy(np.asarray(node.bias, dtype=np.float64))
    return m


# nirtorch 2.6's own defaults are replaced where they do not follow NIR: Affine (bias left unset),
# Conv2d (channel arguments swapped, so grouped convolutions fail) and Flatten (NIR's dims exclude
# the batch axis, torch's include it).
NODE_MAP = {
    nir.I: Integrator,
    nir.Threshold: Heaviside,
    nir.Scale: Hadamard,
    nir.Affine: _affine,
    nir.Conv2d: _conv2d,
    nir.Flatten: lambda node: torch.nn.Flatten(node.start_dim + 1, node.end_dim if node.end_dim < 0 else node.end_dim + 1),
}


def run_consumer(graph, net: Network, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run the NIR graph for T steps on encoded inputs; readout at step T and spike counts per IR node."""
    model = nirtorch.nir_to_torch(graph, NODE_MAP, dtype=torch.float64)
    levels = torch.from_numpy(encode(net.op(net.input_name), x).astype(np.float64))
    spiking = {k: n.metadata["csdc_node"] for k, n in graph.nodes.items()
               if isinstance(n, nir.Threshold) and k == n.metadata["csdc_node"].replace("/", "_")}
    counts = {ir: 0 for ir in spiking.values()}
    state = None
    with torch.no_grad():
        for _ in range(net.T):
            out, state = model(levels, state)
            for key, ir in spiking.items():
                counts[ir] = counts[ir] + state[f"{key}_prev_output"]
    return out.numpy(), {k: v.numpy().astype(np.int64) for k, v in counts.items()}


def test_roundtrip_through_nir_read(cnn0, tmp_path):
    path = tmp_path / "cnn.nir"
    written = export_nir(cnn0, path)
    read = nir.read(path)
    assert set(read.nodes) == set(written.nodes)
    assert sorted(read.edges) == sorted(written.edges)
    for key, node in written.nodes.items():
        back = read.nodes[key]
        assert type(back) is type(node), key
        for field in ("weight", "bias", "r", "threshold", "scale"):
            if hasattr(node, field):
                assert np.array_equal(np.asarray(getattr(back, field)), np.asarray(getattr(node, field))), (key, field)
    assert int(read.metadata["time_steps"]) == cnn0.T
    # every population's threshold, v0 and bias survive: NIR level = threshold - v0 - 1/2
    q1 = cnn0.op("q1")
    assert np.array_equal(read.nodes["q1"].threshold, q1.threshold - q1.v0 - 0.5)
    assert np.array_equal(read.nodes["q1_reset"].scale, -q1.threshold)


def test_consumer_reproduces_spike_counts_and_readout(cnn0, tmp_path):
    """nirtorch executes the file (recurrent edges read the previous step, as NIR's discrete-time
    consumers do) and gives csdc's spike counts of every IF population and max-pool, and its readout."""
    x, y = load_digits_split("test")
    export_nir(cnn0, tmp_path / "cnn.nir")
    graph = nir.read(tmp_path / "cnn.nir")
    readout, counts = run_consumer(graph, cnn0, x)
    ref = NumbaBackend().run(cnn0, x)
    assert set(counts) == set(ref.counts) == {"q1", "MaxPool", "q2", "MaxPool_1"}
    for name in ref.counts:
        assert np.array_equal(counts[name], ref.counts[name]), name
    assert np.array_equal(readout, ref.readout.astype(np.float64))
    logits = readout * graph.metadata["readout_scale"] + graph.metadata["readout_offset"]  # the documented contract
    assert np.array_equal(logits.argmax(1), ref.logits.argmax(1)) and np.mean(logits.argmax(1) == y) > 0.98
    assert sum(int(c.sum()) for c in counts.values()) > 1000  # the network is active


def test_plain_if_reset_to_value_loses_the_residual(cnn0):
    """Why csdc does not write nir.IF: it resets to a value. Even the closest setting (reset to where
    a subtraction leaves a neuron that just reached its threshold, v_reset = -v0 in the exported
    frame) drops the residual v - threshold, so populations fire fewer spikes than csdc's."""
    from csdc.ir.semantics import run_steps

    x, _ = load_digits_split("test")
    x = x[:16]
    steps = run_steps(cnn0, x, currents=True)
    q1 = cnn0.op("q1")
    level = to_nir(cnn0).nodes["q1"].threshold
    current = steps.currents["q1/QuantizeLinear_syn"] + np.asarray(q1.bias)  # (batch, T, C, H, W) per step
    v = np.zeros(current[:, 0].shape)
    count = np.zeros(current[:, 0].shape, dtype=np.int64)
    for t in range(cnn0.T):  # nir.IF(r=1, v_threshold=level, v_reset=-v0), dt = 1
        v = v + current[:, t]
        fire = v > level
        count += fire
        v = np.where(fire, -np.asarray(q1.v0, dtype=np.float64), v)
    exact = steps.counts["q1"]
    assert np.all(count <= exact) and count.sum() < exact.sum()


def test_cli_export_to_nir(tmp_path, capsys):
    sir = tmp_path / "cnn0.sir"
    assert main(["compile", CNN, "-o", str(sir), "--delay", "0"]) == 0
    out = tmp_path / "cnn.nir"
    assert main(["export", str(sir), "--to", "nir", "-o", str(out)]) == 0
    assert "NIR" in capsys.readouterr().out
    assert set(nir.read(out).nodes) == set(to_nir(serialize.load(str(sir))).nodes)
    assert main(["export", str(sir), "--to", "nir", "-o", str(tmp_path)]) == 2
    assert "is a directory; give the file to write" in capsys.readouterr().err


def test_delay_above_zero_refused_with_the_fix(tmp_path, capsys):
    sir = tmp_path / "cnn.sir"
    assert main(["compile", CNN, "-o", str(sir)]) == 0  # default D = T
    capsys.readouterr()
    out = tmp_path / "cnn.nir"
    assert main(["export", str(sir), "--to", "nir", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "node 'q1' (Neuron)" in err and "--delay 0" in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_csdformer_refused_at_its_first_inexpressible_node():
    net, _ = compile_onnx(CSDFORMER, CompileOptions(delay=0))
    with pytest.raises(CsdcError, match=r"node 'Reshape' \(Reshape\) cannot be expressed in NIR: reshape \(64, 4, 4\)"):
        to_nir(net)


def test_spike_matmul_refused_by_name():
    from csdc.ir.ops import SpikeMatMul

    net = Network(2)
    one = lambda shape: np.ones(shape, dtype=np.int64)
    net.add("in", Encode((2, 2), 1.0, 0, 1))
    net.add("a", Neuron(one((2, 2)), one((2, 2)), one((2, 2)) * 0, 0), ["in"])
    net.add("b", Neuron(one((2, 2)), one((2, 2)), one((2, 2)) * 0, 0), ["in"])
    net.add("mm", SpikeMatMul(1), ["a", "b"])
    net.add("c", Neuron(one((2, 2)), one((2, 2)), one((2, 2)) * 0, 0), ["mm"])
    net.add("f", Reshape((4,)), ["c"])
    net.add("d", DenseSynapse(one((3, 4))), ["f"])
    net.add("out", Readout(np.ones(3), np.zeros(3)), ["d"])
    with pytest.raises(CsdcError, match=r"node 'mm' \(SpikeMatMul\) cannot be expressed in NIR: NIR has no product"):
        to_nir(net)


def test_every_op_has_a_converter_or_a_reason():
    from csdc.backends.nir.export import NOT_EXPRESSIBLE

    assert set(OP_REGISTRY.values()) == set(CONVERTERS) | set(NOT_EXPRESSIBLE)


def _small_net(padding=(0, 0, 0, 0), bias=0) -> Network:
    net = Network(3)
    one = lambda shape: np.ones(shape, dtype=np.int64)
    net.add("in", Encode((1, 4, 4), 1.0, 0, 3))
    net.add("c", ConvSynapse(one((2, 1, 1, 1)) * 2), ["in"])
    net.add("n", Neuron(one((2, 4, 4)) * 3, one((2, 4, 4)), one((2, 4, 4)) * bias, 0), ["c"])
    net.add("p", SumPool((2, 2), (2, 2), padding), ["n"])
    net.add("n2", Neuron(one((2, 2, 2)) * 2, one((2, 2, 2)), one((2, 2, 2)) * 0, 0), ["p"])
    net.add("f", Reshape((8,)), ["n2"])
    net.add("d", DenseSynapse(one((3, 8))), ["f"])
    net.add("out", Readout(np.ones(3), np.zeros(3)), ["d"])
    return net


def test_sum_pool_and_bias(tmp_path):
    """SumPool2d and a per-channel bias folded into the conv: the consumer equals csdc."""
    net = _small_net(bias=-1)
    graph = to_nir(net)
    assert np.array_equal(graph.nodes["c"].bias, np.array([-1, -1], dtype=np.float32))
    assert isinstance(graph.nodes["p"], nir.SumPool2d) and isinstance(graph.nodes["d"], nir.Linear)
    x = np.random.default_rng(0).integers(0, 4, size=(8, 1, 4, 4)).astype(np.float32)
    export_nir(net, tmp_path / "small.nir")
    readout, counts = run_consumer(nir.read(tmp_path / "small.nir"), net, x)
    ref = NumbaBackend().run(net, x)
    for name in ("n", "n2"):
        assert np.array_equal(counts[name], ref.counts[name]), name
    assert np.array_equal(readout, ref.readout.astype(np.float64))


def test_asymmetric_padding_refused():
    with pytest.raises(CsdcError, match=r"node 'p' \(SumPool\).*asymmetric"):
        to_nir(_small_net(padding=(0, 0, 1, 1)))


@pytest.mark.parametrize("kernel,stride,padding,seed", [((2, 2), (2, 2), 0, 0), ((3, 3), (1, 1), 1, 1),
                                                        ((2, 2), (1, 2), 1, 2)])
def test_max_pool_subgraph_and_random_populations(kernel, stride, padding, seed):
    """Overlapping, padded and rectangular max-pool windows, random thresholds, v0 and biases
    (per channel, as a conv's bias): the consumer reproduces every count and the readout."""
    from csdc.ir.ops import SpikeMaxPool, pool_output_hw

    rng = np.random.default_rng(seed)
    T, c, hw = 6, 3, 6
    net = Network(T)
    net.add("in", Encode((2, hw, hw), 1.0, 0, 7))
    net.add("c1", ConvSynapse(rng.integers(-3, 4, size=(c, 2, 3, 3)), padding=(1, 1, 1, 1)), ["in"])
    theta = np.broadcast_to(rng.integers(2, 9, size=(c, 1, 1)), (c, hw, hw))
    net.add("n1", Neuron(theta, rng.integers(0, 3, size=(c, 1, 1)) * np.ones((c, hw, hw), dtype=np.int64),
                         np.broadcast_to(rng.integers(-2, 3, size=(c, 1, 1)), (c, hw, hw)), 0), ["c1"])
    pad = (padding,) * 4
    net.add("mp", SpikeMaxPool(kernel, stride, pad), ["n1"])
    oh, ow = pool_output_hw(hw, hw, kernel, stride, pad)
    net.add("f", Reshape((c * oh * ow,)), ["mp"])
    net.add("d", DenseSynapse(rng.integers(-4, 5, size=(5, c * oh * ow))), ["f"])
    net.add("n2", Neuron(np.full(5, 4), np.full(5, 2), rng.integers(-1, 2, size=5), 0), ["d"])
    net.add("d2", DenseSynapse(rng.integers(-4, 5, size=(3, 5))), ["n2"])
    net.add("out", Readout(np.ones(3), np.zeros(3)), ["d2"])
    x = rng.integers(0, 8, size=(16, 2, hw, hw)).astype(np.float32)
    readout, counts = run_consumer(to_nir(net), net, x)
    ref = NumbaBackend().run(net, x)
    for name in ("n1", "mp", "n2"):
        assert np.array_equal(counts[name], ref.counts[name]), name
    assert ref.counts["mp"].sum() > 0 and ref.counts["n2"].sum() > 0
    assert np.array_equal(readout, ref.readout.astype(np.float64))


def test_rectangular_kernel_refused():
    from csdc.ir.ops import SpikeMaxPool

    net = Network(2)
    one = lambda shape: np.ones(shape, dtype=np.int64)
    net.add("in", Encode((1, 4, 4), 1.0, 0, 3))
    net.add("c", ConvSynapse(one((2, 1, 1, 1))), ["in"])
    net.add("n", Neuron(one((2, 4, 4)), one((2, 4, 4)), one((2, 4, 4)) * 0, 0), ["c"])
    net.add("p", SpikeMaxPool((2, 1), (2, 1)), ["n"])
    net.add("f", Reshape((16,)), ["p"])
    net.add("d", DenseSynapse(one((3, 16))), ["f"])
    net.add("out", Readout(np.ones(3), np.zeros(3)), ["d"])
    with pytest.raises(CsdcError, match=r"node 'p' \(SpikeMaxPool\).*kernel \(2, 1\) is not square"):
        to_nir(net)
