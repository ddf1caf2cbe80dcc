//! An envoyproxy/ratelimit deployment with only the image changed: meshlimit started with
//! no flags, configured by the environment Istio's rate-limit sample sets
//! (samples/ratelimit/rate-limit-service.yaml: LOG_LEVEL, REDIS_SOCKET_TYPE, REDIS_URL,
//! USE_STATSD, RUNTIME_ROOT, RUNTIME_SUBDIRECTORY, RUNTIME_WATCH_ROOT,
//! RUNTIME_IGNOREDOTFILES), its config mounted as a ConfigMap at
//! `RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/config`, behind a real Envoy, counting in a real
//! Redis, with Prometheus metrics on a port of their own (USE_PROMETHEUS).

mod common;

use common::config_dir::ConfigMapDir;
use common::meshlimit::{Meshlimit, command, exit_of};
use common::redis::RedisServer;
use common::stack::Stack;
use common::statsd::{Listen, StatsdDaemon};
use common::{fixture, free_loopback_addr, http, poll_until};
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_response::Code;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest};
use std::time::Duration;

/// The sample's shape on the descriptors tests/fixtures/envoy/ratelimit_http.yaml sends
/// ([user], [user, path], [remote_address]): one request a minute to /productpage per user,
/// a hundred to any other path.
const CONFIG: &str = "\
domain: ratelimit
descriptors:
  - key: user
    descriptors:
      - key: path
        value: /productpage
        rate_limit:
          unit: minute
          requests_per_unit: 1
      - key: path
        rate_limit:
          unit: minute
          requests_per_unit: 100
";

