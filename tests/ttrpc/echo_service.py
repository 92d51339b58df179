"""A test-only ttrpc service built from a descriptor at run time (no generated code)."""

import asyncio

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass

from shim.ttrpc import TtrpcError

_file = descriptor_pb2.FileDescriptorProto(name="tests/echo.proto", package="test.echo", syntax="proto3")
_req = _file.message_type.add(name="EchoRequest")
_req.field.add(name="text", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_req.field.add(name="delay", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_req.field.add(name="reply_size", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_req.field.add(name="fail_code", number=4, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_rep = _file.message_type.add(name="EchoReply")
_rep.field.add(name="text", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_rep.field.add(name="blob", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_rep.field.add(name="namespace", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_svc = _file.service.add(name="Echo")
_svc.method.add(name="Echo", input_type=".test.echo.EchoRequest", output_type=".test.echo.EchoReply")
_svc.method.add(name="Missing", input_type=".test.echo.EchoRequest", output_type=".test.echo.EchoReply")

_pool = descriptor_pool.DescriptorPool()
_pool.Add(_file)
SERVICE = _pool.FindServiceByName("test.echo.Echo")
EchoRequest = GetMessageClass(_pool.FindMessageTypeByName("test.echo.EchoRequest"))
EchoReply = GetMessageClass(_pool.FindMessageTypeByName("test.echo.EchoReply"))


class EchoService:
    """Serves Echo; `Missing` is declared but deliberately not implemented."""

    def __init__(self):
        self.active = 0
        self.peak = 0

    async def Echo(self, request, context):
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if request.delay:
                await asyncio.sleep(request.delay)
            if request.fail_code:
                raise TtrpcError(request.fail_code, f"asked to fail: {request.text}")
            return EchoReply(text=request.text, blob=b"b" * request.reply_size,
                             namespace=context.first("containerd-namespace-ttrpc"))
        finally:
            self.active -= 1
