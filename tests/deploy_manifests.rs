//! deploy/ checked with the real tools and against the real binary:
//!
//! - Kubernetes: each overlay as `kubectl kustomize` renders it, every object validated
//!   against Kubernetes' own JSON schemas, and the ports, probe path, settings, config and
//!   user compared with what `meshlimit serve --help`, `meshlimit validate` and the
//!   Dockerfile say.
//! - Istio: each EnvoyFilter's patches applied to a minimal Envoy config of its context,
//!   which a real Envoy validates and then runs against the real meshlimit serving the
//!   ConfigMap's config, so the descriptors it sends are shown to hit the limits the
//!   config sets.
//! - Dockerfile: hadolint, and its binary path, ports, user and config directory.
//! - Grafana: promtool parses every query, every metric it reads is on `/metrics`, and
//!   `promtool check metrics` takes `/metrics` itself.
//! - Alerts: `promtool check rules` and `promtool test rules` (tests/deploy/alerts_test.yaml)
//!   pass, every metric the rules read is on `/metrics`, and a real Prometheus scraping a
//!   real meshlimit fires the config alert when a broken file arrives.
//!
//! The checks that need Python packages (kubernetes-validate, jsonschema, PyYAML) are in
//! tests/deploy/check_deploy.py. The tools come from `scripts/test.sh`: .venv/bin/kubectl,
//! promtool, prometheus, hadolint and python.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use common::envoy::{self, Envoy};
use common::meshlimit::{self, Meshlimit};
use common::redis::RedisServer;
use common::upstream::EchoUpstream;
use common::xds::XdsServer;
use common::{http, repo_root, venv_tool};
use serde_json::Value;

const OVERLAYS: [&str; 3] = ["memory", "memory-persistent", "redis"];
const GATEWAY_FILTER: &str = "deploy/istio/gateway-ratelimit.yaml";
const SIDECAR_FILTER: &str = "deploy/istio/sidecar-ratelimit.yaml";
const DASHBOARD: &str = "deploy/grafana/meshlimit.json";
/// The directory the ConfigMap is generated from.
const CONFIG_DIR: &str = "deploy/kubernetes/base/config";

/// The metrics the dashboard is built on: every metric src/metrics.rs exports (README,
/// "Metrics"), each on some panel.
const DASHBOARD_METRICS: &[&str] = &[
    "ratelimit_service_rate_limit_total_hits",
    "ratelimit_service_rate_limit_over_limit",
    "ratelimit_service_rate_limit_near_limit",
    "ratelimit_service_rate_limit_over_limit_with_local_cache",
    "ratelimit_service_rate_limit_within_limit",
    "ratelimit_service_rate_limit_shadow_mode",
    "ratelimit_service_config_load_success",
    "ratelimit_service_config_load_error",
    "meshlimit_config_hash",
    "meshlimit_decision_duration_seconds",
    "meshlimit_store_duration_seconds",
    "meshlimit_store_errors_total",
    "meshlimit_shed_total",
    "meshlimit_local_cache_hits_total",
    "meshlimit_cache_entries",
    "meshlimit_cache_evictions_total",
    "meshlimit_snapshot_last_saved_timestamp_seconds",
    "meshlimit_snapshot_counters",
    "meshlimit_snapshot_failed_saves_total",
    "meshlimit_redis_degraded",
    "meshlimit_redis_fallback_decisions_total",
    "meshlimit_grpc_connections",
    "meshlimit_grpc_connections_opened_total",
    "meshlimit_grpc_connections_rotated_total",
    "meshlimit_grpc_connections_cut_total",
];

// ---- tools ---------------------------------------------------------------------------

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|err| panic!("failed to run {command:?}: {err}"))
}

fn stdout_of(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} exited with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// tests/deploy/check_deploy.py with `args`; its stdout.
fn check_deploy(args: &[&str]) -> String {
    let python = venv_tool("MESHLIMIT_PYTHON", "bin/python");
    stdout_of(
        Command::new(python)
            .arg(repo_root().join("tests/deploy/check_deploy.py"))
            .args(args)
            .current_dir(repo_root()),
    )
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// `meshlimit serve --help`, which lists every flag with its environment variable and
/// default.
fn serve_help() -> &'static str {
    static HELP: OnceLock<String> = OnceLock::new();
    HELP.get_or_init(|| stdout_of(meshlimit::command().args(["serve", "--help"])))
}

/// The environment variables `serve` reads, from its `[env: NAME=]` lines.
fn help_settings() -> BTreeSet<String> {
    serve_help()
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split_once('=').map(|(name, _)| name.to_owned()))
        .collect()
}

/// The default of `flag` (e.g. `--grpc-addr`) as `serve --help` gives it.
fn help_default(flag: &str) -> String {
    let help = serve_help();
    let section = help
        .split_once(&format!("{flag} <"))
        .unwrap_or_else(|| panic!("no {flag} in serve --help:\n{help}"))
        .1;
    section
        .split_once("[default: ")
        .and_then(|(_, rest)| rest.split_once(']'))
        .unwrap_or_else(|| panic!("no default for {flag} in serve --help"))
        .0
        .to_owned()
}

/// The port in the default address of `flag` (e.g. `--grpc-addr`).
fn help_default_port(flag: &str) -> u16 {
    let default = help_default(flag);
    default
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("default of {flag} is not host:port: {default}"))
}

// ---- rendered Kubernetes objects ------------------------------------------------------

