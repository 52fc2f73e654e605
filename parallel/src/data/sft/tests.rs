//! SFT data tests on the tiny Qwen3-style tokenizer and Qwen3's chat template
//! (`configs/models/qwen3-tiny-chat`).

use std::path::{Path, PathBuf};

use qtext::TextCodec;

use super::*;
use crate::data::{DataCursor, DataLoader};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/qwen3-tiny-chat")
}

fn codec() -> TextCodec {
    TextCodec::from_dir(model_dir()).unwrap()
}

const VOCAB: usize = 384;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load_with(
    entries: &[PathBuf],
    sft: &SftOptions,
    max_length: usize,
    seed: u64,
) -> Result<(SftDataset, SftReport)> {
    SftDataset::load(
        entries,
        &codec(),
        &SftLoadOptions {
            sft,
            max_length,
            vocab_size: VOCAB,
            seed,
        },
    )
}

fn qa(q: &str, a: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        .to_string()
}

/// The user query of every sample, in dataset order.
fn queries(codec: &TextCodec, ds: &SftDataset) -> Vec<String> {
    ds.samples()
        .iter()
        .map(|s| {
            let text = codec.decode(&s.input_ids, false).unwrap();
            let start = text.find("<|im_start|>user\n").unwrap() + "<|im_start|>user\n".len();
            text[start..start + text[start..].find("<|im_end|>").unwrap()].to_string()
        })
        .collect()
}

/// The trained targets grouped into maximal runs of consecutive positions, each decoded.
fn trained_runs(codec: &TextCodec, s: &SftSample) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev_trained = false;
    for t in 0..s.len() {
        let w = s.loss_weights[t];
        if w > 0.0 {
            assert_eq!(w, 1.0);
            if !prev_trained {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(s.input_ids[t + 1]);
        }
        prev_trained = w > 0.0;
    }
    runs.iter()
        .map(|r| codec.decode(r, false).unwrap())
        .collect()
}

fn multi_turn() -> Conversation {
    let v: qtext::Value = serde_json::from_str(
        r#"{"messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "你是谁？"},
            {"role": "assistant", "content": "我是一个助手。"}
        ]}"#,
    )
    .unwrap();
    Conversation::from_value(&v).unwrap()
}

#[test]
fn every_loss_scale_trains_exactly_its_tokens() {
    let codec = codec();
    let conv = multi_turn();
    let think = "<think>\n\n</think>\n\n";
    let r = render_sample(&codec, &conv, LossScale::default()).unwrap();
    // Qwen3's template drops nothing here but adds an empty think block to the last turn; the final "\n" is cut.
    assert_eq!(
        r.text,
        format!(
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
             <|im_start|>assistant\nHello, how can I help?<|im_end|>\n<|im_start|>user\n你是谁？<|im_end|>\n\
             <|im_start|>assistant\n{think}我是一个助手。<|im_end|>"
        )
    );
    assert_eq!(r.sample.input_ids, codec.encode(&r.text).unwrap());
    assert_eq!(*r.sample.loss_weights.last().unwrap(), 0.0);
    let cases: [(&str, Vec<String>); 6] = [
        (
            "default",
            vec![
                "Hello, how can I help?<|im_end|>".into(),
                format!("{think}我是一个助手。<|im_end|>"),
            ],
        ),
        (
            "last_round",
            vec![format!("{think}我是一个助手。<|im_end|>")],
        ),
        (
            "ignore_empty_think",
            vec![
                "Hello, how can I help?<|im_end|>".into(),
                "我是一个助手。<|im_end|>".into(),
            ],
        ),
        (
            "default+ignore_empty_think",
            vec![
                "Hello, how can I help?<|im_end|>".into(),
                "我是一个助手。<|im_end|>".into(),
            ],
        ),
        (
            "last_round+ignore_empty_think",
            vec!["我是一个助手。<|im_end|>".into()],
        ),
        // Every token but the first (nothing predicts it).
        (
            "all",
            vec![codec.decode(&r.sample.input_ids[1..], false).unwrap()],
        ),
    ];
    for (scale, want) in cases {
        let ls: LossScale = scale.parse().unwrap();
        let s = render_sample(&codec, &conv, ls).unwrap().sample;
        assert_eq!(trained_runs(&codec, &s), want, "loss_scale {scale}");
    }
    // all+ignore_empty_think: everything except the empty think block.
    let s = render_sample(&codec, &conv, "all + ignore_empty_think".parse().unwrap())
        .unwrap()
        .sample;
    let runs = trained_runs(&codec, &s);
    assert_eq!(runs.len(), 2);
    assert!(runs[0].ends_with("<|im_start|>assistant\n"), "{runs:?}");
    assert_eq!(runs[1], "我是一个助手。<|im_end|>");
}

