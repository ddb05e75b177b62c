"""Triton Python-backend model sources. `captioner export` copies `preprocess.py` and
`decode_loop.py` into the repository as `<model>/<version>/model.py`; Triton imports them
with `triton_python_backend_utils` available, so this package is not imported otherwise."""