/// Every overlay rendered and schema-checked once per test run: overlay name → objects.
fn rendered() -> &'static BTreeMap<String, Vec<Value>> {
    static RENDERED: OnceLock<BTreeMap<String, Vec<Value>>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let kubectl = venv_tool("MESHLIMIT_KUBECTL", "bin/kubectl");
        let overlays: Vec<String> = OVERLAYS
            .iter()
            .map(|name| format!("deploy/kubernetes/overlays/{name}"))
            .collect();
        let mut args = vec!["kubernetes", path_arg(&kubectl)];
        args.extend(overlays.iter().map(String::as_str));
        let by_dir: BTreeMap<String, Vec<Value>> =
            serde_json::from_str(&check_deploy(&args)).expect("check_deploy.py prints JSON");
        by_dir
            .into_iter()
            .map(|(dir, objects)| (dir.rsplit('/').next().unwrap_or(&dir).to_owned(), objects))
            .collect()
    })
}

fn overlay(name: &str) -> &'static [Value] {
    rendered()
        .get(name)
        .unwrap_or_else(|| panic!("overlay {name} was not rendered"))
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} among the rendered objects"))
}

fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in {value:#}"))
}

fn meshlimit_container(objects: &[Value]) -> &Value {
    let containers = at(
        find(objects, "Deployment", "meshlimit"),
        "/spec/template/spec/containers",
    );
    containers
        .as_array()
        .and_then(|list| list.iter().find(|c| c["name"] == "meshlimit"))
        .expect("a container named meshlimit")
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

fn container_port(container: &Value, name: &str) -> u16 {
    container["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|port| u16::try_from(port).ok())
        .unwrap_or_else(|| panic!("no container port named {name} in {container:#}"))
}

// ---- Dockerfile -----------------------------------------------------------------------

/// One instruction of a Dockerfile: keyword and the rest, continuation lines joined.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("deploy/Dockerfile"))
        .expect("read deploy/Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => current.push_str(start),
            None => {
                current.push_str(line);
                if let Some((keyword, rest)) = current.trim().split_once(char::is_whitespace) {
                    instructions.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
                }
                current.clear();
            }
        }
    }
    instructions
}

/// The instructions of the last stage: what the image runs.
fn runtime_stage() -> Vec<(String, String)> {
    let instructions = dockerfile_instructions();
    let last_from = instructions
        .iter()
        .rposition(|(keyword, _)| keyword == "FROM")
        .expect("a FROM");
    instructions[last_from..].to_vec()
}

fn instruction<'a>(stage: &'a [(String, String)], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|(k, _)| k == keyword)
        .map(|(_, rest)| rest.as_str())
        .collect()
}

/// The image's numeric user id (`USER uid:gid`).
fn image_uid() -> u64 {
    let stage = runtime_stage();
    let users = instruction(&stage, "USER");
    let [user] = users.as_slice() else {
        panic!("the runtime stage needs exactly one USER, found {users:?}")
    };
    user.split(':')
        .next()
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| panic!("USER {user} is not numeric: runAsNonRoot cannot check names"))
}

// ---- Kubernetes -------------------------------------------------------------------------

#[test]
fn overlays_render_and_pass_kubernetes_schemas() {
    // check_deploy.py has validated every object (strict schemas); here: nothing is missing.
    let base = [
        "Namespace/meshlimit",
        "ServiceAccount/meshlimit",
        "ConfigMap/meshlimit-config",
        "Service/meshlimit",
        "Service/meshlimit-headless",
        "Deployment/meshlimit",
        "PodDisruptionBudget/meshlimit",
        "HorizontalPodAutoscaler/meshlimit",
    ];
    let redis_only = [
        "Deployment/meshlimit-redis",
        "Service/meshlimit-redis",
        "NetworkPolicy/meshlimit-redis",
    ];
    for name in OVERLAYS {
        let kinds: BTreeSet<String> = overlay(name)
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect();
        let mut expected: BTreeSet<String> = base.iter().map(|s| (*s).to_owned()).collect();
        if name == "redis" {
            expected.extend(redis_only.iter().map(|s| (*s).to_owned()));
        }
        if name == "memory-persistent" {
            expected.insert("PersistentVolumeClaim/meshlimit-counters".to_owned());
        }
        assert_eq!(kinds, expected, "objects of the {name} overlay");
        for object in overlay(name) {
            if object["kind"] != "Namespace" {
                assert_eq!(
                    object["metadata"]["namespace"], "meshlimit",
                    "{name}: {object:#}"
                );
            }
        }
    }
}