#[test]
fn loss_scale_parsing_names_the_bad_value() {
    assert_eq!(
        "last_round+ignore_empty_think"
            .parse::<LossScale>()
            .unwrap(),
        LossScale {
            base: LossScaleBase::LastRound,
            ignore_empty_think: true
        }
    );
    assert_eq!(
        "ignore_empty_think"
            .parse::<LossScale>()
            .unwrap()
            .to_string(),
        "default+ignore_empty_think"
    );
    for bad in ["react", "default+last_round", "last_round+foo", ""] {
        let e = bad.parse::<LossScale>().unwrap_err().to_string();
        assert!(e.contains("loss_scale"), "{e}");
        assert!(e.contains(&format!("{bad:?}")) || bad.is_empty(), "{e}");
    }
    assert!(
        "last_round+foo"
            .parse::<LossScale>()
            .unwrap_err()
            .to_string()
            .contains("\"foo\"")
    );
    assert_eq!("left".parse::<Truncation>().unwrap(), Truncation::Left);
    assert!(
        "middle"
            .parse::<Truncation>()
            .unwrap_err()
            .to_string()
            .contains("\"middle\"")
    );
}

#[test]
fn thinking_and_tool_calls_are_trained_as_rendered() {
    let codec = codec();
    let v: qtext::Value = serde_json::from_str(
        r#"{"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "<think>\nIt said sunny.\n</think>\n\nIt is sunny."}
        ]}"#,
    )
    .unwrap();
    let conv = Conversation::from_value(&v).unwrap();
    let r = render_sample(&codec, &conv, "ignore_empty_think".parse().unwrap()).unwrap();
    assert!(r.text.contains("# Tools"), "{}", r.text);
    assert_eq!(
        trained_runs(&codec, &r.sample),
        vec![
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>"
                .to_string(),
            // A non-empty think block is trained even with ignore_empty_think.
            "<think>\nIt said sunny.\n</think>\n\nIt is sunny.<|im_end|>".to_string(),
        ]
    );

    // ms-swift's agent roles map onto the same conversation.
    let swift: qtext::Value = serde_json::from_str(
        r#"{"tools": "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\"}}}]",
            "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "tool_call", "content": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
            {"role": "tool_response", "content": "sunny"},
            {"role": "assistant", "content": "<think>\nIt said sunny.\n</think>\n\nIt is sunny."}
        ]}"#,
    )
    .unwrap();
    let r2 = render_sample(
        &codec,
        &Conversation::from_value(&swift).unwrap(),
        LossScale::default(),
    )
    .unwrap();
    assert_eq!(r2.text, r.text);
}

