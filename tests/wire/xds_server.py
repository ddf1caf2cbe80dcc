"""An xDS management server for the xDS config tests, serving rate limit configs the way
Envoy Gateway serves them to envoyproxy/ratelimit: the aggregated discovery service (ADS),
state of the world, resources of type ratelimit.config.ratelimit.v3.RateLimitConfig.

The discovery messages are the Python code PyPI's `xds-protos` generates from Envoy's own
protos. `RateLimitConfig` is not in that package, so its descriptor is built here, field by
field, from envoyproxy/ratelimit's published numbers: meshlimit's `.proto` copies are
checked against an independent definition, not against themselves.

    python tests/wire/xds_server.py STATE_DIR [PORT] [CERT KEY [CLIENT_CA]]

Prints `listening port=PORT` once bound (PORT 0 or absent: any free loopback port). With a
PEM certificate and key it speaks TLS only; with CLIENT_CA too, it requires a client
certificate signed by it (Envoy Gateway's mTLS).

The test drives it through STATE_DIR:
- `snapshot.json` (written by the test, replaced atomically): `{"version": "1", "configs":
  [...]}`, each config a RateLimitConfig as JSON (name, domain, descriptors with key, value,
  rate_limit {unit, requests_per_unit, unlimited, name, replaces}, shadow_mode, metadata,
  ...), or `{"type_url": ..., "hex": ...}` for a resource of raw bytes. A new version is pushed to
  every open stream; a new stream gets the current one.
- `requests.jsonl` (written here): every DiscoveryRequest received, one JSON object a line.
"""

import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    struct_pb2,
)

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

TYPE_URL = "type.googleapis.com/ratelimit.config.ratelimit.v3.RateLimitConfig"
PACKAGE = "ratelimit.config.ratelimit.v3"


def rate_limit_config_class():
    """RateLimitConfig, defined from envoyproxy/ratelimit's field numbers."""
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="meshlimit_test/rls_conf.proto", package=PACKAGE, syntax="proto3"
    )

    def message(name, fields):
        m = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                # A name with a dot is another package's, written in full.
                f.type_name = f".{type_name}" if "." in type_name else f".{PACKAGE}.{type_name}"

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("RateLimitConfig", [
        ("name", 1, F.TYPE_STRING, one, None),
        ("domain", 2, F.TYPE_STRING, one, None),
        ("descriptors", 3, F.TYPE_MESSAGE, many, "RateLimitDescriptor"),
    ])
    message("RateLimitDescriptor", [
        ("key", 1, F.TYPE_STRING, one, None),
        ("value", 2, F.TYPE_STRING, one, None),
        ("rate_limit", 3, F.TYPE_MESSAGE, one, "RateLimitPolicy"),
        ("descriptors", 4, F.TYPE_MESSAGE, many, "RateLimitDescriptor"),
        ("shadow_mode", 5, F.TYPE_BOOL, one, None),
        ("detailed_metric", 6, F.TYPE_BOOL, one, None),
        ("quota_mode", 7, F.TYPE_BOOL, one, None),
        ("metadata", 8, F.TYPE_MESSAGE, one, "google.protobuf.Struct"),
    ])
    message("RateLimitPolicy", [
        ("unit", 1, F.TYPE_ENUM, one, "RateLimitUnit"),
        ("requests_per_unit", 2, F.TYPE_UINT32, one, None),
        ("unlimited", 3, F.TYPE_BOOL, one, None),
        ("name", 4, F.TYPE_STRING, one, None),
        ("replaces", 5, F.TYPE_MESSAGE, many, "RateLimitReplace"),
    ])
    message("RateLimitReplace", [("name", 1, F.TYPE_STRING, one, None)])
    unit = proto.enum_type.add(name="RateLimitUnit")
    for name, number in [("UNKNOWN", 0), ("SECOND", 1), ("MINUTE", 2), ("HOUR", 3),
                         ("DAY", 4), ("MONTH", 5), ("YEAR", 6), ("WEEK", 7)]:
        unit.value.add(name=name, number=number)
    proto.dependency.append(struct_pb2.DESCRIPTOR.name)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(struct_pb2.DESCRIPTOR.serialized_pb))
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.RateLimitConfig"))


