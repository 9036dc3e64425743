//! The simulator over HTTP on a loopback port, its window on a manual clock
//! where time matters.

use std::net::Ipv4Addr;

use saleslayer_runtime::clock::ManualClock;
use serde_json::{Value, json};

use super::*;

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

/// A limit no test reaches by waiting: every throttle is deterministic.
fn hour_limit(requests: u32) -> SimulatorConfig {
    SimulatorConfig {
        requests,
        period: secs(3600),
    }
}

async fn spawn_with(
    config: SimulatorConfig,
    options: SimulatorOptions,
    clock: ManualClock,
) -> String {
    // reqwest is built without a default TLS provider; plain HTTP still needs one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind a local port");
    let addr = listener.local_addr().expect("local address");
    let app = router_with(config, &options, Arc::new(clock));
    tokio::spawn(saleslayer_runtime::serve::serve(
        listener,
        app,
        ServeLimits::default(),
        std::future::pending(),
    ));
    format!("http://{addr}")
}

async fn spawn(config: SimulatorConfig) -> String {
    spawn_with(config, SimulatorOptions::default(), ManualClock::default()).await
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn send(request: reqwest::RequestBuilder, key: Option<&str>) -> Answer {
    let request = match key {
        Some(key) => request.header("X-API-KEY", key),
        None => request,
    };
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        headers,
        body,
    }
}

async fn get(url: &str, key: Option<&str>) -> Answer {
    send(reqwest::Client::new().get(url), key).await
}

async fn stats(base: &str) -> SimulatorStats {
    let answer = get(&format!("{base}/stats"), None).await;
    serde_json::from_value(answer.body).expect("stats")
}

#[tokio::test]
async fn requests_without_a_key_get_a_401_problem_details() {
    let base = spawn(hour_limit(5)).await;
    let products = format!("{base}{PRODUCTS_PATH}");
    for key in [None, Some(""), Some("   ")] {
        let answer = get(&products, key).await;
        assert_eq!(answer.status, 401, "{key:?}");
        assert_eq!(
            answer.header("content-type"),
            Some("application/problem+json")
        );
        let fields: Vec<&String> = answer.body.as_object().expect("object").keys().collect();
        assert_eq!(fields, ["detail", "instance", "status", "title", "type"]);
        assert_eq!(
            (
                &answer.body["status"],
                &answer.body["title"],
                &answer.body["instance"]
            ),
            (&json!(401), &json!("Unauthorized"), &json!(PRODUCTS_PATH))
        );
        assert!(
            answer.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("X-API-KEY"))
        );
    }
    let long = "k".repeat(300);
    assert_eq!(get(&products, Some(&long)).await.status, 401);
    assert_eq!(stats(&base).await.unauthorized, 4);
}

#[tokio::test]
async fn next_links_page_through_every_product_once() {
    let base = spawn(hour_limit(100)).await;
    let mut url = format!("{base}{PRODUCTS_PATH}?$count=true&$select=prod_id,prod_ref");
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let answer = get(&url, Some("k")).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body["@count"], PRODUCTS);
        let items = answer.body["value"].as_array().expect("value");
        assert!(items.len() <= 100);
        ids.extend(items.iter().filter_map(|item| item["prod_id"].as_u64()));
        assert!(
            items
                .iter()
                .all(|item| item.as_object().map(|o| o.len()) == Some(2))
        );
        pages += 1;
        match answer.body["@nextLink"].as_str() {
            Some(next) => {
                assert!(
                    next.starts_with(&format!("{base}{PRODUCTS_PATH}?")),
                    "{next}"
                );
                url = next.to_owned();
            }
            None => break,
        }
    }
    assert_eq!(pages, 50);
    assert_eq!(ids, (1..=PRODUCTS).collect::<Vec<_>>());
    let seen = stats(&base).await;
    assert_eq!((seen.accepted, seen.by_key["k"].accepted), (50, 50));
}

#[tokio::test]
async fn malformed_queries_get_validation_failures_and_cost_nothing() {
    let base = spawn(hour_limit(1)).await;
    for query in [
        "$top=abc",
        "$skip=-1",
        "$count=maybe",
        "$select=nope",
        "$filter=prod_id%20eq%201",
    ] {
        let answer = get(&format!("{base}{PRODUCTS_PATH}?{query}"), Some("k")).await;
        assert_eq!(answer.status, 400, "{query}");
        let failures = answer.body["validationFailures"]
            .as_object()
            .expect("failures");
        assert_eq!(failures.len(), 1, "{query}: {}", answer.body);
        assert!(
            failures
                .values()
                .all(|m| m.as_array().is_some_and(|m| !m.is_empty()))
        );
    }
    // The one request the limit allows is still there.
    assert_eq!(
        get(&format!("{base}{PRODUCTS_PATH}?$top=1"), Some("k"))
            .await
            .status,
        200
    );
    let seen = stats(&base).await;
    assert_eq!((seen.bad_request, seen.accepted), (5, 1));
}

