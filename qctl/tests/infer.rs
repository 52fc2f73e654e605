//! `qctl infer` as a user runs it (the real binary) on the tiny chat model (`configs/models/qwen3-tiny-chat`:
//! random weights, a real tokenizer and Qwen3's chat template), checked against the serving engine run
//! in-process on the same rendered prompts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use qkernels::Device;
use qparallel::lora::{self, LoraAdapters, LoraConfig};
use qparallel::model::ModelConfig;
use qserve::chat::{ChatEngine, ChatMessage, Completion, TemplateOptions};
use qserve::engine::{EngineConfig, SamplingParams};
use serde_json::{Value, json};

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/models/qwen3-tiny-chat")
}

/// `qctl infer --model <tiny> ARGS`.
fn infer(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qctl"));
    c.arg("infer").arg("--model").arg(model_dir()).args(args);
    c.env_remove("RUST_BACKTRACE");
    c
}

/// Runs with `stdin` piped in; returns (success, stdout, stderr).
fn run(cmd: &mut Command, stdin: &str) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qctl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(cmd: &mut Command, stdin: &str) -> (String, String) {
    let (success, stdout, stderr) = run(cmd, stdin);
    assert!(
        success,
        "qctl infer failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    (stdout, stderr)
}

fn engine() -> ChatEngine {
    ChatEngine::load(&model_dir(), Device::Cpu, EngineConfig::default()).unwrap()
}

fn user(text: &str) -> ChatMessage {
    ChatMessage::text("user", text)
}

/// What the engine generates greedily for `messages` (the rendered prompt text and the completion).
fn greedy(chat: &ChatEngine, messages: &[ChatMessage], max_tokens: usize) -> (String, Completion) {
    let prompt = chat.render(messages, &TemplateOptions::default()).unwrap();
    let done = chat
        .submit(prompt.ids, SamplingParams::greedy(max_tokens))
        .unwrap()
        .wait()
        .unwrap();
    (prompt.text, done)
}

#[test]
fn a_greedy_prompt_is_reproducible_and_equals_the_engine() {
    let args = [
        "--prompt",
        "Hello there",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
    ];
    let (first, _) = ok(&mut infer(&args), "");
    let (second, _) = ok(&mut infer(&args), "");
    assert_eq!(first, second);
    let chat = engine();
    let (_, want) = greedy(&chat, &[user("Hello there")], 24);
    assert!(want.completion_tokens > 0);
    assert_eq!(first, format!("{}\n", want.text));

    // --system goes first.
    let (with_system, _) = ok(
        &mut infer(&[
            "--prompt",
            "Hello there",
            "--system",
            "Be brief.",
            "--max-new-tokens",
            "24",
        ]),
        "",
    );
    let (_, want) = greedy(
        &chat,
        &[
            ChatMessage::text("system", "Be brief."),
            user("Hello there"),
        ],
        24,
    );
    assert_eq!(with_system, format!("{}\n", want.text));
    chat.shutdown();
}

#[test]
fn quantized_inference_equals_the_quantized_engine() {
    for mode in ["int8", "int4", "int4:32"] {
        let (got, _) = ok(
            &mut infer(&[
                "--prompt",
                "Hello there",
                "--max-new-tokens",
                "16",
                "--quantization",
                mode,
            ]),
            "",
        );
        let config = EngineConfig {
            quantization: mode.parse().unwrap(),
            ..EngineConfig::default()
        };
        let chat = ChatEngine::load(&model_dir(), Device::Cpu, config).unwrap();
        assert_eq!(chat.engine().weight_stats().quantization.to_string(), mode);
        let (_, want) = greedy(&chat, &[user("Hello there")], 16);
        assert_eq!(got, format!("{}\n", want.text), "--quantization {mode}");
        chat.shutdown();
    }
    let (success, _, stderr) = run(
        &mut infer(&["--prompt", "hi", "--quantization", "int3"]),
        "",
    );
    assert!(!success);
    assert!(stderr.contains("unknown quantization `int3`"), "{stderr}");
}

#[test]
fn max_new_tokens_caps_the_answer() {
    let (out, _) = ok(
        &mut infer(&["--prompt", "Count to ten", "--max-new-tokens", "5"]).args(["-o", "json"]),
        "",
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let n = v["completion_tokens"].as_u64().unwrap();
    assert!((1..=5).contains(&n), "{v}");
    if n < 5 {
        assert_eq!(v["finish_reason"], "stop", "{v}");
    } else {
        assert_eq!(v["finish_reason"], "length", "{v}");
    }
    let chat = engine();
    let (_, want) = greedy(&chat, &[user("Count to ten")], 5);
    assert_eq!(v["content"], want.text.as_str());
    assert_eq!(
        v["prompt_tokens"].as_u64().unwrap() as usize,
        want.prompt_tokens
    );
    // Greedy: the 5-token answer starts the longer one.
    let (_, longer) = greedy(&chat, &[user("Count to ten")], 40);
    assert_eq!(&longer.tokens[..n as usize], &want.tokens[..]);
    chat.shutdown();
}

#[test]
fn streaming_prints_the_same_answer() {
    let args = ["--prompt", "Tell me a story", "--max-new-tokens", "32"];
    let (plain, _) = ok(&mut infer(&args), "");
    let (streamed, _) = ok(infer(&args).arg("--stream"), "");
    assert_eq!(plain, streamed);
    assert!(plain.len() > 1);
}

#[test]
fn enable_thinking_false_renders_the_empty_think_block() {
    let (_, stderr) = ok(
        &mut infer(&[
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
            "--enable-thinking",
            "false",
            "--show-prompt",
        ]),
        "",
    );
    assert!(
        stderr.contains("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        "{stderr}"
    );
}

#[test]
fn piped_chat_keeps_history_until_clear() {
    let (stdout, stderr) = ok(
        &mut infer(&["--max-new-tokens", "8", "--show-prompt"]),
        "Hello there\nWhat next?\n\nclear\nHello there\nexit\nnever asked\n",
    );
    let chat = engine();
    let (p1, a1) = greedy(&chat, &[user("Hello there")], 8);
    let history = [
        user("Hello there"),
        ChatMessage::text("assistant", a1.text.clone()),
        user("What next?"),
    ];
    let (p2, a2) = greedy(&chat, &history, 8);
    chat.shutdown();
    // Turn 3 follows `clear`: the first conversation again.
    assert_eq!(stdout, format!("{}\n{}\n{}\n", a1.text, a2.text, a1.text));
    // The second rendered prompt is the whole conversation (it contains the first prompt), the third is not.
    assert!(p2.starts_with(&p1) && p2.len() > p1.len());
    let shown: Vec<&str> = stderr.split("[prompt: ").skip(1).collect();
    assert_eq!(shown.len(), 3, "{stderr}");
    assert!(shown[1].contains(&p2), "{stderr}");
    assert!(
        shown[2].contains(&p1) && !shown[2].contains("What next?"),
        "{stderr}"
    );
    assert!(stderr.contains("(history cleared)"));
    assert!(!stderr.contains("never asked"));
}

#[test]
fn end_of_input_ends_the_chat() {
    let (stdout, _) = ok(&mut infer(&["--max-new-tokens", "4"]), "Hi\n");
    let chat = engine();
    let (_, want) = greedy(&chat, &[user("Hi")], 4);
    chat.shutdown();
    assert_eq!(stdout, format!("{}\n", want.text));
    let (stdout, _) = ok(&mut infer(&[]), "");
    assert_eq!(stdout, "");
}

fn write_jsonl(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

#[test]
fn batch_writes_one_line_per_row_in_order_and_equals_one_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = [
        json!({"messages": [{"role": "user", "content": "Hello there"}], "id": "a"}),
        json!({"messages": [{"role": "user", "content": "Tell me a long story about a cat and a dog who met"},
                            {"role": "assistant", "content": "Once upon a time"}]}),
        json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]}),
        json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                            {"role": "user", "content": "z"}, {"role": "assistant", "content": "label z"}]}),
        json!({"messages": [{"role": "user", "content": "Count to ten"}]}),
    ];
    let mut lines: Vec<String> = rows.iter().map(Value::to_string).collect();
    lines.insert(2, String::new()); // blank lines are skipped
    let data = write_jsonl(tmp.path(), "val.jsonl", &lines);
    let run_batch = |out: &Path, batch: &str| {
        ok(
            &mut infer(&[
                "--val-dataset",
                data.to_str().unwrap(),
                "--result-path",
                out.to_str().unwrap(),
                "--max-new-tokens",
                "16",
                "--max-batch-size",
                batch,
            ]),
            "",
        );
        std::fs::read_to_string(out).unwrap()
    };
    let text = run_batch(&tmp.path().join("out.jsonl"), "8");
    // A window of 2 (rows finish out of order, results still come in input order) gives the same file.
    assert_eq!(text, run_batch(&tmp.path().join("out2.jsonl"), "2"));
    let out: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), rows.len());

    let chat = engine();
    for (row, got) in rows.iter().zip(&out) {
        let mut input = row["messages"].as_array().unwrap().clone();
        let label = (input.last().unwrap()["role"] == "assistant")
            .then(|| input.pop().unwrap()["content"].clone());
        assert_eq!(got.get("labels"), label.as_ref(), "{got}");
        assert_eq!(got.get("id"), row.get("id"));
        let messages = got["messages"].as_array().unwrap();
        assert_eq!(&messages[..input.len()], &input[..], "{got}");
        assert_eq!(messages.len(), input.len() + 1);
        let answer = &messages[input.len()];
        assert_eq!(answer["role"], "assistant");
        let parsed: Vec<ChatMessage> = input
            .iter()
            .map(|m| serde_json::from_value(m.clone()).unwrap())
            .collect();
        let (_, want) = greedy(&chat, &parsed, 16);
        assert_eq!(answer["content"], want.text.as_str(), "{got}");
    }
    chat.shutdown();

    // Greedy batch output = one `--prompt` run per row.
    let (single, _) = ok(
        &mut infer(&["--prompt", "Hello there", "--max-new-tokens", "16"]),
        "",
    );
    assert_eq!(
        single,
        format!("{}\n", out[0]["messages"][1]["content"].as_str().unwrap())
    );
    let (single, _) = ok(
        &mut infer(&[
            "--prompt",
            "Why?",
            "--system",
            "Be brief.",
            "--max-new-tokens",
            "16",
        ]),
        "",
    );
    assert_eq!(
        single,
        format!("{}\n", out[2]["messages"][2]["content"].as_str().unwrap())
    );
}

