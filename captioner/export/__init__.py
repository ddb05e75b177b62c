"""ONNX export of the encoder and the decode loop's step graph, parity checks, graph optimisation
and int8/int4 quantisation, and the Triton repository export writes. Imports core, io, data,
modeling and serving (for the repository's configs and the runtime it checks parity against)."""