#[tokio::test]
async fn variants_categories_and_metadata_are_served() {
    let base = spawn(hour_limit(10)).await;
    let catalog = format!("{base}{BASE_PATH}");
    let variants = get(&format!("{catalog}/Variants?$top=2&$count=true"), Some("k")).await;
    assert_eq!(variants.body["@count"], 10_000);
    assert_eq!(variants.body["value"][1]["frmt_ref"], "SKU-000001-L");
    let categories = get(&format!("{catalog}/Categories"), Some("k")).await;
    assert_eq!(categories.body["value"].as_array().map(Vec::len), Some(40));
    assert!(categories.body.get("@nextLink").is_none());
    let all = get(&format!("{catalog}/$metadata"), Some("k")).await;
    assert_eq!(all.body["value"].as_array().map(Vec::len), Some(3));
    let one = get(&format!("{catalog}/Products/$metadata"), Some("k")).await;
    assert_eq!(one.body["value"][0]["title"], "Product");
    assert!(one.body["value"][0]["properties"]["prod_ref"].is_object());
    assert_eq!(stats(&base).await.accepted, 4);
}

#[tokio::test]
async fn posting_a_product_answers_201_with_its_location() {
    let base = spawn(hour_limit(10)).await;
    let http = reqwest::Client::new();
    let url = format!("{base}{PRODUCTS_PATH}");
    let body = json!({"prod_ref": "NEW-1", "prod_title": [{"culture": "en", "value": "New"}]});
    let created = send(http.post(&url).json(&body), Some("k")).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(
        created.header("location"),
        Some("/catalog/rest/Catalog/Products(5001)")
    );
    assert_eq!(
        (&created.body["prod_id"], &created.body["prod_ref"]),
        (&json!(5001), &json!("NEW-1"))
    );
    let invalid = send(http.post(&url).json(&json!({"prod_title": "x"})), Some("k")).await;
    assert_eq!(invalid.status, 400);
    assert!(
        invalid.body["validationFailures"]["prod_ref"].is_array(),
        "{}",
        invalid.body
    );
    let huge = send(http.post(&url).body(vec![b' '; 100_000]), Some("k")).await;
    assert_eq!(huge.status, 413);
    let elsewhere = send(
        http.post(format!("{base}{BASE_PATH}/Variants")).json(&body),
        Some("k"),
    )
    .await;
    assert_eq!(elsewhere.status, 405);
    let seen = stats(&base).await;
    assert_eq!((seen.created, seen.accepted, seen.bad_request), (1, 1, 1));
}

#[tokio::test]
async fn over_the_limit_is_429_with_retry_after_and_stats_count_it() {
    let base = spawn(hour_limit(3)).await;
    let products = format!("{base}{PRODUCTS_PATH}");
    for _ in 0..3 {
        assert_eq!(get(&products, Some("alpha")).await.status, 200);
    }
    let throttled = get(&products, Some("alpha")).await;
    assert_eq!(throttled.status, 429);
    assert_eq!(throttled.header("retry-after"), Some("3600"));
    assert_eq!(throttled.body["status"], 429);
    // A malformed request is still a 400 when throttled, and costs nothing.
    assert_eq!(
        get(&format!("{products}?$top=x"), Some("alpha"))
            .await
            .status,
        400
    );
    // Another key has its own budget.
    assert_eq!(get(&products, Some("beta")).await.status, 200);
    assert_eq!(get(&products, None).await.status, 401);

    let answer = get(&format!("{base}/stats"), None).await;
    let seen: SimulatorStats = serde_json::from_value(answer.body.clone()).expect("stats");
    let expected = SimulatorStats {
        accepted: 4,
        throttled: 1,
        unauthorized: 1,
        bad_request: 1,
        by_key: BTreeMap::from([
            (
                "alpha".into(),
                KeyStats {
                    accepted: 3,
                    throttled: 1,
                },
            ),
            (
                "beta".into(),
                KeyStats {
                    accepted: 1,
                    throttled: 0,
                },
            ),
        ]),
        created: 0,
        outside: KeyStats::default(),
    };
    assert_eq!(seen, expected);
    assert_eq!(answer.body["badRequest"], 1, "camelCase on the wire");
    assert_eq!(answer.body["byKey"]["alpha"]["throttled"], 1);
}