#[test]
fn manifests_use_the_binarys_ports_probe_path_and_settings() {
    let grpc_port = help_default_port("--grpc-addr");
    let admin_port = help_default_port("--admin-addr");
    let settings = help_settings();
    for name in OVERLAYS {
        let objects = overlay(name);
        let container = meshlimit_container(objects);

        // The image's entrypoint is `meshlimit serve`: the manifests must not replace it.
        assert!(
            container.get("command").is_none() && container.get("args").is_none(),
            "{name}: the container overrides the image's `meshlimit serve`: {container:#}"
        );
        assert_eq!(container_port(container, "grpc"), grpc_port, "{name}");
        assert_eq!(
            container_port(container, "http-admin"),
            admin_port,
            "{name}"
        );
        // Readiness follows Redis when asked to; liveness must not, or a Redis outage
        // would restart every replica.
        for (probe, path) in [
            ("readinessProbe", "/healthcheck"),
            ("livenessProbe", "/live"),
        ] {
            assert_eq!(
                at(container, &format!("/{probe}/httpGet/path")),
                path,
                "{name}: {probe}"
            );
            assert_eq!(
                at(container, &format!("/{probe}/httpGet/port")),
                "http-admin",
                "{name}: {probe}"
            );
        }

        for env in container["env"].as_array().expect("env") {
            let setting = env["name"].as_str().expect("env name");
            assert!(
                settings.contains(setting),
                "{name}: the manifests set {setting}, which `meshlimit serve --help` does not \
                 list: {settings:?}"
            );
        }

        // MESHLIMIT_CONFIG names the directory the ConfigMap is mounted at.
        let config_dir = env_value(container, "MESHLIMIT_CONFIG").expect("MESHLIMIT_CONFIG");
        let mount = container["volumeMounts"]
            .as_array()
            .and_then(|mounts| mounts.iter().find(|m| m["mountPath"] == config_dir))
            .unwrap_or_else(|| panic!("{name}: nothing is mounted at {config_dir}"));
        let volume = at(
            find(objects, "Deployment", "meshlimit"),
            "/spec/template/spec/volumes",
        )
        .as_array()
        .and_then(|volumes| volumes.iter().find(|v| v["name"] == mount["name"]))
        .expect("the mounted volume");
        let config_map = at(volume, "/configMap/name")
            .as_str()
            .expect("configMap name");
        find(objects, "ConfigMap", config_map);

        // The Service sends its named ports to the container's ports of the same name,
        // and tells meshes the gRPC port speaks gRPC.
        let service = find(objects, "Service", "meshlimit");
        for port in at(service, "/spec/ports").as_array().expect("ports") {
            let target = port["targetPort"].as_str().expect("named targetPort");
            assert_eq!(
                port["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
                Some(container_port(container, target)),
                "{name}: Service port {port}"
            );
        }
        let grpc = at(service, "/spec/ports")
            .as_array()
            .and_then(|ports| ports.iter().find(|p| p["name"] == "grpc"))
            .expect("a grpc Service port");
        assert_eq!(grpc["appProtocol"], "grpc", "{name}");
    }
}

#[test]
fn config_map_is_the_example_config_and_loads() {
    let root = repo_root();
    assert_eq!(
        std::fs::read_to_string(root.join(CONFIG_DIR).join("edge.yaml")).expect("read copy"),
        std::fs::read_to_string(root.join("examples/config/edge.yaml")).expect("read example"),
        "{CONFIG_DIR}/edge.yaml must stay a copy of examples/config/edge.yaml (kustomize \
         reads files only below the kustomization)"
    );

    // What the pods will read: the rendered ConfigMap's files, loaded by the binary.
    let config_map = find(overlay("memory"), "ConfigMap", "meshlimit-config");
    let dir = tempfile::tempdir().expect("temp dir");
    for (file, text) in at(config_map, "/data").as_object().expect("data") {
        std::fs::write(dir.path().join(file), text.as_str().expect("text")).expect("write");
    }
    let summary = stdout_of(meshlimit::command().arg("validate").arg(dir.path()));
    for domain in ["domain edge", "domain mesh"] {
        assert!(summary.contains(domain), "no {domain} in:\n{summary}");
    }
}

#[test]
fn every_pod_runs_restricted_and_bounded() {
    for name in OVERLAYS {
        for deployment in overlay(name).iter().filter(|o| o["kind"] == "Deployment") {
            let what = format!("{name}: Deployment/{}", deployment["metadata"]["name"]);
            let pod = at(deployment, "/spec/template/spec");
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{what}"
            );
            assert_eq!(pod["automountServiceAccountToken"], false, "{what}");
            for container in pod["containers"].as_array().expect("containers") {
                let context = &container["securityContext"];
                assert_eq!(context["allowPrivilegeEscalation"], false, "{what}");
                assert_eq!(context["readOnlyRootFilesystem"], true, "{what}");
                assert_eq!(
                    context["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{what}"
                );
                for bound in ["requests/cpu", "requests/memory", "limits/memory"] {
                    at(&container["resources"], &format!("/{bound}"));
                }
            }
        }
        // The user the image runs as, which runAsNonRoot can only check as a number.
        let pod = at(
            find(overlay(name), "Deployment", "meshlimit"),
            "/spec/template/spec",
        );
        assert_eq!(
            pod["securityContext"]["runAsUser"].as_u64(),
            Some(image_uid()),
            "{name}: runAsUser and deploy/Dockerfile's USER differ"
        );
    }
}

#[test]
fn memory_overlay_runs_exactly_one_replica() {
    runs_one_memory_replica("memory");
}

/// `name` counts in memory with exactly one replica.
fn runs_one_memory_replica(name: &str) {
    let objects = overlay(name);
    assert_eq!(
        env_value(meshlimit_container(objects), "MESHLIMIT_STORE"),
        Some("memory")
    );
    let deployment = find(objects, "Deployment", "meshlimit");
    assert_eq!(at(deployment, "/spec/replicas"), 1);
    // Two replicas of the memory store would each count on their own: the autoscaler must
    // not add any.
    let hpa = find(objects, "HorizontalPodAutoscaler", "meshlimit");
    assert_eq!(at(hpa, "/spec/minReplicas"), 1);
    assert_eq!(at(hpa, "/spec/maxReplicas"), 1);
}

/// memory-persistent: the memory overlay, its counters saved on a claimed volume and read
/// back by the next pod, which starts only once the old one has stopped (and saved).
#[test]
fn memory_persistent_overlay_keeps_the_counters_on_a_volume() {
    runs_one_memory_replica("memory-persistent");
    let objects = overlay("memory-persistent");
    let container = meshlimit_container(objects);
    let snapshot = env_value(container, "MESHLIMIT_MEMORY_SNAPSHOT").expect("a snapshot path");
    let deployment = find(objects, "Deployment", "meshlimit");
    assert_eq!(at(deployment, "/spec/strategy/type"), "Recreate");
    assert!(
        deployment["spec"]["strategy"]
            .get("rollingUpdate")
            .is_none(),
        "Recreate takes no rollingUpdate"
    );
    let pod = at(deployment, "/spec/template/spec");
    // The mount holding the snapshot is the claimed volume, writable by the image's group.
    let mount = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| snapshot.starts_with(m["mountPath"].as_str().unwrap_or("-")))
        .unwrap_or_else(|| panic!("nothing mounted where {snapshot} is"));
    assert_ne!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    let claim = volume["persistentVolumeClaim"]["claimName"]
        .as_str()
        .expect("a claimed volume");
    let pvc = find(objects, "PersistentVolumeClaim", claim);
    assert_eq!(at(pvc, "/spec/accessModes/0"), "ReadWriteOnce");
    assert_eq!(
        pod["securityContext"]["fsGroup"].as_u64(),
        Some(image_uid())
    );
}

