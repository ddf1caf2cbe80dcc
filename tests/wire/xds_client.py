"""A second, independent client of meshlimit's ShouldRateLimit.

It uses the Python code that PyPI's `xds-protos` generates from Envoy's own protos, and
`grpcio`, so a mistake shared by meshlimit's Rust types and the Rust tests cannot hide
here. Run by tests/wire_python.rs against tests/fixtures/config/wire.yaml:

    python tests/wire/xds_client.py 127.0.0.1:8081

Prints each exchange and every mismatch as JSON; exits 1 on a mismatch, 2 on a gRPC error.
"""

import json
import sys

import grpc
from google.protobuf import wrappers_pb2
from google.protobuf.json_format import MessageToDict

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import ratelimit_unit_pb2

Code = rls_pb2.RateLimitResponse
Unit = rls_pb2.RateLimitResponse.RateLimit


def descriptor(*entries, limit=None, hits_addend=None):
    """A descriptor of (key, value) entries, with an optional limit override and hits."""
    built = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if limit is not None:
        requests_per_unit, unit = limit
        built.limit.CopyFrom(
            ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(
                requests_per_unit=requests_per_unit, unit=unit
            )
        )
    if hits_addend is not None:
        built.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits_addend))
    return built


class Checker:
    """Collects mismatches instead of stopping at the first, so one run shows them all."""

    def __init__(self):
        self.mismatches = []

    def equal(self, where, got, expected):
        if got != expected:
            self.mismatches.append({"where": where, "expected": expected, "got": got})

    def within(self, where, got, low, high):
        if not low <= got <= high:
            self.mismatches.append({"where": where, "expected": f"{low}..={high}", "got": got})

    def status(self, where, status, code, limit=None, remaining=None, reset_max=None):
        """One DescriptorStatus: its code; `limit` is (name, requests_per_unit, unit) or
        None for "no limit applies"; `reset_max` bounds duration_until_reset in seconds."""
        self.equal(f"{where}.code", Code.Code.Name(status.code), Code.Code.Name(code))
        if limit is None:
            self.equal(f"{where}.has_current_limit", status.HasField("current_limit"), False)
        else:
            name, requests_per_unit, unit = limit
            self.equal(f"{where}.current_limit.name", status.current_limit.name, name)
            self.equal(
                f"{where}.current_limit.requests_per_unit",
                status.current_limit.requests_per_unit,
                requests_per_unit,
            )
            self.equal(
                f"{where}.current_limit.unit",
                Unit.Unit.Name(status.current_limit.unit),
                Unit.Unit.Name(unit),
            )
        if remaining is not None:
            self.equal(f"{where}.limit_remaining", status.limit_remaining, remaining)
        if reset_max is not None:
            reset = status.duration_until_reset.seconds
            self.within(f"{where}.duration_until_reset.seconds", reset, 1, reset_max)


def call(stub, exchanges, name, request):
    try:
        response = stub.ShouldRateLimit(request, timeout=10)
    except grpc.RpcError as err:
        print(json.dumps({"exchange": name, "grpc_error": str(err.code()), "details": err.details()}))
        sys.exit(2)
    exchanges.append(
        {
            "exchange": name,
            "request": MessageToDict(request),
            "response": MessageToDict(response),
        }
    )
    return response


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} HOST:PORT")
    stub = rls_pb2_grpc.RateLimitServiceStub(grpc.insecure_channel(sys.argv[1]))
    check = Checker()
    exchanges = []

    # hits_addend 2 on the request: [user] (5 a minute in wire.yaml) has 3 left; the
    # override replaces whatever the config says for [api_key] with 10 an hour, unnamed;
    # [path] matches nothing, so no limit applies to it.
    first = call(
        stub,
        exchanges,
        "within limits",
        rls_pb2.RateLimitRequest(
            domain="wire",
            hits_addend=2,
            descriptors=[
                descriptor(("user", "dave")),
                descriptor(("api_key", "k1"), limit=(10, ratelimit_unit_pb2.HOUR)),
                descriptor(("path", "/unconfigured")),
            ],
        ),
    )
    check.equal("first.overall_code", Code.Code.Name(first.overall_code), "OK")
    check.equal("first.len(statuses)", len(first.statuses), 3)
    if len(first.statuses) == 3:
        check.status("first.statuses[0]", first.statuses[0], Code.OK, ("per_user", 5, Unit.MINUTE), 3, 60)
        check.status("first.statuses[1]", first.statuses[1], Code.OK, ("", 10, Unit.HOUR), 8, 3600)
        check.status("first.statuses[2]", first.statuses[2], Code.OK, None)

    # The descriptor's own hits_addend (4) wins over the request's (1): dave's 2 + 4 hits
    # pass his 5 a minute, so both the status and the whole answer are OVER_LIMIT.
    second = call(
        stub,
        exchanges,
        "over the limit",
        rls_pb2.RateLimitRequest(
            domain="wire",
            hits_addend=1,
            descriptors=[descriptor(("user", "dave"), hits_addend=4)],
        ),
    )
    check.equal("second.overall_code", Code.Code.Name(second.overall_code), "OVER_LIMIT")
    check.equal("second.len(statuses)", len(second.statuses), 1)
    if len(second.statuses) == 1:
        check.status(
            "second.statuses[0]", second.statuses[0], Code.OVER_LIMIT, ("per_user", 5, Unit.MINUTE), 0, 60
        )

    # A domain with no config is allowed, with one status per descriptor and no limit.
    third = call(
        stub,
        exchanges,
        "unknown domain",
        rls_pb2.RateLimitRequest(
            domain="no-such-domain",
            descriptors=[descriptor(("user", "dave")), descriptor(("user", "erin"), ("path", "/"))],
        ),
    )
    check.equal("third.overall_code", Code.Code.Name(third.overall_code), "OK")
    check.equal("third.len(statuses)", len(third.statuses), 2)
    for index, status in enumerate(third.statuses):
        check.status(f"third.statuses[{index}]", status, Code.OK, None)

    print(json.dumps({"exchanges": exchanges, "mismatches": check.mismatches}, indent=2))
    sys.exit(1 if check.mismatches else 0)


if __name__ == "__main__":
    main()