#[test]
fn each_format_parses_to_the_same_conversations() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = write(
        tmp.path(),
        "a.jsonl",
        &format!(
            "{}\n\n{}\n{}\n",
            qa("What is 2 + 3?", "5."),
            r#"{"system": "Be brief.", "query": "Name a color.", "response": "Red.", "history": [["Hi", "Hello!"]]}"#,
            r#"{"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Red."}]}"#,
        ),
    );
    let json = write(
        tmp.path(),
        "b.json",
        &format!(
            "[\n  {},\n  {}\n]\n",
            qa("What is 2 + 3?", "5."),
            qa("Say \\\"hi\\\", then ]", "hi ]")
        ),
    );
    let csv = write(
        tmp.path(),
        "c.csv",
        "query,response,system,extra\n\
         What is 2 + 3?,5.,,x\n\
         \"Multi\nline, with \"\"quotes\"\"\",\"Ok, \"\"sure\"\".\",Be brief.,y\n\
         \n\
         ",
    );
    let csv_messages = write(
        tmp.path(),
        "d.csv",
        &format!(
            "messages\n\"{}\"\n",
            serde_json::json!([{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}])
                .to_string()
                .replace('"', "\"\"")
        ),
    );
    let rows = |p: &Path| -> Vec<(usize, Conversation)> {
        formats::read_rows(p)
            .unwrap()
            .into_iter()
            .map(|r| (r.line, r.conv.unwrap()))
            .collect()
    };
    let a = rows(&jsonl);
    assert_eq!(a.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 3, 4]);
    // The query/response shortcut equals the messages form with a top-level system.
    assert_eq!(a[1].1, a[2].1);
    assert_eq!(a[1].1.messages.len(), 5);
    assert_eq!(a[1].1.role(0).as_deref(), Some("system"));
    let b = rows(&json);
    assert_eq!(b.iter().map(|r| r.0).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(b[0].1, a[0].1);
    let c = rows(&csv);
    assert_eq!(c.iter().map(|r| r.0).collect::<Vec<_>>(), vec![2, 3]);
    let d = rows(&csv_messages);
    let codec = codec();
    let text = |c: &Conversation| {
        codec
            .apply_chat_template(&c.messages, None, false, &[])
            .unwrap()
    };
    for conv in [&b[0].1, &c[0].1, &d[0].1] {
        assert_eq!(text(conv), text(&a[0].1));
    }
    let t = text(&c[1].1);
    assert!(t.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nMulti\nline, with \"quotes\"<|im_end|>"), "{t}");
    assert!(t.contains("Ok, \"sure\"."), "{t}");
    assert!(
        b[1].1.messages[0]
            .get_attr("content")
            .unwrap()
            .as_str()
            .unwrap()
            .ends_with("then ]")
    );
    // A .json file that is not an array is read as JSON Lines.
    let jl = write(
        tmp.path(),
        "e.json",
        &format!("{}\n{}\n", qa("a", "b"), qa("c", "d")),
    );
    assert_eq!(rows(&jl).len(), 2);
    let txt = write(tmp.path(), "f.txt", "x");
    assert!(
        formats::read_rows(&txt)
            .unwrap_err()
            .to_string()
            .contains("unknown format")
    );
}

#[test]
fn strict_errors_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let good = qa("What is 2 + 3?", "5.");
    let cases: [(&str, &str); 8] = [
        ("{\"messages\": [", "not valid JSON"),
        (
            r#"{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
            "unknown role \"robot\"",
        ),
        (r#"{"messages": []}"#, "no messages"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}]}"#,
            "no assistant",
        ),
        (
            r#"{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}"#,
            "must be a string",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x<|im_end|>"}, {"role": "assistant", "content": "y"}]}"#,
            "control token",
        ),
        (r#"{"text": "pretraining"}"#, "expected `messages`"),
        (r#"{"query": "q"}"#, "`response` is missing"),
    ];
    let strict = SftOptions {
        strict: true,
        ..SftOptions::default()
    };
    for (i, (bad, what)) in cases.iter().enumerate() {
        let p = write(
            tmp.path(),
            &format!("bad{i}.jsonl"),
            &format!("{good}\n\n{bad}\n{good}\n"),
        );
        let err = load_with(std::slice::from_ref(&p), &strict, 512, 1).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, DataError::Line { line: 3, path, .. } if path == &p),
            "{bad}: {err:?}"
        );
        assert!(msg.starts_with(&format!("{}:3: ", p.display())), "{msg}");
        assert!(msg.contains(what), "{msg}");
    }
    // JSON arrays name the line an element starts on, CSV the line a record starts on.
    let p = write(
        tmp.path(),
        "bad.json",
        &format!("[\n{good},\n{{\"messages\":\n 7}}\n]"),
    );
    let msg = load_with(std::slice::from_ref(&p), &strict, 512, 1)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!("{}:3: ", p.display())) && msg.contains("must be a list"),
        "{msg}"
    );
    let p = write(tmp.path(), "open.json", &format!("[\n{good},\n"));
    let msg = load_with(std::slice::from_ref(&p), &SftOptions::default(), 512, 1)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not closed"), "{msg}");
    let p = write(tmp.path(), "bad.csv", "query,response\n\"a\nb\",c\nd,e,f\n");
    let msg = load_with(std::slice::from_ref(&p), &strict, 512, 1)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!("{}:4: ", p.display())) && msg.contains("3 fields"),
        "{msg}"
    );
    let p = write(tmp.path(), "nohead.csv", "question,answer\na,b\n");
    let msg = load_with(std::slice::from_ref(&p), &strict, 512, 1)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!("{}:1: ", p.display())) && msg.contains("header"),
        "{msg}"
    );
}