#[test]
fn redis_overlay_points_meshlimit_at_its_redis() {
    let objects = overlay("redis");
    let container = meshlimit_container(objects);
    assert_eq!(env_value(container, "MESHLIMIT_STORE"), Some("redis"));
    let url = env_value(container, "MESHLIMIT_REDIS_URL").expect("MESHLIMIT_REDIS_URL");
    let (host, port) = url
        .strip_prefix("redis://")
        .and_then(|rest| rest.split_once(':'))
        .unwrap_or_else(|| panic!("{url} is not redis://host:port"));
    let port: u64 = port.parse().expect("numeric port");

    // The URL's host is the Service in meshlimit's namespace, on the URL's port, and the
    // Service selects the Redis pods.
    let service = find(objects, "Service", host);
    assert!(
        at(service, "/spec/ports")
            .as_array()
            .is_some_and(|ports| ports.iter().any(|p| p["port"] == port)),
        "{host} has no port {port}: {service:#}"
    );
    let redis = find(objects, "Deployment", host);
    let pod_labels = at(redis, "/spec/template/metadata/labels");
    for (key, value) in at(service, "/spec/selector").as_object().expect("selector") {
        assert_eq!(
            &pod_labels[key], value,
            "Service {host} does not select Redis"
        );
    }
    // Only meshlimit's pods may reach it.
    let policy = find(objects, "NetworkPolicy", host);
    let meshlimit_labels = at(
        find(objects, "Deployment", "meshlimit"),
        "/spec/template/metadata/labels",
    );
    let allowed = at(policy, "/spec/ingress/0/from/0/podSelector/matchLabels");
    for (key, value) in allowed.as_object().expect("matchLabels") {
        assert_eq!(
            &meshlimit_labels[key], value,
            "NetworkPolicy lets in other pods"
        );
    }
    // With shared counters the autoscaler may add replicas.
    let hpa = find(objects, "HorizontalPodAutoscaler", "meshlimit");
    assert!(at(hpa, "/spec/maxReplicas").as_u64() > Some(1), "{hpa:#}");
}

// ---- Dockerfile -------------------------------------------------------------------------

