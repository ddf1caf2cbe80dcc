#!/usr/bin/env python3
"""The checks of deploy/ that need Python packages; tests/deploy_manifests.rs runs them
with the .venv that scripts/test.sh installs (tests/requirements.txt).

  kubernetes KUBECTL OVERLAY_DIR...
      Renders each overlay with `KUBECTL kustomize`, validates every object against
      Kubernetes' own JSON schemas (PyPI kubernetes-validate: offline, strict, for the
      oldest and the newest Kubernetes it knows) and prints {overlay: [objects]} as JSON.

  envoyfilter FILE CONTEXT
      Checks an Istio EnvoyFilter's fields, then applies its patches the way istiod does
      to a minimal Envoy bootstrap for CONTEXT (GATEWAY or SIDECAR_INBOUND) and prints
      that bootstrap: a template with {{LISTENER_PORT}}, {{ADMIN_PORT}}, {{RLS_PORT}} and
      {{UPSTREAM_PORT}} for tests/common/envoy.rs to fill in and run.

  grafana FILE PROMTOOL
      Checks the dashboard's structure, has Prometheus' promtool parse every query, and
      prints the queries and the metric names they read as JSON.

Problems are printed to stderr, one a line, and make the exit status 1.
"""

import copy
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"


class Problems:
    """Collects every problem, so one run reports them all instead of the first."""

    def __init__(self):
        self.lines = []

    def add(self, line):
        self.lines.append(line)

    def exit_if_any(self):
        if self.lines:
            for line in self.lines:
                print(line, file=sys.stderr)
            sys.exit(1)


# ---- kubernetes ------------------------------------------------------------------------

# Strict schemas (unknown fields are errors) of the oldest and the newest Kubernetes that
# kubernetes-validate ships: the manifests use nothing newer than the first.
KUBERNETES_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]


def kubernetes(kubectl, overlays):
    problems = Problems()
    rendered = {}
    for overlay in overlays:
        result = subprocess.run(
            [kubectl, "kustomize", overlay], capture_output=True, text=True
        )
        if result.returncode != 0:
            problems.add(f"{kubectl} kustomize {overlay} failed:\n{result.stderr}")
            continue
        # kustomize warns on stderr about deprecated fields even when it succeeds.
        if result.stderr.strip():
            problems.add(f"{kubectl} kustomize {overlay} warned:\n{result.stderr}")
        objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        for obj in objects:
            name = f"{overlay}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as error:
                    where = "/".join(str(part) for part in error.path) or "(top level)"
                    problems.add(f"{name}: Kubernetes {version}: {where}: {error.message}")
                except kubernetes_validate.SchemaNotFoundError as error:
                    problems.add(f"{name}: Kubernetes {version} has no such kind: {error}")
        rendered[overlay] = objects
    problems.exit_if_any()
    json.dump(rendered, sys.stdout)


# ---- envoyfilter -----------------------------------------------------------------------

# The part of Istio's EnvoyFilter API (networking.istio.io/v1alpha3) that deploy/istio
# uses, with Istio's enum values. Unknown fields are errors, as istiod rejects them.
def _object(properties, required=()):
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(required),
    }


