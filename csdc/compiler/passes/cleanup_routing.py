"""cleanup_routing: remove routing that moves nothing (IR pass, Network -> Network).

A Reshape to the shape it receives and a Transpose by the identity permutation are dropped;
a Reshape of a Reshape reads the first one's input. Spike and current values are unchanged.

Invariant established: no identity routing node and no Reshape -> Reshape chain remains.
"""

from __future__ import annotations

from csdc.ir.graph import Network
from csdc.ir.ops import Reshape, Transpose


def cleanup_routing(net: Network) -> Network:
    """Return a copy of ``net`` without no-op routing (see module docstring)."""
    out = Network(net.T, net.metadata)
    alias: dict[str, str] = {}
    for name, op in net.nodes():
        ins = [alias.get(s, s) for s in net.inputs(name)]
        if isinstance(op, Reshape) and out.info(ins[0]).shape == op.shape:
            alias[name] = ins[0]
            continue
        if isinstance(op, Transpose) and list(op.perm) == sorted(op.perm):
            alias[name] = ins[0]
            continue
        if isinstance(op, Reshape) and isinstance(out.op(ins[0]), Reshape) and len(out.consumers(ins[0])) == 0 \
                and all(c == name for c in net.consumers(ins[0]) if ins[0] in net):
            ins = out.inputs(ins[0])
        out.add(name, op, ins)
    # drop routing nodes left without consumers by the chain rule above
    dead = [n for n, op in out.nodes() if isinstance(op, (Reshape, Transpose)) and not out.consumers(n)]
    if dead:
        pruned = Network(out.T, out.metadata)
        for name, op in out.nodes():
            if name not in dead:
                pruned.add(name, op, out.inputs(name))
        out = pruned
    return out
