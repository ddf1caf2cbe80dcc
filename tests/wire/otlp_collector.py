"""An OTLP trace collector for the tracing tests: takes spans over gRPC and over HTTP.

It decodes with the Python code PyPI's `xds-protos` generates from OpenTelemetry's own
protos (Envoy's API depends on them), so meshlimit's hand-written OTLP protos are checked
against an independent copy, and real Envoy exports its spans to the same place.

    python tests/wire/otlp_collector.py SPANS_FILE [CERT KEY [CLIENT_CA]]

With COLLECTOR_REFUSE_FIRST=N in the environment, the first N exports (over either port)
are refused as a busy collector refuses them: HTTP 503, gRPC UNAVAILABLE. With a PEM
certificate and key, both ports speak TLS only; with CLIENT_CA too, they
require a client certificate it signed. Prints
`listening grpc=PORT http=PORT` once both loopback ports are bound, then appends
every span received as one JSON line to SPANS_FILE: where it came in, the exporting
service's name, the ids in hex, name, kind, attributes, status, and the request's headers.
"""

import http.server
import json
import os
import ssl
import sys
import threading
from concurrent import futures

import grpc

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
lock = threading.Lock()
refusals_left = [int(os.environ.get("COLLECTOR_REFUSE_FIRST", "0"))]


def refuse_this_one():
    """True for the first COLLECTOR_REFUSE_FIRST exports."""
    with lock:
        if refusals_left[0] > 0:
            refusals_left[0] -= 1
            return True
        return False


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def scopes(resource_spans):
    """(scope name, spans) of each scope. xds-protos carries an OTLP from before
    `instrumentation_library_spans` was renamed `scope_spans`: the same field numbers, so
    the same bytes, under older names."""
    for scope_spans in resource_spans.instrumentation_library_spans:
        yield scope_spans.instrumentation_library.name, scope_spans.spans


def record(out, via, request, headers):
    """Writes each span of an ExportTraceServiceRequest as a JSON line."""
    with lock:
        for resource_spans in request.resource_spans:
            resource = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}
            for scope, spans in scopes(resource_spans):
                for span in spans:
                    line = {
                        "via": via,
                        "resource": resource,
                        "scope": scope,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "trace_state": span.trace_state,
                        "name": span.name,
                        "kind": span.kind,
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "attributes": {a.key: value_of(a.value) for a in span.attributes},
                        "status_code": span.status.code,
                        "status_message": span.status.message,
                        "headers": headers,
                    }
                    out.write(json.dumps(line) + "\n")
        out.flush()


def main():
    out = open(sys.argv[1], "a", encoding="utf-8")

    def export(request, context):
        if refuse_this_one():
            context.abort(grpc.StatusCode.UNAVAILABLE, "busy, try again")
        headers = {key: value for key, value in context.invocation_metadata()}
        record(out, "grpc", request, headers)
        return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                export,
                request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
                response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    tls = sys.argv[2:5]
    client_ca = tls[2] if len(tls) > 2 else None
    if tls:
        with open(tls[0], "rb") as cert, open(tls[1], "rb") as key:
            pair = (key.read(), cert.read())
        roots = None
        if client_ca:
            with open(client_ca, "rb") as ca:
                roots = ca.read()
        credentials = grpc.ssl_server_credentials(
            [pair], root_certificates=roots, require_client_auth=roots is not None
        )
        grpc_port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    class Http(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/traces":
                self.send_error(404, "OTLP/HTTP traces are posted to /v1/traces")
                return
            if self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_error(415, "expected application/x-protobuf")
                return
            if refuse_this_one():
                self.send_error(503, "busy, try again")
                return
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            headers = {key.lower(): value for key, value in self.headers.items()}
            record(out, "http", request, headers)
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Http)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls[0], tls[1])
        if client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(client_ca)
        web.socket = context.wrap_socket(web.socket, server_side=True)
    print(f"listening grpc={grpc_port} http={web.server_address[1]}", flush=True)
    web.serve_forever()


if __name__ == "__main__":
    main()
