"""A gRPC client nobody at Roster wrote: Python grpcio resolving xds:///echo
with its built-in xDS support (bootstrap from GRPC_XDS_BOOTSTRAP) and
calling the echo example's servers, one call after another. Prints a line
per call: "ok <instance>" or "err <status code>".

Usage: echo_xds_client.py <the repository's proto directory>
"""

import os
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

proto_dir = sys.argv[1]
out = tempfile.mkdtemp()
if protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}",
                f"--grpc_python_out={out}", "roster/examples/echo.proto"]) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, out)
from roster.examples import echo_pb2, echo_pb2_grpc  # noqa: E402

assert os.environ.get("GRPC_XDS_BOOTSTRAP"), "GRPC_XDS_BOOTSTRAP names the bootstrap file"
# A dead server is retried soon rather than after grpc's 1 s-and-growing backoff.
channel = grpc.insecure_channel("xds:///echo", options=[
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
])
stub = echo_pb2_grpc.EchoStub(channel)
while True:
    try:
        reply = stub.Say(echo_pb2.EchoRequest(message="hi"), timeout=1)
        print("ok", reply.instance, flush=True)
    except grpc.RpcError as e:
        print("err", e.code().name, flush=True)
    time.sleep(0.005)