#[test]
fn dockerfile_passes_hadolint_and_matches_the_binary_and_manifests() {
    let hadolint = venv_tool("MESHLIMIT_HADOLINT", "bin/hadolint");
    stdout_of(Command::new(hadolint).arg(repo_root().join("deploy/Dockerfile")));

    let all = dockerfile_instructions();
    assert!(
        instruction(&all, "RUN")
            .iter()
            .any(|run| run.contains("cargo build --release --locked --bin meshlimit")),
        "the build stage must build the release binary from Cargo.lock: {all:?}"
    );

    let stage = runtime_stage();
    // ENTRYPOINT ["<binary>", "serve"], where <binary> is what the stage copies in.
    let entrypoints = instruction(&stage, "ENTRYPOINT");
    let [entrypoint] = entrypoints.as_slice() else {
        panic!("one ENTRYPOINT expected: {entrypoints:?}")
    };
    let entrypoint: Vec<String> =
        serde_json::from_str(entrypoint).expect("ENTRYPOINT in exec (JSON) form");
    assert_eq!(entrypoint.len(), 2, "{entrypoint:?}");
    assert_eq!(entrypoint[1], "serve");
    let copies = instruction(&stage, "COPY");
    assert!(
        copies
            .iter()
            .any(|c| c.starts_with("--from=build ") && c.ends_with(&format!(" {}", entrypoint[0]))),
        "ENTRYPOINT runs {}, which no COPY --from=build puts there: {copies:?}",
        entrypoint[0]
    );

    // envoyproxy/ratelimit's `/bin/ratelimit`, for Deployments written for it.
    assert!(
        copies
            .iter()
            .any(|c| c.starts_with("--from=build ") && c.ends_with(" /bin/ratelimit")),
        "no /bin/ratelimit for envoyproxy/ratelimit's Deployments: {copies:?}"
    );

    // EXPOSE the binary's default ports, the same the manifests use.
    let exposed: BTreeSet<u16> = instruction(&stage, "EXPOSE")
        .iter()
        .flat_map(|ports| ports.split_whitespace())
        .map(|port| port.parse().expect("numeric EXPOSE"))
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([
            help_default_port("--grpc-addr"),
            help_default_port("--admin-addr")
        ])
    );

    // The config directory: the binary's default, holding the example config, and where
    // Kubernetes mounts its ConfigMap. Not an ENV, which would beat an envoyproxy/ratelimit
    // Deployment's RUNTIME_ROOT.
    let config_dir = help_default("--config");
    let config_dir = config_dir.as_str();
    assert!(
        !instruction(&stage, "ENV")
            .iter()
            .any(|env| env.starts_with("MESHLIMIT_CONFIG=")),
        "ENV MESHLIMIT_CONFIG in the image would beat a deployment's RUNTIME_ROOT"
    );
    assert!(help_settings().contains("MESHLIMIT_CONFIG"));
    assert!(
        copies
            .iter()
            .any(|c| c.starts_with("examples/config/ ")
                && c.trim_end_matches('/').ends_with(config_dir)),
        "the example config is not copied to {config_dir}: {copies:?}"
    );
    for name in OVERLAYS {
        assert_eq!(
            env_value(meshlimit_container(overlay(name)), "MESHLIMIT_CONFIG"),
            Some(config_dir),
            "{name}"
        );
    }
    assert_ne!(image_uid(), 0, "the image must not run as root");

    // The build context is the repository root, filtered by Dockerfile.dockerignore: what
    // the build reads must pass it, the bulky local state must not.
    let ignore = std::fs::read_to_string(repo_root().join("deploy/Dockerfile.dockerignore"))
        .expect("read deploy/Dockerfile.dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let ignored = |path: &str| {
        patterns.iter().any(|p| {
            path == *p
                || path.starts_with(&format!("{p}/"))
                || p.strip_prefix("**/")
                    .is_some_and(|name| path.split('/').any(|c| c == name))
        })
    };
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src/main.rs",
        "proto",
        "examples/config/edge.yaml",
    ] {
        assert!(repo_root().join(needed).exists(), "{needed} is missing");
        assert!(
            !ignored(needed),
            "Dockerfile.dockerignore excludes {needed}"
        );
    }
    for local in ["target", ".git", ".venv"] {
        assert!(
            ignored(local),
            "Dockerfile.dockerignore sends {local} to the build"
        );
    }
}

// ---- Istio --------------------------------------------------------------------------------

/// The Envoy bootstrap that `file`'s patches make of a minimal config for `context`, as a
/// template for `envoy::render`.
fn envoyfilter_bootstrap(file: &str, context: &str) -> String {
    check_deploy(&["envoyfilter", file, context])
}

/// The bootstrap with every port filled in, parsed.
fn envoyfilter_config(template: &str) -> Value {
    let ports = ["LISTENER_PORT", "ADMIN_PORT", "RLS_PORT", "UPSTREAM_PORT"];
    let filled = envoy::render(template, &ports.map(|p| (p, "1".to_owned())));
    serde_json::from_str(&filled).expect("the bootstrap is JSON")
}

fn ratelimit_filter(config: &Value) -> &Value {
    at(
        config,
        "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
    )
    .as_array()
    .and_then(|filters| {
        filters
            .iter()
            .find(|f| f["name"] == "envoy.filters.http.ratelimit")
    })
    .map(|f| &f["typed_config"])
    .expect("the ratelimit filter")
}

fn assert_envoy_accepts(template: &str, what: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    envoy::assert_template_valid(
        dir.path(),
        "bootstrap.yaml",
        template,
        &[],
        &format!("the config of {what}:\n{template}"),
    );
}

/// Starts meshlimit on the ConfigMap's config, an upstream, and Envoy running `template`.
struct Stack {
    // Envoy first, so it is dropped before what it routes to.
    envoy: Envoy,
    upstream: EchoUpstream,
    meshlimit: Meshlimit,
}

impl Stack {
    fn start(template: &str) -> Stack {
        let meshlimit = Meshlimit::start(repo_root().join(CONFIG_DIR));
        let upstream = EchoUpstream::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let path: PathBuf = dir.path().join("template.yaml");
        std::fs::write(&path, template).expect("write template");
        let envoy = Envoy::start(
            &path,
            &[
                ("RLS_PORT", meshlimit.grpc_addr.port().to_string()),
                ("UPSTREAM_PORT", upstream.addr.port().to_string()),
            ],
        );
        Stack {
            envoy,
            upstream,
            meshlimit,
        }
    }

    /// `x-ratelimit-limit` of a response that must have been let through: Envoy lists
    /// every limit that applied, each as `N;w=SECONDS[;name="..."]`.
    fn limits_applied(&self, path: &str, headers: &[(&str, &str)]) -> Vec<String> {
        let response = self.envoy.get(path, headers);
        assert_eq!(
            response.status,
            200,
            "GET {path} {headers:?}: {response:?}\n{}\n{}",
            self.meshlimit.logs(),
            self.envoy.logs()
        );
        let limit = response
            .header("x-ratelimit-limit")
            .unwrap_or_else(|| panic!("no x-ratelimit-limit on GET {path}: {response:?}"));
        // The first item is the tightest limit's number; the policies follow.
        limit.split(", ").skip(1).map(str::to_owned).collect()
    }
}

