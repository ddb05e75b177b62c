"""The run folder's layout, defined once: the files `captioner train` writes into its output
folder (and mirrors to the model store), what `captioner evaluate` and `captioner report` add
to it, and the files of the local pipeline run's work folder. Modules import these names
instead of repeating the strings."""
from __future__ import annotations

# --- written by training (captioner.training.train, captioner.modeling.checkpoint) ---
CKPT_LATEST, CKPT_BEST = "ckpt_latest.pt", "ckpt_best.pt"
CONFIG_FILE = "config.yaml"  # the run's whole config (also beside an evaluation and in an exported repository)
DATA_SUMMARY_FILE = "data_summary.json"  # what the data loader found (images, captions, splits, skipped)
METRICS_LOG = "metrics.jsonl"  # one line per logged training step
VAL_METRICS_LOG = "val_metrics.jsonl"  # one line per validation
TB_DIR = "tb"  # TensorBoard events (captioner.training.board)
RUN_LOGS = (METRICS_LOG, VAL_METRICS_LOG)  # travel with the checkpoint to the store
RUN_LOG_DIRS = (TB_DIR,)  # so do these folders' files
# The store's list of those files: the trainer's MinIO user may read and write objects under
# models/runs/ but not list them (k8s/base/minio.yaml), so a restarted pod finds them here.
LOG_INDEX = "run_log_files.json"

# --- added by `captioner evaluate` (one folder per split and decoding settings) and `captioner report` ---
EVAL_DIR_PREFIX = "eval_"  # eval_<split>[_<settings>]/
EVAL_METRICS_FILE = "metrics.json"
EVAL_CAPTIONS_FILE = "captions.json"
EVAL_SAMPLES_FILE = "samples.html"  # per-image captions and scores, the worst first
REPORT_FILE = "report.html"

# --- the local pipeline run's work folder (captioner.pipeline.local_run) ---
PIPELINE_SUMMARY_FILE = "summary.json"
PIPELINE_SAMPLES_FILE = EVAL_SAMPLES_FILE  # the evaluate step's page, copied to the work folder