STRING = {"type": "string"}
LABELS = {"type": "object", "additionalProperties": STRING}
ENVOYFILTER_SCHEMA = _object(
    {
        "apiVersion": {"enum": ["networking.istio.io/v1alpha3"]},
        "kind": {"const": "EnvoyFilter"},
        "metadata": {
            "type": "object",
            "properties": {"name": STRING, "namespace": STRING, "labels": LABELS},
            "required": ["name", "namespace"],
        },
        "spec": _object(
            {
                "workloadSelector": _object({"labels": LABELS}, ["labels"]),
                "priority": {"type": "integer"},
                "configPatches": {
                    "type": "array",
                    "minItems": 1,
                    "items": _object(
                        {
                            "applyTo": {
                                "enum": [
                                    "LISTENER",
                                    "FILTER_CHAIN",
                                    "NETWORK_FILTER",
                                    "HTTP_FILTER",
                                    "ROUTE_CONFIGURATION",
                                    "VIRTUAL_HOST",
                                    "HTTP_ROUTE",
                                    "CLUSTER",
                                    "EXTENSION_CONFIG",
                                    "BOOTSTRAP",
                                    "LISTENER_FILTER",
                                ]
                            },
                            "match": _object(
                                {
                                    "context": {
                                        "enum": [
                                            "ANY",
                                            "SIDECAR_INBOUND",
                                            "SIDECAR_OUTBOUND",
                                            "GATEWAY",
                                        ]
                                    },
                                    "listener": _object(
                                        {
                                            "portNumber": {"type": "integer"},
                                            "name": STRING,
                                            "filterChain": _object(
                                                {
                                                    "name": STRING,
                                                    "sni": STRING,
                                                    "filter": _object(
                                                        {
                                                            "name": STRING,
                                                            "subFilter": _object(
                                                                {"name": STRING}
                                                            ),
                                                        }
                                                    ),
                                                }
                                            ),
                                        }
                                    ),
                                    "routeConfiguration": _object(
                                        {
                                            "portNumber": {"type": "integer"},
                                            "portName": STRING,
                                            "gateway": STRING,
                                            "name": STRING,
                                            "vhost": _object(
                                                {
                                                    "name": STRING,
                                                    "route": _object(
                                                        {
                                                            "name": STRING,
                                                            "action": {
                                                                "enum": [
                                                                    "ANY",
                                                                    "ROUTE",
                                                                    "REDIRECT",
                                                                    "DIRECT_RESPONSE",
                                                                ]
                                                            },
                                                        }
                                                    ),
                                                }
                                            ),
                                        }
                                    ),
                                }
                            ),
                            "patch": _object(
                                {
                                    "operation": {
                                        "enum": [
                                            "MERGE",
                                            "ADD",
                                            "REMOVE",
                                            "INSERT_BEFORE",
                                            "INSERT_AFTER",
                                            "INSERT_FIRST",
                                            "REPLACE",
                                        ]
                                    },
                                    "value": {"type": "object"},
                                },
                                ["operation", "value"],
                            ),
                        },
                        ["applyTo", "match", "patch"],
                    ),
                },
            },
            ["configPatches"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)


def skeleton(context):
    """What istiod generates for CONTEXT, reduced to what the patches touch: one HTTP
    listener whose connection manager ends in the router, a route that forwards to the
    upstream and one that answers directly (which a ROUTE-only patch must leave alone)."""
    connection_manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": context.lower(),
        # Istio's gateways and inbound sidecars take the peer address as the client's,
        # which is what the `remote_address` action sends.
        "use_remote_address": True,
        "route_config": {
            "name": "routes",
            "virtual_hosts": [
                {
                    "name": "backend",
                    "domains": ["*"],
                    "routes": [
                        {
                            "name": "direct",
                            "match": {"path": "/direct"},
                            "direct_response": {
                                "status": 200,
                                "body": {"inline_string": "direct"},
                            },
                        },
                        {
                            "name": "app",
                            "match": {"prefix": "/"},
                            "route": {"cluster": "app"},
                        },
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": ROUTER,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http."
                    "router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {
            "address": {
                "socket_address": {"address": "127.0.0.1", "port_value": "{{ADMIN_PORT}}"}
            }
        },
        "static_resources": {
            "listeners": [
                {
                    "name": context.lower(),
                    "address": {
                        "socket_address": {
                            "address": "127.0.0.1",
                            "port_value": "{{LISTENER_PORT}}",
                        }
                    },
                    "filter_chains": [
                        {"filters": [{"name": HCM, "typed_config": connection_manager}]}
                    ],
                }
            ],
            "clusters": [static_cluster("app", "{{UPSTREAM_PORT}}", http2=False)],
        },
    }


def static_cluster(name, port, http2):
    cluster = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def proto_merge(target, patch):
    """Istio's MERGE is protobuf's: messages merge field by field, repeated fields are
    appended to, scalars are replaced."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            proto_merge(target[key], value)
        elif isinstance(value, list) and isinstance(target.get(key), list):
            target[key].extend(copy.deepcopy(value))
        else:
            target[key] = copy.deepcopy(value)


def route_action(route):
    for action in ("route", "redirect", "direct_response"):
        if action in route:
            return {"route": "ROUTE", "redirect": "REDIRECT"}.get(action, "DIRECT_RESPONSE")
    return "ANY"


def apply_patch(index, patch, context, bootstrap, problems):
    where = f"configPatches[{index}]"
    match = patch["match"]
    if match.get("context", "ANY") not in ("ANY", context):
        problems.add(f"{where}: context {match['context']} is not {context}")
        return
    listener = bootstrap["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    operation = patch["patch"]["operation"]
    value = patch["patch"]["value"]

    if patch["applyTo"] == "HTTP_FILTER" and operation == "INSERT_BEFORE":
        network_filter = match.get("listener", {}).get("filterChain", {}).get("filter", {})
        if network_filter.get("name") != HCM:
            problems.add(f"{where}: an HTTP filter patch must match the filter {HCM}")
            return
        names = [f["name"] for f in manager["http_filters"]]
        anchor = network_filter.get("subFilter", {}).get("name")
        if anchor not in names:
            problems.add(
                f"{where}: subFilter {anchor!r} is not in the chain {names}; "
                "istiod would apply this patch nowhere"
            )
            return
        manager["http_filters"].insert(names.index(anchor), copy.deepcopy(value))
    elif patch["applyTo"] == "HTTP_ROUTE" and operation == "MERGE":
        vhost_match = match.get("routeConfiguration", {}).get("vhost", {})
        route_match = vhost_match.get("route", {})
        merged = 0
        for vhost in manager["route_config"]["virtual_hosts"]:
            if vhost_match.get("name") not in (None, vhost["name"]):
                continue
            for route in vhost["routes"]:
                if route_match.get("name") not in (None, route["name"]):
                    continue
                if route_match.get("action", "ANY") not in ("ANY", route_action(route)):
                    continue
                proto_merge(route, value)
                merged += 1
        if merged == 0:
            problems.add(f"{where}: matches no route; istiod would apply it nowhere")
    else:
        problems.add(
            f"{where}: {patch['applyTo']} with {operation} is not a patch this check "
            "knows how to apply; teach apply_patch in tests/deploy/check_deploy.py"
        )


def envoyfilter(path, context):
    problems = Problems()
    with open(path) as file:
        documents = [doc for doc in yaml.safe_load_all(file) if doc]
    if len(documents) != 1:
        problems.add(f"{path}: expected one EnvoyFilter, found {len(documents)} documents")
        problems.exit_if_any()
    document = documents[0]
    for error in jsonschema.Draft202012Validator(ENVOYFILTER_SCHEMA).iter_errors(document):
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        problems.add(f"{path}: {where}: {error.message}")
    problems.exit_if_any()

    bootstrap = skeleton(context)
    for index, patch in enumerate(document["spec"]["configPatches"]):
        apply_patch(index, patch, context, bootstrap, problems)

    # The rate limit service's cluster, as istiod would generate it for the Service:
    # HTTP/2, here pointing at the meshlimit the test starts.
    manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ratelimit = [
        f
        for f in manager["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ratelimit"
    ]
    if len(ratelimit) != 1:
        problems.add(f"{path}: expected one envoy.filters.http.ratelimit, found {len(ratelimit)}")
        problems.exit_if_any()
    service = ratelimit[0]["typed_config"].get("rate_limit_service", {})
    cluster = service.get("grpc_service", {}).get("envoy_grpc", {}).get("cluster_name")
    if not cluster:
        problems.add(f"{path}: the ratelimit filter names no envoy_grpc cluster")
    problems.exit_if_any()
    bootstrap["static_resources"]["clusters"].append(
        static_cluster(cluster, "{{RLS_PORT}}", http2=True)
    )

    text = json.dumps(bootstrap, indent=2)
    # Ports are numbers once filled in: drop the quotes around their placeholders.
    text = re.sub(r'"(\{\{[A-Z_]+_PORT\}\})"', r"\1", text)
    print(text)


# ---- grafana ---------------------------------------------------------------------------

# What Grafana puts in place of its variables, close enough for promtool to parse.
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
METRIC_NAME = re.compile(r"\b(?:ratelimit_service|meshlimit)_[a-z_]+\b")


def substitute_variables(expr):
    def value(match):
        name = match.group(1) or match.group(2)
        # Dashboard variables only appear inside =~"..." matchers.
        return GRAFANA_BUILTINS.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def grafana(path, promtool):
    problems = Problems()
    with open(path) as file:
        dashboard = json.load(file)

    for field in ("title", "uid", "panels", "templating", "schemaVersion"):
        if field not in dashboard:
            problems.add(f"{path}: no `{field}`")
    problems.exit_if_any()

    variables = {v["name"]: v for v in dashboard["templating"].get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.add(f"{path}: no `datasource` variable of type datasource to pick Prometheus")

    queries = []
    ids = set()
    panels = list(dashboard["panels"])
    for panel in panels:
        panels.extend(panel.get("panels", []))  # rows may nest their panels
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problems.add(f"{path}: panel {title!r}: id {panel.get('id')} used twice")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        if not {"x", "y", "w", "h"} <= set(panel.get("gridPos", {})):
            problems.add(f"{path}: panel {title!r}: gridPos needs x, y, w and h")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.add(f"{path}: panel {title!r}: datasource is not ${{datasource}}")
        targets = panel.get("targets", [])
        if not targets:
            problems.add(f"{path}: panel {title!r}: no queries")
        for target in targets:
            if not target.get("expr") or not target.get("refId"):
                problems.add(f"{path}: panel {title!r}: a query lacks expr or refId")
                continue
            queries.append({"panel": title, "refId": target["refId"], "expr": target["expr"]})
    for name, variable in variables.items():
        if variable.get("type") == "query":
            definition = variable.get("definition") or variable.get("query", {}).get("query")
            queries.append({"panel": f"variable {name}", "refId": name, "expr": definition})

    # promtool parses PromQL only inside rule files: one recording rule per query.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": substitute_variables(q["expr"])}
                    for i, q in enumerate(queries)
                    # label_values(...) is Grafana's, not PromQL.
                    if not q["expr"].startswith("label_values(")
                ],
            }
        ]
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as rules_file:
        yaml.safe_dump(rules, rules_file)
        rules_file.flush()
        result = subprocess.run(
            [promtool, "check", "rules", rules_file.name], capture_output=True, text=True
        )
        if result.returncode != 0:
            problems.add(f"promtool check rules on the dashboard's queries failed:")
            problems.add(result.stdout + result.stderr)
            problems.add(yaml.safe_dump(rules))
    problems.exit_if_any()

    metrics = sorted({name for q in queries for name in METRIC_NAME.findall(q["expr"])})
    json.dump({"queries": queries, "metrics": metrics}, sys.stdout)


def main(argv):
    commands = {
        "kubernetes": (lambda args: kubernetes(args[0], args[1:]), 2),
        "envoyfilter": (lambda args: envoyfilter(args[0], args[1]), 2),
        "grafana": (lambda args: grafana(args[0], args[1]), 2),
    }
    if len(argv) < 2 or argv[1] not in commands or len(argv) - 2 < commands[argv[1]][1]:
        sys.exit(__doc__)
    commands[argv[1]][0](argv[2:])


if __name__ == "__main__":
    main(sys.argv)
