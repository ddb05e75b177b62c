"""Serving limits, each defined once with its reason: what one request may ask for, what the
builtin server (`captioner serve`: gRPC, HTTP/REST and metrics fronts) and the web gateway
(`captioner web`) accept and hold at once. Standard library only: the Triton Python models,
the servers and the gateway image (no tokenizers, no onnxruntime) all import it.

The per-image pixel cap of uploads is `captioner.core.preprocess.SERVING_MAX_PIXELS` (16 MP, a
phone photo; ingest accepts up to 50): it sits with the other decoding bounds it is checked with.
"""
from __future__ import annotations

# -- what one request may ask for ----------------------------------------------------------------
# Beams per image. The decoder's max_batch_size is MAX_BATCH x MAX_BEAM rows (one per beam), so
# the exported configs and every front's check read this one number.
MAX_BEAM = 8
# Images per batch for the encoder, preprocess, decode loop and the ensemble (config.pbtxt
# max_batch_size; the dynamic batcher gathers concurrent requests up to it).
MAX_BATCH = 8
# One request's images together: two images at the per-image cap (SERVING_MAX_PIXELS), which
# bounds one request's decoding to ~1 s of one core and ~150 MiB. Shared by the Triton
# preprocess model, `captioner serve` and the web gateway (which checks it from the headers).
REQUEST_PIXEL_BUDGET = 32_000_000

# -- the builtin server's image decoding ---------------------------------------------------------
# Requests of at most this many pixels in total decode in the light lane, larger ones in the heavy
# lane; each lane is a fixed pool, so decoding memory is bounded by the lanes' sizes whatever the
# number of concurrent requests: at most 2 x 4 MP + 1 x 32 MP decoded at a time, and a request of
# large images cannot hold up a small one.
LIGHT_REQUEST_PIXELS = 4_000_000
LIGHT_DECODERS, HEAVY_DECODERS = 2, 1

# -- messages and concurrency (gRPC; the HTTP/REST front takes the same bounds) ------------------
# Receive limit: the largest image we accept encoded, 16 MP at 1 byte/pixel (any JPEG photo up to
# quality 95, a PNG photo up to ~8 MP), plus 1 MiB for the other inputs and protobuf framing.
# gRPC refuses larger messages with RESOURCE_EXHAUSTED before our code sees them.
MAX_IMAGE_BYTES = 16 << 20
MAX_RECEIVE_MESSAGE = MAX_IMAGE_BYTES + (1 << 20)
MAX_SEND_MESSAGE = 256 << 20  # our own answers (decoder logits/present K/V for a full batch)
# RPCs in progress at once (handler threads); beyond it gRPC answers RESOURCE_EXHAUSTED at once.
# Received requests held in memory are bounded by MAX_CONCURRENT_RPCS x MAX_RECEIVE_MESSAGE (544 MiB);
# the HTTP/REST front admits as many inference requests at once (503 + Retry-After beyond), each
# holding one copy of its body: another 544 MiB at most.
MAX_CONCURRENT_RPCS = 32

# -- HTTP fronts (the builtin server's HTTP/REST port and the web gateway) -----------------------
MAX_JSON_HEADER = 1 << 20  # the JSON part of a REST infer request (tensor metadata; JSON tensors are small here)
# Read timeouts (nginx's client_header_timeout / client_body_timeout are per read, 60 s; ours
# are shorter: the largest body is 17 MiB on the server, 32 MiB on the gateway).
HEADER_TIMEOUT_S = 10.0  # a request head complete within this of the connection / its first byte
BODY_IDLE_TIMEOUT_S = 15.0  # longest pause between two reads of a body
BODY_TIMEOUT_S = 120.0  # a whole body (17 MiB at 150 kB/s)
MAX_TIMEOUT_US = 86_400 * 10**6  # parameters.timeout beyond a day: no deadline (Triton's uint64 has no use for more)
RETRY_AFTER_S = 1  # the REST front's Retry-After when MAX_CONCURRENT_RPCS requests are in progress
SCRAPE_READ_TIMEOUT_S = 10  # /metrics socket timeout: an idle or slow scraper ends its own thread

# -- the web gateway -----------------------------------------------------------------------------
MAX_IMAGES = 16  # images per gateway request (`captioner web --max-images`)
MAX_BODY = 32 << 20  # a gateway request of 16 phone JPEGs (~2 MB each) (`captioner web --max-body`)
CAPTION_TIMEOUT_S = 60.0  # one upstream ModelInfer call
# Memory admission. COPIES: a request's bytes are held at most three times at once (the received
# tensor buffer, the upstream message built from it, gRPC's copy while sending). MEMORY_BUDGET:
# what admitted requests may hold together: 3 max-size (32 MiB) requests; with the process's own
# ~120 MiB that stays under 75% of the pod's 768Mi (k8s/base/web.yaml).
COPIES = 3
MEMORY_BUDGET = 320 << 20
MAX_IN_FLIGHT = MAX_CONCURRENT_RPCS  # gateway requests in progress whatever their size
WEB_RETRY_AFTER_S = 2  # the gateway's Retry-After when busy or the model server is
UPSTREAM_MAX_BYTES = MAX_IMAGE_BYTES  # images per upstream message: `captioner serve` receives 17 MiB at most