#[test]
fn a_bad_batch_line_fails_before_generation_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let good = json!({"messages": [{"role": "user", "content": "Hello"}]}).to_string();
    let out = tmp.path().join("out.jsonl");
    for (bad, why) in [
        ("{\"messages\": [", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("{\"prompt\": \"hi\"}", "`messages` must be a list"),
        (
            "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}",
            "messages[0]: unknown message role `bot`",
        ),
        (
            "{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}",
            "no messages before the assistant turn",
        ),
    ] {
        let data = write_jsonl(
            tmp.path(),
            "val.jsonl",
            &[good.clone(), String::new(), bad.to_string()],
        );
        let (success, _, stderr) = run(
            &mut infer(&[
                "--val-dataset",
                data.to_str().unwrap(),
                "--result-path",
                out.to_str().unwrap(),
            ]),
            "",
        );
        assert!(!success);
        let at = format!("{}:3: ", data.display());
        assert!(
            stderr.contains(&at) && stderr.contains(why),
            "want `{at}…{why}` in:\n{stderr}"
        );
        assert!(
            !out.exists(),
            "nothing is generated or written before every line is checked"
        );
    }
}

#[test]
fn bad_models_and_flags_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cmd = |model: &Path, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qctl"));
        c.arg("infer")
            .arg("--model")
            .arg(model)
            .args(["--prompt", "hi"])
            .args(extra);
        run(&mut c, "")
    };
    // No config.json.
    let (success, _, stderr) = cmd(tmp.path(), &[]);
    assert!(!success);
    assert!(
        stderr.contains("no config.json") && stderr.contains(&tmp.path().display().to_string()),
        "{stderr}"
    );

    // A model without a chat template.
    let plain = tmp.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(model_dir().join(f), plain.join(f)).unwrap();
    }
    std::fs::write(
        plain.join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    let (success, _, stderr) = cmd(&plain, &[]);
    assert!(!success);
    assert!(
        stderr.contains("no chat template") && stderr.contains("plain"),
        "{stderr}"
    );

    // Flags.
    let (success, _, stderr) = cmd(&model_dir(), &["--top-p", "2"]);
    assert!(!success);
    assert!(stderr.contains("--top-p must be in (0, 1]"), "{stderr}");
    let (success, _, stderr) = cmd(&model_dir(), &["--device", "tpu"]);
    assert!(!success);
    assert!(stderr.contains("--device tpu"), "{stderr}");
    // `--device cuda` runs on a GPU, or says why there is none.
    let (success, _, stderr) = cmd(&model_dir(), &["--device", "cuda"]);
    assert!(success || stderr.contains("cuda:0"), "{stderr}");
    let (success, _, stderr) = cmd(&model_dir(), &["--adapters", tmp.path().to_str().unwrap()]);
    assert!(!success);
    assert!(
        stderr.contains("--adapters") && stderr.contains("no adapter_config.json"),
        "{stderr}"
    );
}