/// Istio's sample environment, pointed at `config` and `redis`, plus Prometheus on `metrics`.
fn sample_env(config: &ConfigMapDir, redis: &RedisServer, metrics: &str) -> Vec<(String, String)> {
    [
        ("LOG_LEVEL", "debug".to_owned()),
        ("REDIS_SOCKET_TYPE", "tcp".to_owned()),
        ("REDIS_URL", redis.addr.to_string()),
        ("USE_STATSD", "false".to_owned()),
        ("RUNTIME_ROOT", config.root().display().to_string()),
        ("RUNTIME_SUBDIRECTORY", "ratelimit".to_owned()),
        ("RUNTIME_WATCH_ROOT", "false".to_owned()),
        ("RUNTIME_IGNOREDOTFILES", "true".to_owned()),
        ("USE_PROMETHEUS", "true".to_owned()),
        ("PROMETHEUS_ADDR", metrics.to_owned()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect()
}

fn start(env: &[(String, String)]) -> Meshlimit {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Meshlimit::start_envoyproxy_style(&env)
}

/// A request for `domain` with one descriptor per item of `descriptors`, each a list of
/// (key, value) entries.
fn request(domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: descriptors
            .iter()
            .map(|entries| RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(key, value)| Entry {
                        key: (*key).into(),
                        value: (*value).into(),
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    }
}

#[tokio::test]
async fn istios_sample_environment_runs_meshlimit_unchanged() {
    // Well inside one minute window: the limit is one request a minute.
    common::avoid_window_edge(60, 15);
    let redis = RedisServer::start();
    let config = ConfigMapDir::mounted_at("ratelimit/config", &[("config.yaml", CONFIG)]);
    let metrics_addr = free_loopback_addr();
    let mut env = sample_env(&config, &redis, &metrics_addr.to_string());
    // Envoy's connection is rotated between its two /productpage requests.
    env.push(("GRPC_MAX_CONNECTION_AGE".into(), "1s".into()));
    let first = start(&env);
    let stack = Stack::start_around(
        first,
        fixture("envoy/ratelimit_http.yaml"),
        "ratelimit",
        &[],
    );

    let page = stack.get_as("alice", "/productpage");
    stack.expect_status(&page, 200, "alice's first /productpage");
    // Past the connection's age: Envoy was sent a GOAWAY and asks on a new connection. The
    // filter fails open, so only a 429 shows that the call went through.
    std::thread::sleep(Duration::from_millis(1_500));
    let page = stack.get_as("alice", "/productpage");
    stack.expect_status(&page, 429, "alice's second /productpage in the minute");
    // meshlimit counted the rotation, and holds Envoy's new connection.
    let rotated = stack
        .meshlimit
        .metric("meshlimit_grpc_connections_rotated_total");
    assert!(rotated >= 1, "{}", stack.logs());
    assert!(stack.meshlimit.metric("meshlimit_grpc_connections") >= 1);
    let other = stack.get_as("alice", "/reviews");
    stack.expect_status(&other, 200, "another path, under the limit of 100");
    let logs = stack.meshlimit.logs();
    assert!(
        logs.contains("counters in Redis") && logs.contains("DEBUG"),
        "REDIS_URL should choose Redis and LOG_LEVEL=debug should show debug lines:\n{logs}"
    );

    // The count lives in Redis: a second replica with the same environment (its own ports)
    // turns alice away at once, and lets bob through.
    let second_metrics = free_loopback_addr().to_string();
    let second_env = sample_env(&config, &redis, &second_metrics);
    let second = start(&second_env);
    let mut client = second.client().await;
    for (user, expected) in [("alice", Code::OverLimit), ("bob", Code::Ok)] {
        let answer = client
            .should_rate_limit(request(
                "ratelimit",
                &[&[("user", user), ("path", "/productpage")]],
            ))
            .await
            .unwrap_or_else(|status| panic!("{user}: {status}\n{}", second.logs()))
            .into_inner();
        assert_eq!(
            answer.overall_code(),
            expected,
            "{user} on the second replica"
        );
    }

    // USE_PROMETHEUS: the first replica's metrics on PROMETHEUS_ADDR at /metrics.
    let scraped = poll_until(Duration::from_secs(5), || {
        let text = http::get(metrics_addr, "/metrics", &[]).ok()?.text();
        text.contains("ratelimit_service_rate_limit_over_limit{domain=\"ratelimit\"")
            .then_some(text)
    });
    let text = scraped.unwrap_or_else(|| {
        panic!(
            "no over-limit counter at http://{metrics_addr}/metrics:\n{}",
            stack.logs()
        )
    });
    // Selected by the labels envoyproxy/ratelimit's Prometheus mapping gives its rule
    // counters, as its dashboards and alerts select them.
    assert_eq!(
        common::meshlimit::sample(
            &text,
            "ratelimit_service_rate_limit_over_limit{domain=\"ratelimit\",key1=\"user\",key2=\"path_/productpage\"}"
        ),
        Some(1),
        "{text}"
    );
}

/// `meshlimit serve` configured by envoyproxy/ratelimit's variables: the ConfigMap mounted
/// under `root`, on free loopback ports.
fn serve_from_environment(root: &str) -> std::process::Command {
    let mut serve = command();
    serve
        .arg("serve")
        .env("RUNTIME_ROOT", root)
        .env("RUNTIME_SUBDIRECTORY", "ratelimit")
        .env("HOST", "127.0.0.1")
        .env("PORT", free_loopback_addr().port().to_string())
        .env("GRPC_HOST", "127.0.0.1")
        .env("GRPC_PORT", free_loopback_addr().port().to_string());
    serve
}

#[test]
fn settings_meshlimit_cannot_honour_stop_it_with_what_to_write() {
    let config = ConfigMapDir::mounted_at("ratelimit/config", &[("config.yaml", CONFIG)]);
    let root = config.root().display().to_string();
    let cases: [(&[(&str, &str)], &str); 2] = [
        (&[("BACKEND_TYPE", "memcache")], "BACKEND_TYPE=memcache"),
        (&[("CONFIG_TYPE", "GRPC_XDS_DELTA")], "GRPC_XDS_SOTW"),
    ];
    for (env, expected) in cases {
        let mut serve = serve_from_environment(&root);
        serve.envs(env.iter().copied());
        let (code, stderr) = exit_of(serve);
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains(expected), "{env:?}: {stderr}");
    }

    // Without --config and without RUNTIME_*, the message names both ways to give it
    // (unless this machine has the default directory, as a container would).
    if std::path::Path::new("/etc/meshlimit/config").is_dir() {
        return;
    }
    let mut serve = command();
    serve.arg("serve");
    let (code, stderr) = exit_of(serve);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--config DIR") && stderr.contains("RUNTIME_ROOT"),
        "{stderr}"
    );
}

/// envoyproxy/ratelimit reads its on/off variables with Go's strconv.ParseBool, so its
/// Deployments may say `1` or `True`: meshlimit starts on them and honours them (here
/// SHADOW_MODE=1 answers OK past the limit), and a value Go refuses too stops the start
/// naming the variable that was set.
#[tokio::test]
async fn on_off_variables_take_what_envoyproxys_go_accepts() {
    common::avoid_window_edge(60, 10);
    let config = ConfigMapDir::mounted_at("ratelimit/config", &[("config.yaml", CONFIG)]);
    let root = config.root().display().to_string();
    let server = Meshlimit::start_envoyproxy_style(&[
        ("RUNTIME_ROOT", &root),
        ("RUNTIME_SUBDIRECTORY", "ratelimit"),
        ("SHADOW_MODE", "1"),
        ("QUOTA_MODE", "f"),
        ("MERGE_DOMAIN_CONFIG", "True"),
        ("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "T"),
        ("LIMIT_RESPONSE_HEADERS_ENABLED", "TRUE"),
        ("RESPONSE_DYNAMIC_METADATA", "0"),
    ]);
    let mut client = server.client().await;
    let page = request(
        "ratelimit",
        &[&[("user", "erin"), ("path", "/productpage")]],
    );
    for attempt in 1..=2 {
        let answer = client
            .should_rate_limit(page.clone())
            .await
            .unwrap_or_else(|status| panic!("{status}\n{}", server.logs()))
            .into_inner();
        assert_eq!(
            answer.overall_code(),
            Code::Ok,
            "request {attempt} of a limit of 1, in shadow mode"
        );
    }

    for (name, value) in [("SHADOW_MODE", "yes"), ("RESPONSE_DYNAMIC_METADATA", "on")] {
        let mut serve = serve_from_environment(&root);
        serve.env(name, value);
        let (code, stderr) = exit_of(serve);
        assert_eq!(code, Some(2), "{name}={value}: {stderr}");
        assert!(
            stderr.contains(&format!("{name}={value}")) && stderr.contains("write true or false"),
            "{name}={value}: {stderr}"
        );
    }
}

/// envoyproxy/ratelimit's debug port, where its runbooks look (`kubectl port-forward …
/// 6070`, `curl localhost:6070/rlconfig`): `/rlconfig` dumps the loaded rules one line each
/// as it does, and the rules after an edit of the ConfigMap; `/stats` the counters by their
/// statsd names; any other path lists the two. A DEBUG_PORT that is taken stops the start,
/// naming it.
#[tokio::test]
async fn the_debug_port_serves_rlconfig_and_stats_where_envoyproxys_runbooks_look() {
    common::avoid_window_edge(60, 10);
    let mut config = ConfigMapDir::mounted_at("ratelimit/config", &[("config.yaml", CONFIG)]);
    let root = config.root().display().to_string();
    let env = [
        ("RUNTIME_ROOT", root.as_str()),
        ("RUNTIME_SUBDIRECTORY", "ratelimit"),
    ];
    let server = Meshlimit::start_envoyproxy_style(&env);
    let debug = server.debug_addr.expect("started as /bin/ratelimit");
    let get = |path: &str| {
        http::get(debug, path, &[])
            .unwrap_or_else(|error| panic!("GET {path} on {debug}: {error}\n{}", server.logs()))
    };
    let sorted = |text: String| {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines.sort();
        lines
    };
    assert_eq!(
        sorted(get("/rlconfig").text()),
        [
            "ratelimit.user.path: unit=MINUTE requests_per_unit=100, shadow_mode: false, quota_mode: false",
            "ratelimit.user.path_/productpage: unit=MINUTE requests_per_unit=1, shadow_mode: false, quota_mode: false",
        ]
    );

    let mut client = server.client().await;
    for _ in 0..2 {
        client
            .should_rate_limit(request(
                "ratelimit",
                &[&[("user", "alice"), ("path", "/productpage")]],
            ))
            .await
            .unwrap_or_else(|status| panic!("{status}\n{}", server.logs()));
    }
    let stats = get("/stats").text();
    for line in [
        "ratelimit.service.rate_limit.ratelimit.user.path_/productpage.total_hits: 2",
        "ratelimit.service.rate_limit.ratelimit.user.path_/productpage.over_limit: 1",
        "ratelimit_server.ShouldRateLimit.total_requests: 2",
        "ratelimit.service.config_load_success: 1",
    ] {
        assert!(stats.lines().any(|l| l == line), "no `{line}` in:\n{stats}");
    }

    let index = get("/").text();
    assert_eq!(
        index,
        "/rlconfig: print out the currently loaded configuration for debugging\n\
         /stats: print out stats\n"
    );
    assert_eq!(get("/anything/else").text(), index);
    // Go runbooks ask for the index with its trailing slash, and for each profile.
    for path in ["/debug/pprof", "/debug/pprof/", "/debug/pprof/profile"] {
        let pprof = get(path);
        assert_eq!(pprof.status, 404, "{path}");
        assert!(
            pprof.text().contains("perf record"),
            "{path}: {}",
            pprof.text()
        );
    }

    // The ConfigMap edited: the dump follows the config that decides.
    config.update(&[(
        "config.yaml",
        &CONFIG.replace("requests_per_unit: 1\n", "requests_per_unit: 7\n"),
    )]);
    let edited = poll_until(Duration::from_secs(10), || {
        let text = get("/rlconfig").text();
        text.contains("ratelimit.user.path_/productpage: unit=MINUTE requests_per_unit=7,")
            .then_some(text)
    });
    assert!(
        edited.is_some(),
        "the edit never reached /rlconfig\n{}",
        server.logs()
    );

    // Asked for a port that another process holds: no start without it.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let mut serve = serve_from_environment(&root);
    serve
        .env("DEBUG_HOST", "127.0.0.1")
        .env("DEBUG_PORT", taken.port().to_string());
    let (code, stderr) = exit_of(serve);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        code.is_some() && stderr.contains("DEBUG_PORT") && stderr.contains(&taken.to_string()),
        "{code:?}: {stderr}"
    );
}

/// GRPC_UDS: gRPC on a Unix domain socket instead of GRPC_PORT, reached by a real Envoy
/// through a `pipe` address, as a sidecar sharing a directory with meshlimit would. A second
/// server on the same socket is refused with what to do, and the file goes when meshlimit
/// stops, so the next start finds the path free.
#[test]
fn envoy_reaches_meshlimit_on_a_unix_socket() {
    common::avoid_window_edge(60, 15);
    let config = ConfigMapDir::mounted_at("ratelimit/config", &[("config.yaml", CONFIG)]);
    let sockets = tempfile::tempdir().expect("a directory for the socket");
    let socket = sockets.path().join("ratelimit.sock");
    let socket_text = socket.display().to_string();
    let root = config.root().display().to_string();
    let env = [
        ("RUNTIME_ROOT", root.as_str()),
        ("RUNTIME_SUBDIRECTORY", "ratelimit"),
        ("GRPC_UDS", socket_text.as_str()),
    ];
    let meshlimit = Meshlimit::start_envoyproxy_style(&env);
    assert!(
        std::net::TcpStream::connect(meshlimit.grpc_addr).is_err(),
        "GRPC_UDS replaces GRPC_PORT"
    );

    // tests/fixtures/envoy/ratelimit_http.yaml with the meshlimit cluster on the socket.
    let tcp_endpoint = "socket_address: { address: 127.0.0.1, port_value: {{RLS_PORT}} }";
    let template = std::fs::read_to_string(fixture("envoy/ratelimit_http.yaml"))
        .expect("read the Envoy template");
    assert!(
        template.contains(tcp_endpoint),
        "the template's meshlimit endpoint moved"
    );
    let on_socket = template.replace(
        tcp_endpoint,
        &format!("pipe: {{ path: \"{socket_text}\" }}"),
    );
    let template_path = sockets.path().join("envoy.yaml");
    std::fs::write(&template_path, on_socket).expect("write the Envoy template");
    let stack = Stack::start_around(meshlimit, &template_path, "ratelimit", &[]);
    // The filter fails open: only the 429 shows that Envoy's call reached meshlimit.
    let page = stack.get_as("carol", "/productpage");
    stack.expect_status(&page, 200, "carol's first /productpage");
    let page = stack.get_as("carol", "/productpage");
    stack.expect_status(&page, 429, "carol's second /productpage in the minute");

    let mut second = command();
    second
        .env("HOST", "127.0.0.1")
        .env("PORT", free_loopback_addr().port().to_string())
        .envs(env)
        .arg("serve");
    let (code, stderr) = exit_of(second);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&socket_text) && stderr.contains("another server is listening"),
        "{stderr}"
    );
    let page = stack.get_as("dave", "/productpage");
    stack.expect_status(&page, 200, "the first server still answers");

    let Stack { mut meshlimit, .. } = stack;
    meshlimit.terminate();
    let exited = meshlimit.wait_for_exit(Duration::from_secs(30));
    assert_eq!(
        exited.and_then(|s| s.code()),
        Some(0),
        "{}",
        meshlimit.logs()
    );
    assert!(!socket.exists(), "the socket file is removed on stop");
}