#[test]
fn lenient_mode_skips_and_counts_bad_rows_per_file() {
    let tmp = tempfile::tempdir().unwrap();
    let good = qa("What is 2 + 3?", "5.");
    let a = write(
        tmp.path(),
        "a.jsonl",
        &format!(
            "{good}\nnot json\n{good}\n{{\"messages\": []}}\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"x\"}}]}}\n"
        ),
    );
    let b = write(tmp.path(), "b.csv", "query,response\nq1,r1\nq2\n");
    let (ds, report) = load_with(&[a.clone(), b.clone()], &SftOptions::default(), 512, 1).unwrap();
    assert_eq!(ds.samples().len(), 3);
    assert_eq!(report.samples, 3);
    assert_eq!(report.skipped(), 4);
    let (ra, rb) = (&report.sources[0], &report.sources[1]);
    assert_eq!((ra.rows, ra.skipped, ra.sampled), (5, 3, 2));
    assert_eq!(
        ra.skipped_examples.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![2, 4, 5]
    );
    assert_eq!((rb.rows, rb.skipped, rb.sampled), (2, 1, 1));
    assert_eq!(rb.skipped_examples[0].0, 3);
    let shown = report.to_string();
    assert!(
        shown.contains("4 rows skipped") && shown.contains("line 2: not valid JSON"),
        "{shown}"
    );
    // Nothing usable at all is an error that carries the report.
    let bad = write(tmp.path(), "bad.jsonl", "nope\n");
    let msg = load_with(&[bad], &SftOptions::default(), 512, 1)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no SFT sample") && msg.contains("1 rows skipped"),
        "{msg}"
    );
}

#[test]
fn row_counts_follow_ms_swift() {
    assert_eq!(sample_indices(5, None, true, 1), vec![0, 1, 2, 3, 4]);
    // N < len: distinct rows, seeded.
    let a = sample_indices(10, Some(4), true, 1);
    let mut d = a.clone();
    d.sort();
    d.dedup();
    assert_eq!(d.len(), 4);
    assert_eq!(a, sample_indices(10, Some(4), true, 1));
    assert_ne!(a, sample_indices(10, Some(4), true, 2));
    assert_eq!(sample_indices(10, Some(4), false, 1), vec![0, 1, 2, 3]);
    // N > len: the whole set repeated, then distinct rows for the remainder.
    let b = sample_indices(3, Some(8), true, 1);
    assert_eq!(&b[..6], &[0, 1, 2, 0, 1, 2]);
    assert_eq!(b.len(), 8);
    assert_ne!(b[6], b[7]);
    assert_eq!(
        sample_indices(3, Some(8), false, 1),
        vec![0, 1, 2, 0, 1, 2, 0, 1]
    );
    assert_eq!(sample_indices(3, Some(3), true, 1), vec![0, 1, 2]);

    let r = DatasetRef::parse(Path::new("data/x.jsonl#20")).unwrap();
    assert_eq!(
        (r.source, r.count),
        (DatasetSource::File("data/x.jsonl".into()), Some(20))
    );
    let r = DatasetRef::parse(Path::new("swift/self-cognition#500")).unwrap();
    assert_eq!(
        (r.source, r.count),
        (DatasetSource::SelfCognition, Some(500))
    );
    assert_eq!(
        DatasetRef::parse(Path::new("self-cognition"))
            .unwrap()
            .count,
        None
    );
    assert!(DatasetRef::parse(Path::new("x.jsonl#0")).is_err());
    // An existing file whose name ends in #digits is that file.
    let tmp = tempfile::tempdir().unwrap();
    let odd = write(tmp.path(), "odd.jsonl#2", "");
    assert_eq!(DatasetRef::parse(&odd).unwrap().count, None);

    // Loading: file#N takes N rows, repeats included.
    let p = write(
        tmp.path(),
        "three.jsonl",
        &[qa("q0", "a"), qa("q1", "a"), qa("q2", "a")].join("\n"),
    );
    let entry = PathBuf::from(format!("{}#7", p.display()));
    let no_shuffle = SftOptions {
        shuffle: false,
        ..SftOptions::default()
    };
    let (ds, report) = load_with(&[entry], &no_shuffle, 512, 1).unwrap();
    assert_eq!(report.sources[0].sampled, 7);
    assert_eq!(
        queries(&codec(), &ds),
        vec!["q0", "q1", "q2", "q0", "q1", "q2", "q0"]
    );
}

