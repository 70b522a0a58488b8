"""Event-driven numba simulator of the spiking IR (SPEC section 4).

``NumbaBackend().run(net, x)`` reproduces :func:`csdc.ir.semantics.run_steps` bit-exactly
for any neuron delay, with work proportional to the number of spikes.
``kernels_cached()`` tells whether the JIT-compiled kernels are already in numba's on-disk
cache (if not, the first run compiles them, which takes a while).
"""

from csdc.backends.numba.backend import NumbaBackend
from csdc.backends.numba.kernels import kernels_cached

__all__ = ["NumbaBackend", "kernels_cached"]