#[tokio::test]
async fn the_throttle_signal_is_configurable() {
    let options = SimulatorOptions {
        signal: ThrottleSignal {
            status: 503,
            retry_after: false,
        },
        ..SimulatorOptions::default()
    };
    let base = spawn_with(hour_limit(1), options, ManualClock::default()).await;
    let products = format!("{base}{PRODUCTS_PATH}");
    assert_eq!(get(&products, Some("k")).await.status, 200);
    let throttled = get(&products, Some("k")).await;
    assert_eq!(throttled.status, 503);
    assert_eq!(throttled.header("retry-after"), None);
    assert_eq!(throttled.body["title"], "Service Unavailable");
    assert_eq!(stats(&base).await.throttled, 1);
}

#[tokio::test]
async fn the_old_route_and_unknown_paths_are_404_problems() {
    let base = spawn(hour_limit(5)).await;
    for path in [
        "/products?page=1",
        "/orders",
        "/catalog/rest/Catalog/Orders",
    ] {
        let answer = get(&format!("{base}{path}"), Some("k")).await;
        assert_eq!(
            (answer.status, &answer.body["status"]),
            (404, &json!(404)),
            "{path}"
        );
    }
    let answer = send(
        reqwest::Client::new().delete(format!("{base}{PRODUCTS_PATH}")),
        Some("k"),
    )
    .await;
    assert_eq!(answer.status, 405);
    assert!(answer.header("allow").is_some());
}

#[tokio::test]
async fn the_limit_changes_at_run_time() {
    let clock = ManualClock::default();
    let base = spawn_with(
        SimulatorConfig {
            requests: 4,
            period: secs(10),
        },
        SimulatorOptions::default(),
        clock.clone(),
    )
    .await;
    let http = reqwest::Client::new();
    let products = format!("{base}{PRODUCTS_PATH}?$top=1");
    for _ in 0..2 {
        assert_eq!(get(&products, Some("k")).await.status, 200);
    }
    let lowered = send(
        http.put(format!("{base}/admin/limit"))
            .json(&json!({"requests": 2})),
        None,
    )
    .await;
    assert_eq!(lowered.body, json!({"requests": 2, "periodSeconds": 10.0}));
    assert_eq!(get(&products, Some("k")).await.status, 429);
    clock.advance(secs(10));
    assert_eq!(get(&products, Some("k")).await.status, 200);
    let raised = send(
        http.put(format!("{base}/admin/limit"))
            .json(&json!({"requests": 5, "periodSeconds": 20})),
        None,
    )
    .await;
    assert_eq!(raised.status, 200);
    for _ in 0..4 {
        assert_eq!(get(&products, Some("k")).await.status, 200);
    }
    assert_eq!(get(&products, Some("k")).await.status, 429);
    assert_eq!(
        get(&format!("{base}/admin/limit"), None).await.body["requests"],
        5
    );
    for bad in [
        json!({"requests": 0}),
        json!({"requests": 1, "periodSeconds": 0}),
        json!({"limit": 3}),
    ] {
        let refused = send(http.put(format!("{base}/admin/limit")).json(&bad), None).await;
        assert_eq!(refused.status, 400, "{bad}");
    }
}