#[test]
fn envoyfilters_call_the_kubernetes_service_for_a_configured_domain() {
    let service = find(overlay("memory"), "Service", "meshlimit");
    let namespace = service["metadata"]["namespace"]
        .as_str()
        .expect("namespace");
    let port = at(service, "/spec/ports")
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "grpc"))
        .and_then(|p| p["port"].as_u64())
        .expect("grpc port");
    let host = format!("meshlimit.{namespace}.svc.cluster.local");
    // How istiod names the cluster of a Service port.
    let cluster = format!("outbound|{port}||{host}");

    for (file, context, domain) in [
        (GATEWAY_FILTER, "GATEWAY", "edge"),
        (SIDECAR_FILTER, "SIDECAR_INBOUND", "mesh"),
    ] {
        let config = envoyfilter_config(&envoyfilter_bootstrap(file, context));
        let filter = ratelimit_filter(&config);
        let grpc = at(filter, "/rate_limit_service/grpc_service/envoy_grpc");
        assert_eq!(grpc["cluster_name"], cluster.as_str(), "{file}");
        assert_eq!(grpc["authority"], host.as_str(), "{file}");
        assert_eq!(filter["domain"], domain, "{file}");
        assert_eq!(
            filter["enable_x_ratelimit_headers"], "DRAFT_VERSION_03",
            "{file}"
        );
        assert!(
            std::fs::read_to_string(repo_root().join(CONFIG_DIR).join(format!("{domain}.yaml")))
                .is_ok_and(|text| text.contains(&format!("domain: {domain}\n"))),
            "{file} asks for domain {domain}, which {CONFIG_DIR} does not define"
        );
    }
}

#[test]
fn gateway_envoyfilter_sends_the_descriptors_edge_yaml_limits() {
    let template = envoyfilter_bootstrap(GATEWAY_FILTER, "GATEWAY");
    assert_envoy_accepts(&template, GATEWAY_FILTER);
    let stack = Stack::start(&template);
    // Six exports below must share one hourly window.
    common::avoid_window_edge(3600, 10);

    // One request that every descriptor applies to except login's: each limit edge.yaml
    // sets for it comes back, so each descriptor matched the rule meant for it.
    let limits = stack.limits_applied(
        "/reports/export",
        &[("x-user-id", "alice"), ("x-plan", "pro")],
    );
    for expected in [
        "300;w=60",                 // [remote_address]
        "100;w=60",                 // [user]
        "5;w=3600",                 // [user, path=/reports/export]
        "1000;w=3600;name=\"pro\"", // [plan=pro, user]: the pro policy
    ] {
        assert!(
            limits.iter().any(|l| l == expected),
            "no {expected} among the limits applied: {limits:?}"
        );
    }

    // 5 an hour on /reports/export, whatever the query or a trailing slash: alice's
    // request above and four spelled differently use it up, and a sixth is refused.
    for path in [
        "/reports/export?n=2",
        "/reports/export/",
        "/reports/export?format=csv&n=3",
        "/reports/export",
    ] {
        let limits = stack.limits_applied(path, &[("x-user-id", "alice")]);
        assert!(limits.iter().any(|l| l == "5;w=3600"), "{path}: {limits:?}");
    }
    let refused = stack
        .envoy
        .get("/reports/export?n=6", &[("x-user-id", "alice")]);
    assert_eq!(
        refused.status, 429,
        "alice's 6th export in the hour, with a new query: {refused:?}"
    );

    // [generic_key=login, remote_address]: 5 a minute per address, on /login only (with
    // a query too), and not on other paths.
    let limits = stack.limits_applied("/login?next=/home", &[]);
    assert!(
        limits.iter().any(|l| l == "5;w=60;name=\"login-per-ip\""),
        "{limits:?}"
    );
    let limits = stack.limits_applied("/logins", &[]);
    assert!(
        !limits.iter().any(|l| l.contains("login-per-ip")),
        "{limits:?}"
    );
    for _ in 0..4 {
        stack.limits_applied("/login", &[]);
    }
    let refused = stack.envoy.get("/login", &[]);
    assert_eq!(
        refused.status, 429,
        "the 6th login in a minute: {refused:?}"
    );
    let logins = stack
        .upstream
        .received()
        .iter()
        .filter(|r| r.path.starts_with("/login?") || r.path == "/login")
        .count();
    assert_eq!(logins, 5, "the refused login reached the service");
}

#[test]
fn sidecar_envoyfilter_sends_the_descriptors_mesh_yaml_limits() {
    let template = envoyfilter_bootstrap(SIDECAR_FILTER, "SIDECAR_INBOUND");
    assert_envoy_accepts(&template, SIDECAR_FILTER);
    let stack = Stack::start(&template);
    let limits = stack.limits_applied("/reports/1", &[("x-user-id", "bob")]);
    // [generic_key=reports] and [generic_key=reports, user].
    for expected in ["50;w=1", "10;w=1"] {
        assert!(limits.iter().any(|l| l == expected), "{limits:?}");
    }
}

// ---- Grafana ----------------------------------------------------------------------------

