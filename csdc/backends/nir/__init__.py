"""Export to NIR, the Neuromorphic Intermediate Representation (``pip install csdc[nir]``).

``export_nir(net, "net.nir")`` writes the part of the spiking IR that NIR can express;
``to_nir(net)`` returns the :class:`nir.NIRGraph`. See docs/nir.md for the encoding.
"""

from csdc.backends.nir.export import CONVERTERS, export_nir, to_nir

__all__ = ["CONVERTERS", "export_nir", "to_nir"]