/// GRPC_MAX_CONNECTION_AGE: a connection that lives past it is sent an HTTP/2 GOAWAY, so a
/// client like Envoy reconnects, and replicas added since get their share of connections.
/// A raw HTTP/2 connection, so nothing reconnects behind the test's back.
#[test]
fn old_grpc_connections_are_asked_to_reconnect() {
    use std::io::{Read, Write};
    let config = ConfigMapDir::mounted_at("ratelimit/config", &[("config.yaml", CONFIG)]);
    let root = config.root().display().to_string();
    let server = Meshlimit::start_envoyproxy_style(&[
        ("RUNTIME_ROOT", &root),
        ("RUNTIME_SUBDIRECTORY", "ratelimit"),
        ("GRPC_MAX_CONNECTION_AGE", "1s"),
    ]);
    let mut connection =
        std::net::TcpStream::connect(server.grpc_addr).expect("connect to the gRPC port");
    connection
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("set a read timeout");
    // The client preface and an empty SETTINGS frame.
    connection
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .expect("send the HTTP/2 preface");
    let opened = std::time::Instant::now();
    let mut frame_types = Vec::new();
    loop {
        let mut header = [0u8; 9];
        if connection.read_exact(&mut header).is_err() {
            break; // closed, or nothing for 15 s
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        connection
            .read_exact(&mut payload)
            .expect("read a frame's payload");
        frame_types.push(header[3]);
        const GOAWAY: u8 = 0x7;
        if header[3] == GOAWAY {
            break;
        }
    }
    let waited = opened.elapsed();
    assert!(
        frame_types.contains(&0x7),
        "no GOAWAY in {waited:?}; frame types seen: {frame_types:?}\n{}",
        server.logs()
    );
    assert!(
        waited >= Duration::from_millis(900),
        "GOAWAY after {waited:?}, before the connection was 1 s old"
    );
}

/// STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT through a real Envoy, whose filter sends [user]
/// and [remote_address] (ratelimit_http.yaml): alice's second request is turned away by her
/// own limit of 1 and so does not count on the shared address's limit of 3, which then
/// admits bob and carol. Without the variable carol would be the one turned away.
#[test]
fn a_request_turned_away_does_not_use_up_the_shared_limit() {
    const SPARE: &str = "\
domain: spare
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: remote_address
    rate_limit: {unit: minute, requests_per_unit: 3}
";
    common::avoid_window_edge(60, 15);
    let config = common::config_dir::plain(&[("spare.yaml", SPARE)]);
    let meshlimit = Meshlimit::start_with_env(
        config.path(),
        &[],
        &[("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "true")],
    );
    let stack = Stack::start_around(
        meshlimit,
        fixture("envoy/ratelimit_http.yaml"),
        "spare",
        &[],
    );
    for (user, status) in [
        ("alice", 200),
        ("alice", 429),
        ("bob", 200),
        ("carol", 200),
        ("dave", 429),
    ] {
        let response = stack.get_as(user, "/");
        stack.expect_status(&response, status, &format!("{user}'s request"));
    }
}

/// REDIS_PERSECOND: descriptors whose limits are per second are counted in a Redis of
/// their own, the others in REDIS_URL's, as envoyproxy/ratelimit splits them; with
/// LOCAL_CACHE_SIZE_IN_BYTES set, as its deployments often have it.
#[tokio::test]
async fn per_second_limits_are_counted_in_their_own_redis() {
    const SPLIT: &str = "\
domain: split
descriptors:
  - key: burst
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: steady
    rate_limit: {unit: minute, requests_per_unit: 100}
";
    let (main, fast) = (RedisServer::start(), RedisServer::start());
    // A common setting of envoyproxy/ratelimit's, which sizes meshlimit's own over-limit
    // cache instead of stopping the start.
    let (server, _config) = start_split(
        SPLIT,
        &main,
        &fast,
        &[("LOCAL_CACHE_SIZE_IN_BYTES", "1048576")],
    );
    assert!(
        server.logs().contains("holds 2048 descriptors"),
        "{}",
        server.logs()
    );
    let mut client = server.client().await;
    let both = request("split", &[&[("burst", "x")], &[("steady", "y")]]);
    // Three requests within a few milliseconds: at least two share a second, so the limit
    // of one a second turns one away.
    let mut codes = Vec::new();
    for _ in 0..3 {
        let answer = client
            .should_rate_limit(both.clone())
            .await
            .unwrap_or_else(|status| panic!("{status}\n{}", server.logs()))
            .into_inner();
        codes.push(answer.statuses[0].code());
    }
    assert!(codes.contains(&Code::OverLimit), "{codes:?}");
    assert_eq!(codes[0], Code::Ok, "{codes:?}");

    let keys = |redis: &RedisServer| -> Vec<String> {
        let mut keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("*"));
        keys.sort();
        keys
    };
    let (in_main, in_fast) = (keys(&main), keys(&fast));
    assert!(
        in_fast.len() == 1 && in_fast[0].contains("burst"),
        "the per-second Redis holds the per-second counter only: {in_fast:?}"
    );
    assert!(
        in_main.len() == 1 && in_main[0].contains("steady"),
        "the main Redis holds the per-minute counter only: {in_main:?}"
    );
}

/// meshlimit on `limits` (one file), counting in `main` (REDIS_URL) and, for per-second
/// limits, in `fast` (REDIS_PERSECOND_URL), with `extra` variables.
fn start_split(
    limits: &str,
    main: &RedisServer,
    fast: &RedisServer,
    extra: &[(&str, &str)],
) -> (Meshlimit, tempfile::TempDir) {
    let config = common::config_dir::plain(&[("split.yaml", limits)]);
    let (main_url, fast_url) = (main.addr.to_string(), fast.addr.to_string());
    let redis = [
        ("REDIS_SOCKET_TYPE", "tcp"),
        ("REDIS_URL", main_url.as_str()),
        ("REDIS_PERSECOND", "true"),
        ("REDIS_PERSECOND_SOCKET_TYPE", "tcp"),
        ("REDIS_PERSECOND_URL", fast_url.as_str()),
    ];
    let server = Meshlimit::start_with_env(config.path(), &[], &[&redis[..], extra].concat());
    (server, config)
}

/// REDIS_PERSECOND_TIMEOUT: the per-second Redis has a deadline of its own. That Redis
/// hangs (DEBUG SLEEP) while the main one's REDIS_TIMEOUT is far longer: the per-second
/// descriptor is answered by the failure policy at the per-second deadline, not the main one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_second_redis_keeps_its_own_deadline() {
    const SPLIT: &str = "\
domain: split
descriptors:
  - key: burst
    rate_limit: {unit: second, requests_per_unit: 100}
";
    let main = RedisServer::start();
    let fast = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let (server, _config) = start_split(
        SPLIT,
        &main,
        &fast,
        &[
            ("REDIS_TIMEOUT", "20s"),
            ("REDIS_PERSECOND_TIMEOUT", "200ms"),
        ],
    );
    let mut client = server.client().await;
    let burst = request("split", &[&[("burst", "x")]]);
    let first = client.should_rate_limit(burst.clone()).await;
    assert!(first.is_ok(), "{first:?}\n{}", server.logs());

    // The per-second Redis stops answering for 5 s.
    let sleeper = std::thread::spawn(move || {
        let _: redis::RedisResult<()> = fast.try_query(redis::cmd("DEBUG").arg("SLEEP").arg(5));
        fast
    });
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let answer = client
        .should_rate_limit(burst)
        .await
        .unwrap_or_else(|status| panic!("{status}\n{}", server.logs()))
        .into_inner();
    let took = started.elapsed();
    assert_eq!(answer.overall_code(), Code::Ok, "the failure policy allows");
    assert!(
        took < Duration::from_secs(3),
        "answered after {took:?}: REDIS_PERSECOND_TIMEOUT (200ms) should bound the wait, not \
         REDIS_TIMEOUT (20s) or the 5 s sleep\n{}",
        server.logs()
    );
    drop(sleeper.join());
}

/// MERGE_DOMAIN_CONFIG: two files of one domain in the ConfigMap, both served.
#[tokio::test]
async fn files_of_one_domain_are_served_together_when_merged() {
    let file = |key: &str| {
        format!(
            "domain: shop\ndescriptors:\n  - key: {key}\n    rate_limit: {{unit: hour, requests_per_unit: 1}}\n"
        )
    };
    let (users, addresses) = (file("user"), file("ip"));
    let config = ConfigMapDir::mounted_at(
        "ratelimit/config",
        &[("users.yaml", &users), ("addresses.yaml", &addresses)],
    );
    let root = config.root().display().to_string();
    let server = Meshlimit::start_envoyproxy_style(&[
        ("RUNTIME_ROOT", &root),
        ("RUNTIME_SUBDIRECTORY", "ratelimit"),
        ("MERGE_DOMAIN_CONFIG", "true"),
    ]);
    let mut client = server.client().await;
    // Well inside one hour: each descriptor is allowed once.
    common::avoid_window_edge(3_600, 20);
    for key in ["user", "ip"] {
        let one = request("shop", &[&[(key, "one")]]);
        let mut codes = Vec::new();
        for _ in 0..2 {
            let answer = client
                .should_rate_limit(one.clone())
                .await
                .unwrap_or_else(|status| panic!("{status}\n{}", server.logs()))
                .into_inner();
            codes.push(answer.overall_code());
        }
        assert_eq!(
            codes,
            [Code::Ok, Code::OverLimit],
            "{key}: {}",
            server.logs()
        );
    }
}

/// USE_STATSD: the counters reach a statsd agent (here, a UDP socket of the test's) under
/// envoyproxy/ratelimit's names, as increments that add up to what happened, and every
/// call's time as a timer.
#[tokio::test]
async fn counters_reach_statsd_under_envoyproxys_names() {
    let agent = StatsdAgent::bind().await;
    let (server, _config) = three_calls_to_a_limit_of_two(
        agent.port(),
        &[
            ("USE_STATSD", "true"),
            ("STATSD_PROTOCOL", "udp"),
            ("EXTRA_TAGS", "env:e2e"),
        ],
    )
    .await;

    // Plain statsd carries EXTRA_TAGS in the names of the service's stats.
    let prefix = "ratelimit.service.rate_limit.statsd.user.";
    let wanted = [
        (format!("{prefix}total_hits.__env=e2e|c"), 3),
        (format!("{prefix}within_limit.__env=e2e|c"), 2),
        (format!("{prefix}over_limit.__env=e2e|c"), 1),
        (
            "ratelimit.service.config_load_success.__env=e2e|c".to_owned(),
            1,
        ),
        (
            "ratelimit_server.ShouldRateLimit.total_requests|c".to_owned(),
            3,
        ),
        (
            "ratelimit_server.ShouldRateLimit.response_time|ms".to_owned(),
            3,
        ),
    ];
    agent.wait_for_totals(&wanted, &server).await;
}

/// A pod stopped between two pushes still reports what it counted since the last one:
/// meshlimit pushes once more on SIGTERM (envoyproxy/ratelimit loses up to one interval).
#[tokio::test]
async fn the_counts_since_the_last_push_reach_statsd_when_the_pod_stops() {
    let agent = StatsdAgent::bind().await;
    let (mut server, _config) = three_calls_to_a_limit_of_two(
        agent.port(),
        &[
            ("USE_STATSD", "true"),
            ("STATSD_PROTOCOL", "udp"),
            ("STATS_FLUSH_INTERVAL", "1h"),
            // The test's idle client would hold the default 10 s.
            ("MESHLIMIT_SHUTDOWN_GRACE", "1s"),
        ],
    )
    .await;
    server.terminate();
    let status = server.wait_for_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        server.logs()
    );
    let prefix = "ratelimit.service.rate_limit.statsd.user.";
    let wanted = [
        (format!("{prefix}total_hits|c"), 3),
        (format!("{prefix}over_limit|c"), 1),
    ];
    agent.wait_for_totals(&wanted, &server).await;
}