#[test]
fn grafana_queries_parse_and_read_metrics_the_binary_exports() {
    let promtool = venv_tool("MESHLIMIT_PROMTOOL", "bin/promtool");
    let report: Value =
        serde_json::from_str(&check_deploy(&["grafana", DASHBOARD, path_arg(&promtool)]))
            .expect("check_deploy.py prints JSON");
    let read: BTreeSet<&str> = report["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .filter_map(Value::as_str)
        .collect();

    // Every metric of the contract has a panel.
    for metric in DASHBOARD_METRICS {
        assert!(
            read.iter().any(|r| r.starts_with(metric)),
            "the dashboard reads nothing of {metric}: {read:?}"
        );
    }

    // Every metric the dashboard reads is exported, with the labels it groups by.
    let texts = scraped_replicas();
    for text in texts {
        promtool_accepts(&promtool, text);
    }
    assert_exported("the dashboard", read.iter().copied());
    let dashboard = std::fs::read_to_string(repo_root().join(DASHBOARD)).expect("the dashboard");
    assert_rates_of_counters("the dashboard", &dashboard);
    let metrics = texts.join("\n");
    assert!(
        metrics.lines().any(
            |l| l.starts_with("ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"")
        ),
        "rule counters lack the domain and key labels the dashboard groups by:\n{metrics}"
    );
}

/// /metrics of a replica of each kind the overlays and the README run: on the memory store
/// keeping a counter snapshot (memory-persistent), on the Redis store, and fed by an xDS
/// server. Scraped once for every test that needs them.
fn scraped_replicas() -> &'static [String] {
    static TEXTS: OnceLock<Vec<String>> = OnceLock::new();
    TEXTS.get_or_init(|| {
        let snapshots = tempfile::tempdir().expect("a directory for the snapshot");
        let snapshot = snapshots.path().join("counters").display().to_string();
        let memory = Meshlimit::start_with(
            repo_root().join(CONFIG_DIR),
            &["--memory-snapshot", &snapshot],
        );
        let redis = RedisServer::start();
        let on_redis = Meshlimit::start_with(
            repo_root().join(CONFIG_DIR),
            &["--store", "redis", "--redis-url", &redis.url()],
        );
        let xds = XdsServer::start();
        xds.publish("1", serde_json::json!([{"name": "edge", "domain": "edge"}]));
        let on_xds = Meshlimit::start_without_dir(&["--xds-server", &xds.url()], &[]);
        [&memory, &on_redis, &on_xds]
            .iter()
            .map(|server| {
                http::get(server.admin_addr, "/metrics", &[])
                    .unwrap_or_else(|err| panic!("GET /metrics: {err}\n{}", server.logs()))
                    .text()
            })
            .collect()
    })
}

/// Each family's Prometheus type, from the `# TYPE` lines of `/metrics` text.
fn types_of(metrics: &str) -> BTreeMap<&str, &str> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect()
}

/// Asserts that every metric `what` reads is one some replica exports: a family, or a
/// histogram's `_bucket`, `_sum` or `_count`.
fn assert_exported<'m>(what: &str, read: impl Iterator<Item = &'m str>) {
    let metrics = scraped_replicas().join("\n");
    let types = types_of(&metrics);
    for metric in read {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                metric
                    .strip_suffix(suffix)
                    .filter(|base| types.get(base) == Some(&"histogram"))
            })
            .unwrap_or(metric);
        assert!(
            types.contains_key(family),
            "{what} reads {metric}, which /metrics does not export:\n{metrics}"
        );
    }
}

/// Asserts that what `text` takes a `rate(…)` or `increase(…)` of is a counter (or a
/// histogram's or summary's running parts) on `/metrics`: of a gauge, a scrape's drop
/// after a restart reads as a huge rise, and the type tells tools what the series is.
fn assert_rates_of_counters(what: &str, text: &str) {
    let metrics = scraped_replicas().join("\n");
    let types = types_of(&metrics);
    let mut rated = 0;
    for call in ["rate(", "increase("] {
        for (at, _) in text.match_indices(call) {
            let name: String = text[at + call.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !(name.starts_with("meshlimit_") || name.starts_with("ratelimit_")) {
                continue;
            }
            rated += 1;
            let running = ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .and_then(|base| types.get(base))
                    .is_some_and(|kind| matches!(*kind, "histogram" | "summary"))
            });
            assert!(
                running || types.get(name.as_str()) == Some(&"counter"),
                "{what} takes a rate of {name}, which /metrics types {:?}, not as a counter",
                types.get(name.as_str())
            );
        }
    }
    assert!(rated > 0, "{what} takes no rate of anything");
}

// ---- Prometheus alerts ------------------------------------------------------------------

const ALERTS: &str = "deploy/prometheus/meshlimit-alerts.yaml";

/// The alerting rules load in Prometheus (`promtool check rules`, its linter included),
/// fire on the faults they are for and on nothing in a healthy deployment
/// (tests/deploy/alerts_test.yaml, run by `promtool test rules`), and every metric they
/// read, or tell the operator to look at, is exported by a running meshlimit.
#[test]
fn alerts_load_fire_on_their_faults_and_read_exported_metrics() {
    let promtool = venv_tool("MESHLIMIT_PROMTOOL", "bin/promtool");
    let checked = stdout_of(
        Command::new(&promtool)
            .args(["check", "rules", ALERTS])
            .current_dir(repo_root()),
    );
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = stdout_of(
        Command::new(&promtool)
            .args(["test", "rules", "tests/deploy/alerts_test.yaml"])
            .current_dir(repo_root()),
    );
    assert!(tested.contains("SUCCESS"), "{tested}");

    let rules = std::fs::read_to_string(repo_root().join(ALERTS)).expect("read the alerts");
    let mentioned: BTreeSet<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("meshlimit_") || word.starts_with("ratelimit_service_"))
        .collect();
    assert!(mentioned.len() >= 10, "{mentioned:?}");
    assert_exported(ALERTS, mentioned.into_iter());
    assert_rates_of_counters(ALERTS, &rules);
}