RateLimitConfig = rate_limit_config_class()


class Snapshots:
    """The current snapshot, reloaded when its file changes; streams wait on `changed`."""

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, "snapshot.json")
        self.changed = threading.Condition()
        self.version = None
        self.resources = None
        self.nonce = 0

    def poll_forever(self):
        while True:
            try:
                with open(self.path, encoding="utf-8") as f:
                    snapshot = json.load(f)
            except (OSError, ValueError):
                snapshot = None
            if snapshot and snapshot["version"] != self.version:
                resources = [self.pack(config) for config in snapshot["configs"]]
                with self.changed:
                    self.version, self.resources = snapshot["version"], resources
                    self.changed.notify_all()
            time.sleep(0.05)

    @staticmethod
    def pack(config):
        if "hex" in config:
            return any_pb2.Any(type_url=config["type_url"], value=bytes.fromhex(config["hex"]))
        message = json_format.ParseDict(config, RateLimitConfig())
        return any_pb2.Any(type_url=TYPE_URL, value=message.SerializeToString())

    def response(self):
        """The current snapshot as a response with a fresh nonce (call with `changed` held)."""
        self.nonce += 1
        return discovery_pb2.DiscoveryResponse(
            version_info=self.version,
            resources=self.resources,
            type_url=TYPE_URL,
            nonce=str(self.nonce),
        )


class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, snapshots, log):
        self.snapshots = snapshots
        self.log = log
        self.lock = threading.Lock()

    def record(self, request, headers, stream):
        node = request.node
        line = {
            "stream": stream,
            "node_id": node.id,
            "node_metadata": json_format.MessageToDict(node.metadata),
            "user_agent_name": node.user_agent_name,
            "type_url": request.type_url,
            "version_info": request.version_info,
            "response_nonce": request.response_nonce,
            "error_code": request.error_detail.code if request.HasField("error_detail") else None,
            "error": request.error_detail.message if request.HasField("error_detail") else None,
            "headers": headers,
        }
        with self.lock:
            self.log.write(json.dumps(line) + "\n")
            self.log.flush()

    def StreamAggregatedResources(self, request_iterator, context):
        headers = {key: value for key, value in context.invocation_metadata()}
        stream = id(context)
        done = threading.Event()
        subscribed = threading.Event()

        def read():
            try:
                for request in request_iterator:
                    self.record(request, headers, stream)
                    if request.type_url == TYPE_URL:
                        subscribed.set()
            except grpc.RpcError:
                pass
            finally:
                done.set()
                with self.snapshots.changed:
                    self.snapshots.changed.notify_all()

        threading.Thread(target=read, daemon=True).start()
        while not subscribed.wait(timeout=0.5):
            if done.is_set():
                return
        sent = None
        while not done.is_set() and context.is_active():
            with self.snapshots.changed:
                if self.snapshots.version is not None and self.snapshots.version != sent:
                    sent = self.snapshots.version
                    response = self.snapshots.response()
                else:
                    self.snapshots.changed.wait(timeout=0.5)
                    continue
            yield response


def main():
    state_dir = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    tls = sys.argv[3:6]
    snapshots = Snapshots(state_dir)
    threading.Thread(target=snapshots.poll_forever, daemon=True).start()
    log = open(os.path.join(state_dir, "requests.jsonl"), "a", encoding="utf-8")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Ads(snapshots, log), server)
    address = f"127.0.0.1:{port}"
    if tls:
        with open(tls[0], "rb") as cert, open(tls[1], "rb") as key:
            pair = (key.read(), cert.read())
        client_ca = None
        if len(tls) > 2:
            with open(tls[2], "rb") as ca:
                client_ca = ca.read()
        credentials = grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        sys.exit(f"cannot listen on {address}")
    server.start()
    print(f"listening port={bound}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
