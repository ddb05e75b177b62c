"""The web gateway (`captioner web`): the page for people and its JSON API in front of Triton or
`captioner serve`. Imports core and the light parts of serving (client, codec, limits): the gateway
image has neither tokenizers nor onnxruntime."""