/// USE_DOG_STATSD: DogStatsD lines, with EXTRA_TAGS and a mogrifier turning the domain and
/// descriptor out of the name into tags, as envoyproxy/ratelimit's Datadog users set it.
#[tokio::test]
async fn dogstatsd_lines_carry_extra_and_mogrified_tags() {
    let agent = StatsdAgent::bind().await;
    let (server, _config) = three_calls_to_a_limit_of_two(
        agent.port(),
        &[
            ("USE_STATSD", "false"),
            ("USE_DOG_STATSD", "true"),
            ("EXTRA_TAGS", "env:e2e,cluster:eu.1"),
            ("USE_DOG_STATSD_MOGRIFIERS", "HITS"),
            (
                "DOG_STATSD_MOGRIFIER_HITS_PATTERN",
                r"^ratelimit\.service\.rate_limit\.([^.]+)\.(.+)\.([^.]+)$",
            ),
            (
                "DOG_STATSD_MOGRIFIER_HITS_NAME",
                "ratelimit.service.rate_limit.$3",
            ),
            ("DOG_STATSD_MOGRIFIER_HITS_TAGS", "domain:$1,descriptor:$2"),
        ],
    )
    .await;

    let tags = "#cluster:eu_1,env:e2e,domain:statsd,descriptor:user";
    let wanted = [
        (
            format!("ratelimit.service.rate_limit.total_hits|c|{tags}"),
            3,
        ),
        (
            format!("ratelimit.service.rate_limit.within_limit|c|{tags}"),
            2,
        ),
        (
            format!("ratelimit.service.rate_limit.over_limit|c|{tags}"),
            1,
        ),
        (
            "ratelimit.service.config_load_success|c|#cluster:eu_1,env:e2e".to_owned(),
            1,
        ),
        (
            "ratelimit_server.ShouldRateLimit.total_requests|c".to_owned(),
            3,
        ),
        (
            "ratelimit_server.ShouldRateLimit.response_time|ms".to_owned(),
            3,
        ),
    ];
    agent.wait_for_totals(&wanted, &server).await;
}

