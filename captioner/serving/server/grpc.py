"""The gRPC front of `captioner serve`: Triton's GRPCInferenceService (KServe v2, built on
`tritonclient.grpc.service_pb2_grpc`). Translation only: each RPC decodes its message, hands
off to the DataPlane (the same calls the HTTP/REST front makes) and encodes the answer, mapping
data-plane errors to gRPC status codes."""
from __future__ import annotations

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from captioner.core.deployment import GRPC_RESTRICTED_HEADER_PREFIX
from captioner.serving.server.codec import InputTensor, infer_response
from captioner.serving.server.dataplane import (CANCELLED, DEADLINE, INTERNAL, INVALID_ARG, NOT_FOUND, UNAVAILABLE,
                                                DataPlane, DataPlaneError)
from captioner.serving.server.errors import Deadline

# gRPC status per data-plane error code (Triton's src/grpc/grpc_utils.cc TritonCodeToGrpcCode)
GRPC_STATUS = {INVALID_ARG: grpc.StatusCode.INVALID_ARGUMENT, NOT_FOUND: grpc.StatusCode.NOT_FOUND,
               UNAVAILABLE: grpc.StatusCode.UNAVAILABLE, INTERNAL: grpc.StatusCode.INTERNAL,
               CANCELLED: grpc.StatusCode.CANCELLED, DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED}


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """gRPC wire decoding only: every RPC hands off to `plane`. `restricted`: (header, value)
    guarding the model-repository protocol, or None."""

    def __init__(self, plane: DataPlane, restricted: tuple[str, str] | None = None):
        self.plane = plane
        self.restricted = restricted

    @staticmethod
    def _abort(context, e: DataPlaneError):
        context.abort(GRPC_STATUS[e.code], str(e))

    # -- health and metadata
    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=self.plane.live())

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.plane.ready())

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(**self.plane.server_metadata())

    def _config(self, name: str, version: str, context) -> mc.ModelConfig:
        try:
            return self.plane.config(name, version)
        except DataPlaneError as e:
            self._abort(context, e)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    def ModelMetadata(self, request, context):
        try:
            md = self.plane.model_metadata(request.name, request.version)
        except DataPlaneError as e:
            self._abort(context, e)
        T = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=md["name"], versions=md["versions"], platform=md["platform"],
            inputs=[T(**t) for t in md["inputs"]], outputs=[T(**t) for t in md["outputs"]])

    def ModelConfig(self, request, context):
        return service_pb2.ModelConfigResponse(config=self._config(request.name, request.version, context))

    def ModelStatistics(self, request, context):
        try:
            stats = self.plane.model_statistics(request.name, request.version)
        except DataPlaneError as e:
            self._abort(context, e)
        return service_pb2.ModelStatisticsResponse(model_stats=[service_pb2.ModelStatistics(**s) for s in stats])

    # -- model repository protocol (Triton's RepositoryIndex / RepositoryModelLoad / RepositoryModelUnload),
    # restricted like `tritonserver --grpc-restricted-protocol=model-repository:KEY=VALUE`: without the
    # header the call fails UNAVAILABLE with Triton's message (server src/grpc/grpc_handler.h,
    # CommonCallData::Execute / ExecutePrecondition). The header tritonserver checks is
    # "triton-grpc-protocol-" + KEY (src/grpc/grpc_server.h kRestrictedProtocolHeaderTemplate,
    # prepended when main.cc parses the flag); the bare KEY is refused.
    def _restricted(self, context) -> None:
        if self.restricted is None:
            return
        key, value = self.restricted
        header = GRPC_RESTRICTED_HEADER_PREFIX + key
        if dict(context.invocation_metadata()).get(header) != value:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"This protocol is restricted, expecting header '{header}'")

    def RepositoryIndex(self, request, context):
        self._restricted(context)
        M = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(models=[M(**m) for m in self.plane.repository_index(request.ready)])

    def RepositoryModelLoad(self, request, context):
        self._restricted(context)
        try:
            self.plane.load_model(request.model_name, parameters=bool(request.parameters))
        except DataPlaneError as e:
            self._abort(context, e)
        return service_pb2.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        self._restricted(context)
        try:
            self.plane.unload_model(request.model_name)
        except DataPlaneError as e:
            self._abort(context, e)
        return service_pb2.RepositoryModelUnloadResponse()

    # -- inference
    def ModelInfer(self, request, context):
        try:
            inputs = self._wire_inputs(request)
            res = self.plane.infer(request.model_name, request.model_version, inputs,
                                   [o.name for o in request.outputs], Deadline.of(context), request.id)
        except DataPlaneError as e:
            self._abort(context, e)
        return infer_response(res.model, res.version, res.id, res.outputs)

    @staticmethod
    def _wire_inputs(request) -> list[InputTensor]:
        """gRPC ModelInferRequest -> InputTensors (raw_input_contents, or typed contents)."""
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise DataPlaneError(INVALID_ARG, f"[{request.model_name}] {len(request.inputs)} inputs but {len(raw)} "
                                              f"raw input contents")
        out = []
        for i, t in enumerate(request.inputs):
            if raw:
                out.append(InputTensor(t.name, t.datatype, list(t.shape), raw=raw[i]))
            elif t.datatype == "BYTES":
                out.append(InputTensor(t.name, t.datatype, list(t.shape), data=list(t.contents.bytes_contents)))
            else:
                c = t.contents
                data = list(c.fp32_contents or c.int64_contents or c.int_contents or c.bool_contents or [])
                out.append(InputTensor(t.name, t.datatype, list(t.shape), data=data if data else None))
        return out
