"""Names of served models and tensors, defined once for the ONNX graphs, the Triton configs,
the Python-backend models, the local server and the client."""

# models in the Triton repository
ENSEMBLE = "captioner"
PREPROCESS = "preprocess"
ENCODER = "encoder"
DECODER = "decoder"
DECODE_LOOP = "decode_loop"

# ensemble / client tensors
IMAGE = "IMAGE"  # TYPE_STRING [1]: encoded image bytes (JPEG, PNG, ...)
CAPTION = "CAPTION"  # TYPE_STRING [1]: the caption
BEAM_SIZE = "BEAM_SIZE"  # TYPE_INT32 [1], optional: 1 = greedy
MAX_TOKENS = "MAX_TOKENS"  # TYPE_INT32 [1], optional: cap on generated tokens

# model tensors
PIXEL_VALUES = "pixel_values"  # FP32 [3, H, W]
ENCODER_HIDDEN = "encoder_hidden_states"  # FP32 [P, D]
CROSS_KV = "cross_kv"  # FP32 [2L, H, P, Dh]
INPUT_IDS = "input_ids"  # INT64 [T]
PAST_KV = "past_kv"  # FP32 [2L, H, T', Dh]
LOGITS = "logits"  # FP32 [T, V]
PRESENT_KV = "present_kv"  # FP32 [2L, H, T'+T, Dh]

# files written next to the Python-backend models
ONNX_MODEL_FILE = "model.onnx"  # encoder/<version>/, decoder/<version>/: Triton's default file for the onnxruntime backend
TOKENIZER_FILE = "tokenizer.json"
PREPROCESS_FILE = "preprocess.json"
DECODE_FILE = "decode.json"
DECODER_GRAPH_FILE = "decoder.onnx"  # decode_loop/<version>/: the decoder graph its in-process session runs
SELECT_ROWS_FILE = "select_rows.onnx"  # decode_loop/<version>/: gathers cache rows on the session's device
ROWS = "rows"  # INT64 [R']: rows to keep / reorder / duplicate (select_rows.onnx)
STATE = "state"  # FP32 [R, H, S, Dh]: one layer's cache or cross K/V tensor (select_rows.onnx input)
SELECTED = "selected"  # FP32 [R', ...]: its selected rows (select_rows.onnx output)

# the decode loop's step graph (decode_loop/<version>/decoder.onnx, built by captioner.export.graphs):
# one token per row per run, per-layer tensors so that nothing is sliced or concatenated per step
PAST_LENGTH = "past_sequence_length"  # INT32 [1]: positions already in the cache (= this token's position)
CROSS_KEY = "cross_key.{}"  # FP32 [B, H, P, Dh] of layer {}: bound once per caption
CROSS_VALUE = "cross_value.{}"
PAST_KEY = "past_key.{}"  # FP32 [B, H, S, Dh] of layer {}: S = max_len (kept in place) or T' (appended)
PAST_VALUE = "past_value.{}"
PRESENT_KEY = "present_key.{}"  # the same buffer as past_key.{} when the cache is kept in place
PRESENT_VALUE = "present_value.{}"
KV_CACHE_META = "captioner.kv_cache"  # the step graph's metadata: "in_place" or "append" (how the cache is bound)
MAX_LEN_META = "captioner.max_len"  # the step graph's metadata: positions the model has (in-place buffer length)
