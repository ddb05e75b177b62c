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
TOKENIZER_FILE = "tokenizer.json"
PREPROCESS_FILE = "preprocess.json"
DECODE_FILE = "decode.json"
DECODER_GRAPH_FILE = "decoder.onnx"  # decode_loop/<version>/: the decoder graph its in-process session runs
SELECT_ROWS_FILE = "select_rows.onnx"  # decode_loop/<version>/: gathers cache rows on the session's device
ROWS = "rows"  # INT64 [R']: rows to keep / reorder / duplicate (select_rows.onnx)
STATE = "state"  # FP32 [R, ...]: a cache tensor (select_rows.onnx input)
SELECTED = "selected"  # FP32 [R', ...]: its selected rows (select_rows.onnx output)