/// The same lines read by a real statsd daemon (Etsy's, which statsd_exporter and Datadog's
/// agent follow in this) over TCP, envoyproxy/ratelimit's transport and so USE_STATSD's: the
/// counters add up to what happened, and the response-time timer, a line per latency
/// bucket with a sample rate, counts every call. Then the daemon is stopped, two more calls
/// are made, and a new daemon started on the same port counts them: the pushes that found
/// no agent, and the connection the old one closed, lost nothing.
#[tokio::test]
async fn a_real_statsd_counts_every_call_and_its_time_across_its_restart() {
    let statsd = StatsdDaemon::start(Listen::Tcp);
    let (server, _config) =
        three_calls_to_a_limit_of_two(statsd.port, &[("USE_STATSD", "true")]).await;
    let prefix = "ratelimit.service.rate_limit.statsd.user.";
    let total = |hits: f64, within: f64, over: f64| {
        [
            (format!("{prefix}total_hits"), hits),
            (format!("{prefix}within_limit"), within),
            (format!("{prefix}over_limit"), over),
            (
                "ratelimit_server.ShouldRateLimit.total_requests".to_owned(),
                hits,
            ),
        ]
    };
    statsd_counts(&statsd, &server, &total(3.0, 2.0, 1.0), 3.0);

    let port = statsd.port;
    drop(statsd);
    calls_for_ann(&server, 2).await;
    // A few pushes find no agent.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let restarted = StatsdDaemon::start_on(Listen::Tcp, port);
    statsd_counts(&restarted, &server, &total(2.0, 0.0, 2.0), 2.0);
}

