"""Training under torchrun/DDP, evaluation with pycocoevalcap, TensorBoard curves and the run
report. Imports core, io, data and modeling."""