#[test]
fn mixing_and_shuffling_are_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write(
        tmp.path(),
        "a.jsonl",
        &(0..6)
            .map(|i| qa(&format!("a{i}"), "x"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let b = write(
        tmp.path(),
        "b.json",
        &format!(
            "[{}]",
            (0..4)
                .map(|i| qa(&format!("b{i}"), "y"))
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    let codec = codec();
    let entries = [a, b];
    let ordered = SftOptions {
        shuffle: false,
        ..SftOptions::default()
    };
    let (ds, _) = load_with(&entries, &ordered, 512, 1).unwrap();
    let plain = queries(&codec, &ds);
    assert_eq!(
        plain,
        vec!["a0", "a1", "a2", "a3", "a4", "a5", "b0", "b1", "b2", "b3"]
    );
    let shuffled = |seed| {
        queries(
            &codec,
            &load_with(&entries, &SftOptions::default(), 512, seed)
                .unwrap()
                .0,
        )
    };
    let s1 = shuffled(7);
    assert_eq!(s1, shuffled(7));
    assert_ne!(s1, shuffled(8));
    assert_ne!(s1, plain);
    let mut sorted = s1.clone();
    sorted.sort();
    assert_eq!(sorted, plain);
}

#[test]
fn truncation_strategies() {
    let tmp = tempfile::tempdir().unwrap();
    let long_answer = "word ".repeat(40);
    let p = write(
        tmp.path(),
        "t.jsonl",
        &[qa("short", "ok"), qa("long question", &long_answer)].join("\n"),
    );
    let codec = codec();
    let full = render_sample(
        &codec,
        &Conversation::from_query(None, &[], "long question", &long_answer),
        LossScale::default(),
    )
    .unwrap()
    .sample;
    let short_len = render_sample(
        &codec,
        &Conversation::from_query(None, &[], "short", "ok"),
        LossScale::default(),
    )
    .unwrap()
    .sample
    .len();
    let max = 30;
    assert!(
        full.len() > max && short_len <= max,
        "{} {short_len}",
        full.len()
    );
    let opts = |truncation| SftOptions {
        truncation,
        shuffle: false,
        ..SftOptions::default()
    };

    let (ds, report) =
        load_with(std::slice::from_ref(&p), &opts(Truncation::Delete), max, 1).unwrap();
    assert_eq!(
        (
            ds.samples().len(),
            report.dropped_too_long,
            report.truncated
        ),
        (1, 1, 0)
    );

    let (ds, report) =
        load_with(std::slice::from_ref(&p), &opts(Truncation::Left), max, 1).unwrap();
    assert_eq!(
        (
            ds.samples().len(),
            report.dropped_too_long,
            report.truncated
        ),
        (2, 0, 1)
    );
    let left = &ds.samples()[1];
    assert_eq!(left.input_ids, full.input_ids[full.len() - max..]);
    assert_eq!(left.loss_weights, full.loss_weights[full.len() - max..]);

    let (ds, report) =
        load_with(std::slice::from_ref(&p), &opts(Truncation::Right), max, 1).unwrap();
    assert_eq!(report.truncated, 1);
    let right = &ds.samples()[1];
    assert_eq!(right.input_ids, full.input_ids[..max]);
    assert_eq!(right.loss_weights[..max - 1], full.loss_weights[..max - 1]);
    assert_eq!(right.loss_weights[max - 1], 0.0);

    // Cutting away every trained token drops the sample (counted).
    let long_only = write(tmp.path(), "long.jsonl", &qa("long question", &long_answer));
    let prompt_len = full.loss_weights.iter().position(|&w| w > 0.0).unwrap();
    let both = [long_only, p];
    let (ds, report) = load_with(&both, &opts(Truncation::Right), prompt_len, 1).unwrap();
    assert!(report.dropped_no_loss >= 1);
    assert!(
        ds.samples()
            .iter()
            .all(|s| s.len() <= prompt_len && s.has_loss())
    );
    let err = load_with(&both[..1], &opts(Truncation::Right), prompt_len, 1).unwrap_err();
    assert!(
        err.to_string()
            .contains("1 dropped without a trained token"),
        "{err}"
    );
}

#[test]
fn self_cognition_has_distinct_bilingual_pairs_and_fills_them() {
    let rows: Vec<serde_json::Value> = source::SELF_COGNITION_JSONL
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut pairs: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["query"].as_str().unwrap().into(),
                r["response"].as_str().unwrap().into(),
            )
        })
        .collect();
    pairs.sort();
    pairs.dedup();
    assert!(pairs.len() >= 100, "{} distinct pairs", pairs.len());
    assert_eq!(pairs.len(), rows.len());
    let zh = rows.iter().filter(|r| r["tag"] == "zh").count();
    let en = rows.iter().filter(|r| r["tag"] == "en").count();
    assert_eq!(zh + en, rows.len());
    assert!(zh.abs_diff(en) <= rows.len() / 5, "{zh} zh, {en} en");
    for r in &rows {
        let resp = r["response"].as_str().unwrap();
        assert!(
            resp.contains("{{NAME}}") && resp.contains("{{AUTHOR}}"),
            "{resp}"
        );
    }
    let qs: Vec<&str> = rows.iter().map(|r| r["query"].as_str().unwrap()).collect();
    assert!(qs.contains(&"你是谁？") && qs.contains(&"who are you?"));

    let name = ("小黄".to_string(), "Xiao Huang".to_string());
    let author = ("魔搭".to_string(), "ModelScope".to_string());
    let convs = self_cognition(&name, &author);
    assert_eq!(convs.len(), rows.len());
    let content = |c: &Conversation, i: usize| {
        c.messages[i]
            .get_attr("content")
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    };
    for (tag, c) in &convs {
        let (r, q) = (content(c, 1), content(c, 0));
        assert!(!r.contains("{{") && !q.contains("{{"), "{r}");
        if tag == "zh" {
            assert!(
                r.contains("小黄") && r.contains("魔搭") && !r.contains("ModelScope"),
                "{r}"
            );
        } else {
            assert!(
                r.contains("Xiao Huang") && r.contains("ModelScope") && !r.contains("魔搭"),
                "{r}"
            );
        }
    }
    let who = convs
        .iter()
        .find(|(_, c)| content(c, 0) == "你是谁？")
        .unwrap();
    assert!(content(&who.1, 1).starts_with("我是小黄"));

    // Loading needs the names; #N follows the usual sampling.
    let sft = SftOptions {
        model_name: Some(name),
        model_author: Some(author),
        ..SftOptions::default()
    };
    let (ds, report) =
        load_with(&[PathBuf::from("swift/self-cognition#250")], &sft, 512, 3).unwrap();
    assert_eq!(
        (ds.samples().len(), report.sources[0].rows),
        (250, rows.len())
    );
    assert_eq!(report.sources[0].entry, "self-cognition#250");
    let err = load_with(
        &[PathBuf::from("self-cognition")],
        &SftOptions::default(),
        512,
        3,
    )
    .unwrap_err();
    assert!(err.to_string().contains("model_name"), "{err}");
}

fn sample(len: usize, seed: u32) -> SftSample {
    SftSample {
        input_ids: (0..len as u32).map(|i| (i * 7 + seed) % 300).collect(),
        loss_weights: (0..len)
            .map(|i| if i + 1 < len && i % 3 != 0 { 1.0 } else { 0.0 })
            .collect(),
    }
}

#[test]
fn first_fit_decreasing_packs_deterministically() {
    let lengths = [5, 9, 3, 7, 2, 8, 4, 1];
    let rows = pack::first_fit_decreasing(&lengths, 10);
    // Longest first, each into the first row with room:
    // 9→r0, 8→r1, 7→r2, 5→r3, 4→r3 (9), 3→r2 (10), 2→r1 (10), 1→r0 (10).
    assert_eq!(rows, vec![vec![1, 7], vec![5, 4], vec![3, 2], vec![0, 6]]);
    for r in &rows {
        assert!(r.iter().map(|&i| lengths[i as usize]).sum::<usize>() <= 10);
    }
    let mut all: Vec<u32> = rows.concat();
    all.sort();
    assert_eq!(all, (0..8).collect::<Vec<u32>>());
    assert_eq!(pack::first_fit_decreasing(&lengths, 10), rows);
}

#[test]
fn packed_rows_restart_positions_and_isolate_samples() {
    let samples = vec![sample(4, 1), sample(3, 2), sample(6, 3)];
    let ds = SftDataset::from_samples(samples.clone(), 8, 350, true, false).unwrap();
    // 6 | 4+3 (FFD): two rows.
    assert_eq!(ds.packed_rows().unwrap(), &[vec![2], vec![0, 1]]);
    let b = ds.batch(&[1, 0]);
    assert_eq!((b.batch, b.seq), (2, 8));
    let s = &samples;
    assert_eq!(
        &b.input_ids[..8],
        &[s[0].input_ids.clone(), s[1].input_ids.clone(), vec![350]].concat()[..]
    );
    assert_eq!(&b.position_ids[..8], &[0, 1, 2, 3, 0, 1, 2, 0]);
    assert_eq!(
        &b.segment_ids.as_ref().unwrap()[..8],
        &[0, 0, 0, 0, 1, 1, 1, 2]
    );
    assert_eq!(&b.position_ids[8..], &[0, 1, 2, 3, 4, 5, 0, 1]);
    assert_eq!(
        &b.segment_ids.as_ref().unwrap()[8..],
        &[0, 0, 0, 0, 0, 0, 1, 1]
    );
    // Targets never cross a sample; each sample's last position and the padding have weight 0.
    assert_eq!(&b.targets[..3], &s[0].input_ids[1..]);
    assert_eq!(
        &b.loss_weights[..8],
        &[
            s[0].loss_weights.clone(),
            s[1].loss_weights.clone(),
            vec![0.0]
        ]
        .concat()[..]
    );
    assert_eq!(b.loss_weights[3], 0.0);
    b.validate(VOCAB).unwrap();

    // Unpacked: right-padded to the longest sample of the micro-batch.
    let ds = SftDataset::from_samples(samples.clone(), 8, 350, false, false).unwrap();
    let b = ds.batch(&[0, 2]);
    assert_eq!((b.batch, b.seq), (2, 6));
    assert_eq!(
        &b.input_ids[..6],
        &[s[0].input_ids.clone(), vec![350, 350]].concat()[..]
    );
    assert_eq!(
        &b.loss_weights[..6],
        &[s[0].loss_weights.clone(), vec![0.0, 0.0]].concat()[..]
    );
    assert_eq!(&b.input_ids[6..], &s[2].input_ids[..]);
    assert!(b.segment_ids.is_none());
    assert!(SftDataset::from_samples(vec![sample(9, 0)], 8, 0, true, true).is_err());
}

#[test]
fn sft_loader_resumes_from_a_cursor() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "a.jsonl",
        &(0..7)
            .map(|i| qa(&format!("question {i}"), &"a ".repeat(i + 1)))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    for packing in [false, true] {
        let sft = SftOptions {
            packing,
            ..SftOptions::default()
        };
        let build = || load_with(std::slice::from_ref(&p), &sft, 64, 5).unwrap().0;
        let mut full = DataLoader::new(build(), 5, DataCursor::default()).unwrap();
        let batches: Vec<_> = (0..6).map(|_| full.next_batch(2)).collect();
        let mut part = DataLoader::new(build(), 5, DataCursor::default()).unwrap();
        for _ in 0..3 {
            part.next_batch(2);
        }
        let mut resumed = DataLoader::new(build(), 5, part.cursor()).unwrap();
        let rest: Vec<_> = (3..6).map(|_| resumed.next_batch(2)).collect();
        assert_eq!(rest, batches[3..].to_vec(), "packing {packing}");
        if packing {
            assert!(
                batches
                    .iter()
                    .all(|b| b.seq == 64 && b.segment_ids.is_some())
            );
        }
    }
}