/// An operator's statsd_exporter mapping, as PROMETHEUS_MAPPER_YAML points
/// envoyproxy/ratelimit at: rule counters under one name a stat, the domain and descriptor
/// as labels; the response time in seconds as a histogram; the config counters dropped.
const MAPPER: &str = r#"
defaults:
  ttl: 10m
mappings:
  - match: ratelimit.service.rate_limit.*.*.*
    name: team_ratelimit_$3
    labels:
      domain: $1
      descriptor: $2
  - match: ratelimit.service.config_load_*
    action: drop
  - match: ratelimit_server.*.response_time
    name: team_ratelimit_call_seconds
    observer_type: histogram
    scale: 0.001
    buckets: [0.0005, 30]
    labels:
      method: $1
"#;

/// meshlimit started with `mapping` as its PROMETHEUS_MAPPER_YAML and Prometheus on a port
/// of its own, after three calls for ann, and that port's `/metrics` then.
struct Mapped {
    config: tempfile::TempDir,
    mapper: tempfile::TempDir,
    mapper_path: String,
    server: Meshlimit,
    scraped: String,
}

impl Mapped {
    async fn after_three_calls(mapping: &str) -> Mapped {
        common::avoid_window_edge(3_600, 20);
        let config = common::config_dir::plain(&[("statsd.yaml", ANN_LIMITS)]);
        let mapper = tempfile::tempdir().expect("a directory for the mapping");
        let mapper_path = mapper.path().join("mapper.yaml");
        std::fs::write(&mapper_path, mapping).expect("write the mapping");
        let mapper_path = mapper_path.display().to_string();
        let metrics_addr = free_loopback_addr();
        let metrics = metrics_addr.to_string();
        let env = [
            ("USE_PROMETHEUS", "true"),
            ("PROMETHEUS_ADDR", metrics.as_str()),
            ("PROMETHEUS_MAPPER_YAML", mapper_path.as_str()),
        ];
        let server = Meshlimit::start_with_env(config.path(), &[], &env);
        calls_for_ann(&server, 3).await;
        let scraped = http::get(metrics_addr, "/metrics", &[])
            .unwrap_or_else(|error| panic!("{error}\n{}", server.logs()))
            .text();
        Mapped {
            config,
            mapper,
            mapper_path,
            server,
            scraped,
        }
    }
}