/// The alerting rules in a real Prometheus scraping a real meshlimit every second: while
/// meshlimit is healthy and turning a client away, no alert is pending or firing; once a
/// broken file lands in its config directory, `MeshlimitConfigRejected` fires, labelled
/// with the scraped replica, while the old config keeps deciding.
#[tokio::test]
async fn a_real_prometheus_fires_the_config_alert_when_meshlimit_rejects_a_change() {
    const LIMITS: &str = "domain: alerts\ndescriptors:\n  - key: user\n    rate_limit: {unit: hour, requests_per_unit: 1}\n";
    common::avoid_window_edge(3_600, 30);
    let config = common::config_dir::plain(&[("alerts.yaml", LIMITS)]);
    let server = Meshlimit::start(config.path());
    let prometheus = Prometheus::start(server.admin_addr);
    let mut client = server.client().await;
    for _ in 0..3 {
        let request = meshlimit::one_entry_request("alerts", "user", "ann");
        client
            .should_rate_limit(request)
            .await
            .unwrap_or_else(|status| panic!("{status}\n{}", server.logs()));
    }
    // A few scrapes and rule evaluations of the over-limit answers.
    let scraped = common::poll_until(Duration::from_secs(20), || {
        let over = prometheus.query("ratelimit_service_rate_limit_over_limit");
        (over.as_array()?.len() == 1).then_some(())
    });
    assert!(scraped.is_some(), "{}", prometheus.describe());
    std::thread::sleep(Duration::from_secs(3));
    // All ten rules loaded and evaluated without error, and none of them pending.
    let rules = prometheus.api("/api/v1/rules")["groups"][0]["rules"].clone();
    let rules = rules.as_array().cloned().unwrap_or_default();
    assert_eq!(rules.len(), 10, "{rules:#?}");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule:#}");
    }
    assert_eq!(
        prometheus.alerts(),
        Vec::<Value>::new(),
        "{}",
        server.logs()
    );

    std::fs::write(config.path().join("broken.yaml"), "domain: [")
        .expect("write a broken config file");
    let fired = common::poll_until(Duration::from_secs(30), || {
        let alerts = prometheus.alerts();
        let firing = alerts.iter().find(|alert| {
            alert["labels"]["alertname"] == "MeshlimitConfigRejected" && alert["state"] == "firing"
        })?;
        Some(firing.clone())
    });
    let alert = fired.unwrap_or_else(|| {
        panic!(
            "no alert fired\n{}\n{}",
            prometheus.describe(),
            server.logs()
        )
    });
    assert_eq!(alert["labels"]["instance"], server.admin_addr.to_string());
    assert_eq!(alert["labels"]["severity"], "warning");
    let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
    assert_eq!(
        summary,
        format!("meshlimit {} rejected a config change", server.admin_addr)
    );
    // The old config still decides: ann is still over her limit of one an hour.
    let answer = client
        .should_rate_limit(meshlimit::one_entry_request("alerts", "user", "ann"))
        .await
        .expect("an answer")
        .into_inner();
    assert_eq!(answer.overall_code, 2, "OVER_LIMIT under the old config");
}

/// A Prometheus server scraping one target every second and evaluating the alerting
/// rules of deploy/ every second, on a free loopback port.
struct Prometheus {
    process: common::process::Supervised,
    addr: std::net::SocketAddr,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Self {
        let binary = venv_tool("MESHLIMIT_PROMETHEUS", "bin/prometheus");
        let dir = tempfile::tempdir().expect("a directory for Prometheus");
        let rules = repo_root().join(ALERTS);
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: ['{}']\n\
             scrape_configs:\n  - job_name: meshlimit\n    static_configs: [{{targets: ['{target}']}}]\n",
            rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr = common::free_loopback_addr();
        let mut command = Command::new(binary);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let mut process = common::process::Supervised::spawn("prometheus", command, dir);
        process
            .wait_ready(Duration::from_secs(20), "Prometheus answering", || {
                http::get(addr, "/-/ready", &[]).is_ok_and(|r| r.status == 200)
            })
            .unwrap_or_else(|failure| panic!("{}", failure.report));
        Self { process, addr }
    }

    /// `data` of an API call.
    fn api(&self, path: &str) -> Value {
        let Ok(response) = http::get(self.addr, path, &[]) else {
            return Value::Null;
        };
        let body: Value = serde_json::from_str(&response.text()).unwrap_or(Value::Null);
        body["data"].clone()
    }

    /// The result of an instant query.
    fn query(&self, expr: &str) -> Value {
        self.api(&format!("/api/v1/query?query={expr}"))["result"].clone()
    }

    /// Every alert pending or firing.
    fn alerts(&self) -> Vec<Value> {
        let alerts = self.api("/api/v1/alerts")["alerts"].clone();
        alerts.as_array().cloned().unwrap_or_default()
    }

    fn describe(&self) -> String {
        format!(
            "targets: {:#}\n{}",
            self.api("/api/v1/targets"),
            self.process.log()
        )
    }
}

/// Prometheus' own parser and linter take `text` (`promtool check metrics`). Its one
/// complaint allowed: envoyproxy/ratelimit's counter names, kept so its dashboards work,
/// lack the `_total` suffix.
fn promtool_accepts(promtool: &Path, text: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("write /metrics to promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let complaints: Vec<&str> = said
        .lines()
        .filter(|line| {
            let compatible = line.starts_with("ratelimit_service_")
                && line.ends_with("counter metrics should have \"_total\" suffix");
            !line.trim().is_empty() && !compatible
        })
        .collect();
    // 0: clean; 3: lint problems only (all of them the allowed kind, checked above).
    assert!(
        matches!(output.status.code(), Some(0 | 3)) && complaints.is_empty(),
        "promtool check metrics ({}): {complaints:#?}\n{text}",
        output.status
    );
}