#[tokio::test]
async fn an_outside_consumer_takes_its_share_of_the_key() {
    let clock = ManualClock::default();
    let options = SimulatorOptions {
        outside: Some(("acme".into(), 6)),
        ..SimulatorOptions::default()
    };
    let base = spawn_with(
        SimulatorConfig {
            requests: 10,
            period: secs(10),
        },
        options,
        clock.clone(),
    )
    .await;
    let products = format!("{base}{PRODUCTS_PATH}?$top=1");
    // 6 per 10 s from 0 s: by 9 s it has sent at 0, 1.66, …, 8.33 (6 sends).
    clock.advance(secs(9));
    let mut served = 0;
    while get(&products, Some("acme")).await.status == 200 {
        served += 1;
    }
    assert_eq!(served, 4, "10 per window, 6 taken by the outside consumer");
    // Another key is not touched.
    assert_eq!(get(&products, Some("other")).await.status, 200);
    let seen = stats(&base).await;
    assert_eq!((seen.outside.accepted, seen.outside.throttled), (6, 0));
    assert_eq!(
        seen.by_key["acme"],
        KeyStats {
            accepted: 4,
            throttled: 1
        }
    );

    // Stopped by the admin route, started again there with another figure.
    let http = reqwest::Client::new();
    let admin = format!("{base}/admin/consumers");
    let stopped = send(
        http.put(&admin)
            .json(&json!({"key": "acme", "requests": 0})),
        None,
    )
    .await;
    assert_eq!(stopped.body, json!({"consumers": []}));
    clock.advance(secs(30));
    assert_eq!(
        stats(&base).await.outside.accepted,
        6,
        "a stopped consumer sends nothing"
    );
    let started = send(
        http.put(&admin)
            .json(&json!({"key": "acme", "requests": 3})),
        None,
    )
    .await;
    assert_eq!(
        started.body,
        json!({"consumers": [{"key": "acme", "requests": 3}]})
    );
    assert_eq!(
        stats(&base).await.outside.accepted,
        7,
        "its first send goes at once"
    );
    let refused = send(
        http.put(&admin).json(&json!({"key": "", "requests": 3})),
        None,
    )
    .await;
    assert_eq!(refused.status, 400);
}

#[tokio::test]
async fn keys_past_the_counted_ones_are_folded_together() {
    let base = spawn(hour_limit(5)).await;
    let http = reqwest::Client::new();
    let products = format!("{base}{PRODUCTS_PATH}?$top=1");
    for n in 0..api::MAX_COUNTED_KEYS + 3 {
        let answer = send(http.get(&products), Some(&format!("key-{n}"))).await;
        assert_eq!(answer.status, 200);
    }
    let seen = stats(&base).await;
    assert_eq!(seen.by_key.len(), api::MAX_COUNTED_KEYS + 1);
    assert_eq!(seen.by_key[api::OTHER_KEYS].accepted, 3);
    assert_eq!(seen.accepted, api::MAX_COUNTED_KEYS as u64 + 3);
}

#[tokio::test]
async fn serve_stops_on_shutdown_and_refuses_bad_settings() {
    let bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let served = tokio::time::timeout(secs(5), serve(bind, hour_limit(5), async {})).await;
    assert!(matches!(served, Ok(Ok(()))), "{served:?}");
    let refused = serve(bind, hour_limit(0), async {}).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);
    assert!(refused.to_string().contains("--requests"), "{refused}");
    let bad_signal = SimulatorOptions {
        signal: ThrottleSignal {
            status: 200,
            retry_after: true,
        },
        ..SimulatorOptions::default()
    };
    let refused = serve_with(bind, hour_limit(5), bad_signal, async {})
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("--throttle-status"),
        "{refused}"
    );
}

#[test]
fn flags_become_settings() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }
    let parse = |line: &[&str]| Cli::try_parse_from([&["simulate"], line].concat()).map(|c| c.args);
    let args = parse(&[
        "--throttle-status",
        "503",
        "--retry-after",
        "off",
        "--outside-key",
        "k",
        "--outside-requests",
        "15",
    ])
    .expect("flags");
    let (config, options) = args.settings().expect("valid");
    assert_eq!(config, SimulatorConfig::default());
    assert_eq!(
        options.signal,
        ThrottleSignal {
            status: 503,
            retry_after: false
        }
    );
    assert_eq!(options.outside, Some(("k".into(), 15)));
    assert!(parse(&["--retry-after", "maybe"]).is_err());
    let half = parse(&["--outside-key", "k"]).expect("flags").settings();
    assert_eq!(half.map_err(|e| e.reason()), Err("OutsideHalf"));
    let zero = parse(&["--period-seconds", "0"]).expect("flags").settings();
    assert_eq!(zero.map_err(|e| e.reason()), Err("ZeroPeriod"));
    let not_error = parse(&["--throttle-status", "302"])
        .expect("flags")
        .settings();
    assert_eq!(not_error.map_err(|e| e.reason()), Err("ThrottleStatus"));
}

#[test]
fn counters_saturate_instead_of_wrapping() {
    let simulator = api::Simulator::new(
        hour_limit(5),
        ThrottleSignal::default(),
        Arc::new(ManualClock::default()),
    );
    simulator.force_counters(u64::MAX);
    let stats = simulator.stats_after_one_request("k");
    assert_eq!(
        (stats.accepted, stats.by_key["k"].accepted),
        (u64::MAX, u64::MAX)
    );
}