/// A mapping that leaves the response time statsd_exporter's default, a summary, with
/// the quantiles it asks for over a one-minute window: each served with a value once calls
/// were made, and the count of calls beside them.
#[tokio::test]
async fn a_summary_mapping_serves_its_quantiles() {
    let mapping = "mappings:\n  - match: ratelimit_server.*.response_time\n    name: call_ms\n    summary_options: {quantiles: [{quantile: 0.5}, {quantile: 0.999}], max_age: 1m}\n";
    let mapped = Mapped::after_three_calls(mapping).await;
    let text = &mapped.scraped;
    assert!(text.contains("# TYPE call_ms summary\n"), "{text}");
    for quantile in ["0.5", "0.999"] {
        let series = format!("call_ms{{quantile=\"{quantile}\"}} ");
        let value: f64 = text
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"));
        // Milliseconds, not NaN: a call here takes less than a second.
        assert!((0.0..1_000.0).contains(&value), "{series}{value}");
    }
    assert_eq!(common::meshlimit::sample(text, "call_ms_count"), Some(3));
}

/// PROMETHEUS_MAPPER_YAML: the rule counters and the response time on PROMETHEUS_ADDR
/// under the names and labels the mapping gives, the built-in names gone, what the mapping
/// asks for and meshlimit does not do warned about with its line; a file that is not there
/// leaves the built-in names, with a warning, until it arrives, and a broken edit keeps the
/// names in use; a mapping with a typo stops the start with its file and line, where
/// envoyproxy/ratelimit would start with no mapping at all.
#[tokio::test]
async fn a_prometheus_mapping_file_names_the_metrics() {
    let Mapped {
        config,
        mapper,
        mapper_path,
        server,
        scraped: text,
    } = Mapped::after_three_calls(MAPPER).await;
    let user = "domain=\"statsd\",descriptor=\"user\"";
    for (selector, expected) in [
        (format!("team_ratelimit_total_hits{{{user}}}"), 3),
        (format!("team_ratelimit_within_limit{{{user}}}"), 2),
        (format!("team_ratelimit_over_limit{{{user}}}"), 1),
        (
            "team_ratelimit_call_seconds_count{method=\"ShouldRateLimit\"}".to_owned(),
            3,
        ),
        (
            "team_ratelimit_call_seconds_bucket{method=\"ShouldRateLimit\",le=\"+Inf\"}".to_owned(),
            3,
        ),
        // The mapping's buckets: no call takes 30 s.
        (
            "team_ratelimit_call_seconds_bucket{method=\"ShouldRateLimit\",le=\"30\"}".to_owned(),
            3,
        ),
        // What no mapping matches keeps its statsd name, made a Prometheus name.
        (
            "ratelimit_server_ShouldRateLimit_total_requests".to_owned(),
            3,
        ),
    ] {
        assert_eq!(
            common::meshlimit::sample(&text, &selector),
            Some(expected),
            "{selector} in\n{text}"
        );
    }
    for builtin in [
        "ratelimit_service_rate_limit_over_limit",
        "ratelimit_service_response_time_seconds",
        "config_load_success",
    ] {
        assert!(!text.contains(builtin), "{builtin} in\n{text}");
    }
    assert_eq!(
        text.matches("team_ratelimit_call_seconds_bucket").count(),
        3,
        "the two bounds written and +Inf:\n{text}"
    );
    let logs = server.logs();
    assert!(
        logs.contains(&format!(
            "PROMETHEUS_MAPPER_YAML {mapper_path}:3:3: `ttl` has no effect"
        )),
        "{logs}"
    );

    // A mapping file that is not there (Envoy Gateway mounts its ConfigMap as optional):
    // meshlimit starts, says so, and keeps the built-in names.
    let missing = mapper.path().join("absent.yaml").display().to_string();
    let metrics_addr = free_loopback_addr();
    let metrics = metrics_addr.to_string();
    let env = [
        ("USE_PROMETHEUS", "true"),
        ("PROMETHEUS_ADDR", metrics.as_str()),
        ("PROMETHEUS_MAPPER_YAML", missing.as_str()),
    ];
    let without = Meshlimit::start_with_env(config.path(), &[], &env);
    let logs = without.logs();
    assert!(
        logs.contains(&format!("PROMETHEUS_MAPPER_YAML={missing}: no such file")),
        "{logs}"
    );
    let text = http::get(metrics_addr, "/metrics", &[])
        .unwrap_or_else(|error| panic!("{error}\n{logs}"))
        .text();
    assert!(
        text.contains("ratelimit_service_config_load_success 1"),
        "{text}"
    );
    // The file arrives (the ConfigMap is mounted): its names take over without a restart.
    std::fs::write(&missing, MAPPER).expect("write the mapping");
    let mapped_hits = "team_ratelimit_total_hits{domain=\"statsd\",descriptor=\"user\"}";
    let scrape = || {
        http::get(metrics_addr, "/metrics", &[])
            .map(|response| response.text())
            .unwrap_or_default()
    };
    let arrived = poll_until(Duration::from_secs(10), || {
        common::meshlimit::sample(&scrape(), mapped_hits).map(|_| ())
    });
    assert!(arrived.is_some(), "{}\n{}", scrape(), without.logs());
    // A broken edit is refused with its line, and the names stay.
    std::fs::write(&missing, "mappings:\n  - match: a.*\n").expect("write the mapping");
    let refused = poll_until(Duration::from_secs(10), || {
        let logs = without.logs();
        logs.contains("the metrics keep the names they had")
            .then_some(logs)
    });
    let logs = refused.unwrap_or_else(|| panic!("no refusal logged\n{}", without.logs()));
    assert!(
        logs.contains(&format!(
            "{missing}:2:5: the mapping of `a.*` has no `name`"
        )),
        "{logs}"
    );
    assert_eq!(common::meshlimit::sample(&scrape(), mapped_hits), Some(0));
    drop(without);

    let typo = MAPPER.replace("    labels:\n      domain", "    lables:\n      domain");
    std::fs::write(mapper.path().join("mapper.yaml"), typo).expect("write the mapping");
    let mut serve = command();
    serve
        .args(["serve", "--config"])
        .arg(config.path())
        .args(["--grpc-addr", &free_loopback_addr().to_string()])
        .args(["--admin-addr", &free_loopback_addr().to_string()])
        .env("PROMETHEUS_MAPPER_YAML", &mapper_path);
    let (code, stderr) = exit_of(serve);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "PROMETHEUS_MAPPER_YAML {mapper_path}:7:5: unknown field `lables`"
        )),
        "{stderr}"
    );
}

