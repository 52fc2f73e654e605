//! The OpenAI-compatible server over real HTTP, on the tiny chat model (configs/models/qwen3-tiny-chat).

mod common;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::{Value, json};

use common::{MODEL, metric, open, parse_sse, post_json, read_sse, send, start};

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let server = start(None).await;
    let addr = server.local_addr();
    let (s, body) = send(addr, "GET", "/health", None, &[]).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = send(addr, "GET", "/v1/models", None, &[]).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["max_model_len"], 4096);
    // Auto-sized pool: 64 running sequences of 4096 positions in blocks of 16.
    assert_eq!(metric(addr, "qserve_kv_blocks_total").await, 16384.0);
    assert_eq!(metric(addr, "qserve_kv_blocks_in_use").await, 0.0);
    assert_eq!(metric(addr, "qserve_queue_depth").await, 0.0);
    let (_, page) = send(addr, "GET", "/metrics", None, &[]).await;
    for name in [
        "qserve_time_to_first_token_seconds_bucket",
        "qserve_time_per_output_token_seconds_count",
        "qserve_prompt_tokens_total",
        "qserve_generation_tokens_total",
        "qserve_requests_total",
    ] {
        assert!(page.contains(name), "{name} missing");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streaming_equals_non_streaming() {
    let server = start(None).await;
    let addr = server.local_addr();
    let req = chat(
        "What is the capital of France?",
        json!({"max_tokens": 12, "ignore_eos": true}),
    );
    let (s, v) = post_json(addr, "/v1/chat/completions", &req).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    // "<|im_start|>user\n…<|im_end|>\n<|im_start|>assistant\n" in tokens.
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 8);
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        prompt_tokens + 12
    );
    let text = content(&v);

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let o = open(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&sreq.to_string()),
        &[],
    )
    .await;
    assert_eq!(o.status, 200);
    assert!(o.content_type.starts_with("text/event-stream"));
    let events = read_sse(o.body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = chunks[0]["id"].as_str().unwrap();
    let mut streamed = String::new();
    let mut finish = None;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id, "one id per stream");
        if let Some(choice) = c["choices"].as_array().unwrap().first() {
            if let Some(t) = choice["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
            if !choice["finish_reason"].is_null() {
                finish = Some(choice["finish_reason"].clone());
            }
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finish, Some(json!("length")));
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(usage["prompt_tokens"].as_u64().unwrap(), prompt_tokens);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_thinking_reaches_the_chat_template() {
    let server = start(None).await;
    let addr = server.local_addr();
    let prompt_tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    let (s, think) = post_json(
        addr,
        "/v1/chat/completions",
        &chat("Hi", json!({"max_tokens": 1})),
    )
    .await;
    assert_eq!(s, 200, "{think}");
    let no_think = chat(
        "Hi",
        json!({"max_tokens": 1, "chat_template_kwargs": {"enable_thinking": false}}),
    );
    let (s, v) = post_json(addr, "/v1/chat/completions", &no_think).await;
    assert_eq!(s, 200, "{v}");
    // "<think>\n\n</think>\n\n" is <think>, "\n\n", </think>, "\n\n" in this tokenizer.
    let codec = qserve::text::TextCodec::from_dir(common::model_dir()).unwrap();
    let extra = codec.encode("<think>\n\n</think>\n\n").unwrap().len() as u64;
    assert!(extra >= 3);
    assert_eq!(prompt_tokens(&v), prompt_tokens(&think) + extra);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_generation_before_the_match() {
    let server = start(None).await;
    let addr = server.local_addr();
    let base = chat(
        "Tell me a story.",
        json!({"max_tokens": 40, "ignore_eos": true}),
    );
    let (s, v) = post_json(addr, "/v1/chat/completions", &base).await;
    assert_eq!(s, 200, "{v}");
    let full = content(&v);
    // A stop string taken from the middle of the unconstrained output.
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(chars.len() >= 8, "output too short to test stops: {full:?}");
    let (a, b) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 2].0);
    let stop = full[a..b].to_string();
    let want = full[..full.find(&stop).unwrap()].to_string();
    assert!(!want.is_empty(), "stop {stop:?} should cut inside {full:?}");

    let mut req = base.clone();
    req["stop"] = json!([stop.clone(), "never-appears-xyz"]);
    let (s, v) = post_json(addr, "/v1/chat/completions", &req).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(content(&v), want, "stop {stop:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 40);

    // Streaming never leaks the stop string, even split over tokens.
    req["stream"] = json!(true);
    let o = open(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&req.to_string()),
        &[],
    )
    .await;
    let events = read_sse(o.body).await;
    let mut streamed = String::new();
    let mut finish = Value::Null;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        let choice = &c["choices"][0];
        streamed.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    assert_eq!(streamed, want);
    assert_eq!(finish, "stop");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_respect_max_tokens_and_stream() {
    let server = start(None).await;
    let addr = server.local_addr();
    let req = json!({"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 5, "temperature": 0,
                     "ignore_eos": true});
    let (s, v) = post_json(addr, "/v1/completions", &req).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (s, body) = send(
        addr,
        "POST",
        "/v1/completions",
        Some(&sreq.to_string()),
        &[],
    )
    .await;
    assert_eq!(s, 200);
    let events = parse_sse(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion");
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(streamed, text);

    // Token-id prompts and echo.
    let ids = json!({"model": MODEL, "prompt": [72, 101, 108], "max_tokens": 3, "temperature": 0,
                     "ignore_eos": true, "echo": true});
    let (s, v) = post_json(addr, "/v1/completions", &ids).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_openai_error_json() {
    let server = start(None).await;
    let addr = server.local_addr();
    let long = "word ".repeat(5000);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, None),
        (
            "/v1/chat/completions",
            json!({"model": MODEL}).to_string(),
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": []}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"temperature": -1})).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"top_p": 0})).to_string(),
            400,
            Some("top_p"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"n": 2})).to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"max_tokens": 0})).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            chat(&long, json!({})).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"model": "gpt-9"})).to_string(),
            404,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": [99999]}).to_string(),
            400,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "hi", "max_tokens": 5000}).to_string(),
            400,
            Some("prompt"),
        ),
        ("/v1/nothing", "{}".into(), 404, None),
    ];
    for (path, body, status, param) in cases {
        let (s, text) = send(addr, "POST", path, Some(&body), &[]).await;
        let short: String = body.chars().take(80).collect();
        assert_eq!(s, status, "{path} {short}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let err = &v["error"];
        assert!(!err["message"].as_str().unwrap().is_empty());
        assert!(err["type"].is_string());
        assert!(err.get("code").is_some() && err.get("param").is_some());
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{path} {short}: {text}");
        }
    }
    // Transport-level problems are JSON too.
    let (s, text) = send(addr, "GET", "/v1/chat/completions", None, &[]).await;
    assert_eq!(s, 405, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["code"],
        "method_not_allowed"
    );
    let huge = chat(&"x".repeat(9 << 20), json!({})).to_string();
    let (s, text) = send(addr, "POST", "/v1/chat/completions", Some(&huge), &[]).await;
    assert_eq!(s, 413, "{}", &text[..text.len().min(200)]);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["code"],
        "request_too_large"
    );
    let (s, v) = post_json(addr, "/v1/chat/completions", &chat(&long, json!({}))).await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // The server is still healthy and counted the errors.
    assert!(metric(addr, "qserve_request_errors_total").await >= 12.0);
    let (s, _) = post_json(
        addr,
        "/v1/chat/completions",
        &chat("hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(s, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() {
    let server = start(Some("sekret")).await;
    let addr = server.local_addr();
    let body = chat("hi", json!({"max_tokens": 2})).to_string();
    let (s, text) = send(addr, "POST", "/v1/chat/completions", Some(&body), &[]).await;
    assert_eq!(s, 401, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let (s, _) = send(
        addr,
        "GET",
        "/v1/models",
        None,
        &[("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(s, 401);
    let (s, text) = send(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        &[("authorization", "Bearer sekret")],
    )
    .await;
    assert_eq!(s, 200, "{text}");
    let (s, _) = send(addr, "GET", "/health", None, &[]).await;
    assert_eq!(s, 200, "health stays open");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_requests_match_sequential_answers() {
    let server = start(None).await;
    let addr = server.local_addr();
    let reqs: Vec<Value> = (0..32)
        .map(|i| {
            let words = [
                "fox", "dog", "sun", "rain", "city", "model", "token", "server",
            ];
            let prompt = (0..=(i % 7))
                .map(|j| words[(i + j) % 8])
                .collect::<Vec<_>>()
                .join(" ");
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 4 + i % 9, "temperature": 0,
                   "ignore_eos": true, "stream": i % 2 == 1})
        })
        .collect();
    let answer = |addr, req: Value| async move {
        let (s, body) = send(addr, "POST", "/v1/completions", Some(&req.to_string()), &[]).await;
        assert_eq!(s, 200, "{body}");
        if req["stream"] == json!(true) {
            parse_sse(&body)
                .iter()
                .filter(|e| *e != "[DONE]")
                .map(|e| {
                    let c: Value = serde_json::from_str(e).unwrap();
                    c["choices"][0]["text"].as_str().unwrap().to_string()
                })
                .collect::<String>()
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["usage"]["completion_tokens"], req["max_tokens"]);
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    let handles: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| tokio::spawn(answer(addr, r)))
        .collect();
    let mut concurrent = Vec::new();
    for h in handles {
        concurrent.push(h.await.unwrap());
    }
    for (i, r) in reqs.iter().enumerate() {
        let alone = answer(addr, r.clone()).await;
        assert_eq!(concurrent[i], alone, "request {i}");
    }
    assert_eq!(metric(addr, "qserve_kv_blocks_in_use").await, 0.0);
    assert_eq!(metric(addr, "qserve_sequences_finished_total").await, 64.0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnecting_mid_stream_frees_its_kv_blocks() {
    let server = start(None).await;
    let addr = server.local_addr();
    let req = chat(
        "Tell me a very long story.",
        json!({"max_tokens": 4000, "ignore_eos": true, "stream": true}),
    );
    let mut o = open(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&req.to_string()),
        &[],
    )
    .await;
    assert_eq!(o.status, 200);
    // Read a few chunks: the sequence is running.
    let mut got = String::new();
    while got.matches("\n\n").count() < 4 {
        let f = o.body.frame().await.unwrap().unwrap();
        if let Ok(d) = f.into_data() {
            got.push_str(std::str::from_utf8(&d).unwrap());
        }
    }
    assert!(metric(addr, "qserve_kv_blocks_in_use").await > 0.0);
    assert_eq!(metric(addr, "qserve_running_sequences").await, 1.0);
    // Disconnect.
    drop(o.body);
    o.conn.abort();
    let t0 = Instant::now();
    loop {
        if metric(addr, "qserve_kv_blocks_in_use").await == 0.0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "blocks not freed after disconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(addr, "qserve_sequences_aborted_total").await, 1.0);
    assert_eq!(metric(addr, "qserve_sequences_finished_total").await, 0.0);
    assert_eq!(metric(addr, "qserve_running_sequences").await, 0.0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_sampling_is_reproducible_under_batching() {
    let server = start(None).await;
    let addr = server.local_addr();
    let req = |seed: u64| {
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 1.0,
               "top_p": 0.9, "top_k": 50, "seed": seed, "ignore_eos": true})
    };
    // Two requests with the same seed run concurrently with others; each must equal its solo run.
    let seeds = [7u64, 7, 8, 9, 10];
    let handles: Vec<_> = seeds
        .iter()
        .map(|&s| {
            let r = req(s);
            tokio::spawn(async move { post_json(addr, "/v1/completions", &r).await })
        })
        .collect();
    let mut texts = Vec::new();
    for h in handles {
        let (s, v) = h.await.unwrap();
        assert_eq!(s, 200, "{v}");
        texts.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert_eq!(texts[0], texts[1], "same seed, same text");
    let (_, solo) = post_json(addr, "/v1/completions", &req(7)).await;
    assert_eq!(solo["choices"][0]["text"].as_str().unwrap(), texts[0]);
    let distinct: std::collections::BTreeSet<&String> = texts.iter().collect();
    assert!(
        distinct.len() >= 3,
        "different seeds should sample differently: {texts:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_parser_keeps_plain_answers_as_content() {
    // The random model never opens with <think>, so with the parser on the answer is all content, equal to
    // the answer without the parser (the splitting itself is unit-tested in qserve::reasoning).
    let plain = start(None).await;
    let parsed = common::start_with(None, true).await;
    let req = chat("Hello!", json!({"max_tokens": 12, "ignore_eos": true}));
    let (_, a) = post_json(plain.local_addr(), "/v1/chat/completions", &req).await;
    let (s, b) = post_json(parsed.local_addr(), "/v1/chat/completions", &req).await;
    assert_eq!(s, 200, "{b}");
    let text = content(&a);
    assert!(!text.trim_start().starts_with("<think>"));
    assert_eq!(content(&b), text);
    assert!(b["choices"][0]["message"]["reasoning_content"].is_null());
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let o = open(
        parsed.local_addr(),
        "POST",
        "/v1/chat/completions",
        Some(&sreq.to_string()),
        &[],
    )
    .await;
    let mut streamed = String::new();
    for e in read_sse(o.body).await.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        assert!(c["choices"][0]["delta"].get("reasoning_content").is_none());
        streamed.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(streamed, text);
    plain.shutdown().await.unwrap();
    parsed.shutdown().await.unwrap();
}
