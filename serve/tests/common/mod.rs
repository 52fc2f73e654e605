//! Shared helpers of the HTTP tests: start a server on the tiny chat model, a minimal hyper HTTP/1 client, and
//! an SSE reader.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use qserve::engine::EngineConfig;
use qserve::{ServeConfig, ServerHandle, serve};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

pub const MODEL: &str = "tiny";

pub fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/models/qwen3-tiny-chat")
}

pub async fn start(api_key: Option<&str>) -> ServerHandle {
    start_with(api_key, false).await
}

pub async fn start_with(api_key: Option<&str>, reasoning_parser: bool) -> ServerHandle {
    let mut cfg = ServeConfig::new(model_dir());
    cfg.reasoning_parser = reasoning_parser;
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.api_key = api_key.map(str::to_string);
    cfg.served_model_name = Some(MODEL.into());
    cfg.engine = EngineConfig {
        max_batch_tokens: 256,
        ..Default::default()
    };
    serve(cfg).await.expect("server starts")
}

/// An open response whose body is read as it comes.
pub struct Open {
    pub status: u16,
    pub content_type: String,
    pub body: Incoming,
    pub conn: JoinHandle<()>,
}

pub async fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Open {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Open {
        status,
        content_type,
        body: resp.into_body(),
        conn,
    }
}

/// Sends a request and reads the whole answer.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let o = open(addr, method, path, body, headers).await;
    let bytes = o.body.collect().await.unwrap().to_bytes();
    (o.status, String::from_utf8(bytes.to_vec()).unwrap())
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let (s, text) = send(addr, "POST", path, Some(&body.to_string()), &[]).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (s, v)
}

/// Reads SSE `data:` payloads until the stream ends; `[DONE]` is returned as the string "[DONE]".
pub async fn read_sse(mut body: Incoming) -> Vec<String> {
    let mut buf = String::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            buf.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    parse_sse(&buf)
}

pub fn parse_sse(buf: &str) -> Vec<String> {
    buf.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_string()
        })
        .collect()
}

pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (s, page) = send(addr, "GET", "/metrics", None, &[]).await;
    assert_eq!(s, 200);
    qserve::metrics::scrape(&page, name).unwrap_or_else(|| panic!("{name} missing in:\n{page}"))
}