/// Waits until `statsd` has counted `counters` (a counter at 0: never sent) and `calls`
/// response-time calls.
fn statsd_counts(
    statsd: &StatsdDaemon,
    server: &Meshlimit,
    counters: &[(String, f64)],
    calls: f64,
) {
    let timer = "ratelimit_server.ShouldRateLimit.response_time";
    let counted = common::poll_until(Duration::from_secs(15), || {
        let totals = statsd.totals();
        let all = counters
            .iter()
            .all(|(name, n)| totals.counters.get(name).copied().unwrap_or(0.0) == *n)
            && totals.timer_calls.get(timer) == Some(&calls);
        all.then_some(())
    });
    assert!(
        counted.is_some(),
        "statsd counted {:#?}\n{}\n{}",
        statsd.totals(),
        statsd.log(),
        server.logs()
    );
}

/// meshlimit started with `env` and a statsd agent at `statsd_port` (flushed every 200 ms),
/// after answering three calls for one user under a limit of two an hour.
async fn three_calls_to_a_limit_of_two(
    statsd_port: u16,
    env: &[(&str, &str)],
) -> (Meshlimit, tempfile::TempDir) {
    common::avoid_window_edge(3_600, 20);
    let config = common::config_dir::plain(&[("statsd.yaml", ANN_LIMITS)]);
    let port = statsd_port.to_string();
    let statsd = [
        ("STATSD_HOST", "127.0.0.1"),
        ("STATSD_PORT", port.as_str()),
        ("STATS_FLUSH_INTERVAL", "200ms"),
    ];
    let server = Meshlimit::start_with_env(config.path(), &[], &[&statsd[..], env].concat());
    calls_for_ann(&server, 3).await;
    (server, config)
}

/// Two calls an hour for each user of the `statsd` domain.
const ANN_LIMITS: &str = "\
domain: statsd
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 2}
";

/// `times` calls for the user ann of the `statsd` domain.
async fn calls_for_ann(server: &Meshlimit, times: usize) {
    let mut client = server.client().await;
    for _ in 0..times {
        client
            .should_rate_limit(request("statsd", &[&[("user", "ann")]]))
            .await
            .unwrap_or_else(|status| panic!("{status}\n{}", server.logs()));
    }
}

/// A statsd agent: a UDP socket of the test's that adds up what it is sent.
struct StatsdAgent(tokio::net::UdpSocket);

impl StatsdAgent {
    async fn bind() -> Self {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await;
        Self(socket.expect("bind the test's statsd socket"))
    }

    fn port(&self) -> u16 {
        self.0.local_addr().expect("its address").port()
    }

    /// Receives until each of `wanted` adds up to its total. A line is keyed by its name
    /// and the rest of it without the value and sample rate (`name|c|#tags`,
    /// `name|ms`); a timer line counts the calls its sample rate stands for.
    async fn wait_for_totals(&self, wanted: &[(String, u64)], server: &Meshlimit) {
        let mut totals = std::collections::HashMap::<String, u64>::new();
        let mut buffer = vec![0u8; 65_536];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while wanted.iter().any(|(key, n)| totals.get(key) != Some(n)) {
            let received = tokio::time::timeout_at(deadline, self.0.recv(&mut buffer)).await;
            let Ok(Ok(size)) = received else {
                panic!("statsd totals after 15 s: {totals:#?}\n{}", server.logs());
            };
            for line in String::from_utf8_lossy(&buffer[..size]).lines() {
                // Names hold no `:` (they are cleaned of it); DogStatsD tags do.
                let (name, rest) =
                    (line.split_once(':')).unwrap_or_else(|| panic!("not a statsd line: {line:?}"));
                let mut parts = rest.split('|');
                let value = parts.next().unwrap_or_default();
                let mut key = name.to_owned();
                let mut count: u64 = 1;
                for part in parts {
                    match part.strip_prefix('@') {
                        Some(rate) => count = (1.0 / rate.parse::<f64>().unwrap()).round() as u64,
                        None => key = format!("{key}|{part}"),
                    }
                }
                if key.contains("|c") {
                    count = value
                        .parse()
                        .unwrap_or_else(|_| panic!("a count: {line:?}"));
                }
                *totals.entry(key).or_default() += count;
            }
        }
    }
}
