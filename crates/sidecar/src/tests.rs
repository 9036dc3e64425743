//! The proxy's own edges: what it forwards, what it refuses before reading,
//! what its flags become.

use std::net::Ipv4Addr;

use axum::http::HeaderValue;
use clap::Parser;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ProxyArgs,
}

fn args(extra: &[&str]) -> ProxyArgs {
    let line = [
        &[
            "proxy",
            "--upstream",
            "http://127.0.0.1:9",
            "--rate-requests",
            "5",
            "--rate-period-ms",
            "1000",
        ],
        extra,
    ]
    .concat();
    Cli::try_parse_from(line).expect("flags").args
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("name");
        map.append(name, HeaderValue::from_str(value).expect("value"));
    }
    map
}

fn names(map: &HeaderMap) -> Vec<&str> {
    let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
    names.sort_unstable();
    names
}

#[test]
fn headers_named_in_connection_are_not_forwarded() {
    let caller = headers(&[
        ("connection", "keep-alive, X-Trace-Hop , x-debug"),
        ("x-trace-hop", "1"),
        ("x-debug", "on"),
        ("x-api-key", "k"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("host", "127.0.0.1:8787"),
        ("content-length", "3"),
        ("accept", "application/json"),
        ("accept", "text/plain"),
    ]);
    let kept = end_to_end(&caller, &[header::HOST, header::CONTENT_LENGTH]);
    assert_eq!(names(&kept), ["accept", "x-api-key"]);
    assert_eq!(kept.get_all(header::ACCEPT).iter().count(), 2);
}

#[test]
fn flags_and_injected_variables_become_the_config() {
    let config = ProxyConfig::from_args(&args(&[
        "--throttle-statuses",
        "429,503",
        "--max-connections",
        "7",
        "--header-read-timeout-seconds",
        "3",
        "--max-body-bytes",
        "1024",
    ]))
    .expect("valid");
    assert_eq!(config.policy.throttle_statuses.codes(), vec![429, 503]);
    assert_eq!(
        config.serve,
        ServeLimits {
            header_read_timeout: Duration::from_secs(3),
            max_connections: 7,
            keep_alive: true,
        }
    );
    assert_eq!(config.max_body, 1024);
    let defaults = ProxyConfig::from_args(&args(&[])).expect("valid");
    assert_eq!(defaults.policy.throttle_statuses.codes(), vec![429]);
    let refused = ProxyConfig::from_args(&args(&["--throttle-statuses", "200"]));
    assert!(
        matches!(refused, Err(ConfigError::ThrottleStatuses(_))),
        "{refused:?}"
    );
}

/// The proxy's router on a loopback port, forwarding to a closed port.
async fn spawn_proxy(max_body: &str) -> std::net::SocketAddr {
    let config = ProxyConfig::from_args(&args(&["--max-body-bytes", max_body])).expect("valid");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
    let proxy = Proxy::new(&config, clock, fastrand::Rng::with_seed(1)).expect("proxy");
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(serve(
        listener,
        router(proxy),
        ServeLimits::default(),
        std::future::pending(),
    ));
    addr
}

/// Send `raw` to the proxy at `addr`; the first 12 bytes of its answer.
async fn answer_head(addr: std::net::SocketAddr, raw: &[u8]) -> [u8; 12] {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw).await.expect("write");
    let mut head = [0u8; 12];
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut head)).await;
    assert!(matches!(read, Ok(Ok(_))), "no answer within 30 s: {read:?}");
    head
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_it_is_read() {
    let addr = spawn_proxy("1024").await;
    // A head announcing a gigabyte, and not one byte of it: the answer can
    // only come from the declared length.
    let head = answer_head(
        addr,
        b"POST /catalog/rest/Catalog/Products HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
    )
    .await;
    assert_eq!(&head, b"HTTP/1.1 413");
}

#[tokio::test]
async fn a_body_without_a_length_is_cut_at_the_limit() {
    let addr = spawn_proxy("8").await;
    let head = answer_head(
        addr,
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(&head, b"HTTP/1.1 413");
}

/// Header names: ordinary ones, hop-by-hop ones, and a few a `Connection`
/// header may name.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,12}",
        Just("connection".to_owned()),
        Just("keep-alive".to_owned()),
        Just("transfer-encoding".to_owned()),
        Just("upgrade".to_owned()),
        Just("te".to_owned()),
        Just("x-hop".to_owned()),
        Just("host".to_owned()),
    ]
}

proptest! {
    /// Whatever the caller sends, the forwarded headers are exactly its
    /// headers minus the hop-by-hop ones, those named in `Connection` and the
    /// extra ones, values and order of repeated headers kept.
    #[test]
    fn only_end_to_end_headers_are_forwarded(
        pairs in proptest::collection::vec((header_name(), "[ -~]{0,20}"), 0..24),
        connection in proptest::option::of("[a-zA-Z0-9, -]{0,40}"),
    ) {
        let mut caller = HeaderMap::new();
        for (name, value) in &pairs {
            let Ok(value) = HeaderValue::from_str(value) else { continue };
            caller.append(HeaderName::from_bytes(name.as_bytes()).expect("valid name"), value);
        }
        if let Some(list) = &connection
            && let Ok(value) = HeaderValue::from_str(list)
        {
            caller.append(header::CONNECTION, value);
        }
        let named: Vec<String> = caller
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect();
        let kept = end_to_end(&caller, &[header::HOST]);
        for name in kept.keys() {
            prop_assert!(!HOP_BY_HOP.contains(name), "{name} forwarded");
            prop_assert!(name != header::HOST);
            prop_assert!(!named.iter().any(|n| n == name.as_str()), "{name} is named in Connection");
        }
        for name in caller.keys() {
            let dropped = HOP_BY_HOP.contains(name)
                || name == header::HOST
                || named.iter().any(|n| n == name.as_str());
            if !dropped {
                let sent: Vec<&HeaderValue> = caller.get_all(name).iter().collect();
                let forwarded: Vec<&HeaderValue> = kept.get_all(name).iter().collect();
                prop_assert_eq!(sent, forwarded);
            }
        }
    }
}