#[test]
fn lora_adapters_are_merged_at_load_time() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model_dir();
    let config = ModelConfig::from_file(base.join("config.json")).unwrap();
    let lora_config = LoraConfig::new(4, 8.0);
    let mut adapters = LoraAdapters::init(&config, &lora_config, 7).unwrap();
    // Fresh adapters have B = 0 and change nothing: make them matter.
    for (i, pair) in adapters.pairs.values_mut().enumerate() {
        for (j, x) in pair.b.data.iter_mut().enumerate() {
            *x = (((i * 31 + j * 17) % 13) as f32 - 6.0) * 0.05;
        }
    }
    let checkpoint = tmp.path().join("checkpoint-10");
    lora::save_adapters(&checkpoint, &lora_config, &adapters, &base).unwrap();
    let merged = tmp.path().join("merged");
    lora::merge_to_dir(&base, &checkpoint, &merged).unwrap();

    let answer = |model: &Path, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qctl"));
        c.arg("infer")
            .arg("--model")
            .arg(model)
            .args(["--prompt", "Hello there", "--max-new-tokens", "24"])
            .args(extra);
        ok(&mut c, "").0
    };
    let from_checkpoint = answer(&checkpoint, &[]);
    let explicit = answer(&base, &["--adapters", checkpoint.to_str().unwrap()]);
    let from_merged_dir = answer(&merged, &[]);
    assert_eq!(from_checkpoint, from_merged_dir);
    assert_eq!(explicit, from_merged_dir);
    assert_ne!(
        from_checkpoint,
        answer(&base, &[]),
        "the adapters change the answer"
    );
}
