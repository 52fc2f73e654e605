//! Pretraining data: text lines through a real `tokenizer.json` (+ EOS), `input_ids` lines, and errors that
//! name the file and line.

use std::path::{Path, PathBuf};

use qparallel::data::{DataError, LoadOptions, PretrainDataset, TextCodec};
use qparallel::train::{ModelSource, NoProgress, TrainConfig, run_training};

/// A word-level tokenizer in HF `tokenizers` JSON: whitespace pre-tokenizer, ids 0 = `<eos>` (special),
/// 1 = `<unk>`, then the words.
fn write_tokenizer(dir: &Path, words: &[&str]) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<eos>".into(), 0.into());
    vocab.insert("<unk>".into(), 1.into());
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.to_string(), (i + 2).into());
    }
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<eos>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<eos>"}"#,
    )
    .unwrap();
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn text_and_ids_lines_become_one_stream_cut_into_sequences() {
    let tmp = tempfile::tempdir().unwrap();
    write_tokenizer(tmp.path(), &["the", "cat", "sat", "on", "mat"]);
    let tok = TextCodec::from_dir(tmp.path()).unwrap();
    assert_eq!(tok.eos_id(), Some(0));
    assert_eq!(tok.encode("the cat sat").unwrap(), vec![2, 3, 4]);
    let a = write(
        tmp.path(),
        "a.jsonl",
        "{\"text\": \"the cat sat\"}\n\n{\"input_ids\": [9, 8, 7, 6]}\n{\"text\": \"on the dog\"}\n",
    );
    let b = write(tmp.path(), "b.jsonl", "{\"input_ids\": [5, 5]}\n");
    let ds = PretrainDataset::load(
        &[a, b],
        &LoadOptions {
            max_length: 4,
            vocab_size: 16,
            tokenizer_dir: Some(tmp.path().to_path_buf()),
        },
    )
    .unwrap();
    // Stream: the cat sat <eos> | 9 8 7 6 | on the <unk> <eos> | 5 5  → 3 sequences, tail [5, 5] dropped.
    assert_eq!(ds.stream_tokens(), 14);
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.sequence(0), &[2, 3, 4, 0]);
    assert_eq!(ds.sequence(1), &[9, 8, 7, 6]);
    assert_eq!(ds.sequence(2), &[5, 2, 1, 0]);
}

#[test]
fn bad_lines_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        max_length: 2,
        vocab_size: 100,
        tokenizer_dir: None,
    };
    let good = "{\"input_ids\": [1, 2, 3]}\n";
    let cases: [(&str, usize, &str); 7] = [
        ("{\"input_ids\": [1, 2\n", 3, "not valid JSON"),
        ("[1, 2]\n", 3, "expected a JSON object"),
        ("{\"input_ids\": [1, 100]}\n", 3, "vocab_size 100"),
        ("{\"input_ids\": [1, -4]}\n", 3, "input_ids[1]"),
        ("{\"messages\": []}\n", 3, "`text` or an `input_ids`"),
        ("{\"text\": \"x\", \"input_ids\": [1]}\n", 3, "both"),
        ("{\"text\": \"hello\"}\n", 3, "tokenizer"),
    ];
    for (i, (bad, line, what)) in cases.iter().enumerate() {
        let path = write(
            tmp.path(),
            &format!("bad{i}.jsonl"),
            &format!("{good}\n{bad}{good}"),
        );
        let err = PretrainDataset::load(std::slice::from_ref(&path), &opts).unwrap_err();
        let msg = err.to_string();
        println!("{msg}");
        assert!(
            matches!(&err, DataError::Line { line: l, path: p, .. } if l == line && p == &path),
            "{bad}: {err:?}"
        );
        assert!(
            msg.starts_with(&format!("{}:{line}: ", path.display())),
            "{msg}"
        );
        assert!(msg.contains(what), "{msg}");
    }
    let missing = tmp.path().join("missing.jsonl");
    let msg = PretrainDataset::load(&[missing], &opts)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing.jsonl"), "{msg}");
    let short = write(tmp.path(), "short.jsonl", "{\"input_ids\": [1]}\n");
    assert!(matches!(
        PretrainDataset::load(&[short], &opts),
        Err(DataError::TooSmall {
            tokens: 1,
            max_length: 2
        })
    ));
}

#[test]
fn training_on_text_with_the_models_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    // A model dir with only config.json + tokenizer: `init: random` reads the tokenizer next to the config.
    let model_dir = tmp.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/qwen3-tiny.json"),
        model_dir.join("config.json"),
    )
    .unwrap();
    let words = ["a", "b", "c", "d", "e", "f", "g", "h"];
    write_tokenizer(&model_dir, &words);
    let mut text = String::new();
    for i in 0..40 {
        let line: Vec<&str> = (0..12).map(|j| words[(i + j) % words.len()]).collect();
        text.push_str(&format!("{{\"text\": \"{}\"}}\n", line.join(" ")));
    }
    let corpus = write(tmp.path(), "text.jsonl", &text);
    let mut cfg = TrainConfig::new(
        ModelSource::Random {
            config: model_dir.join("config.json"),
        },
        vec![corpus],
        tmp.path().join("out"),
        6,
    );
    cfg.max_length = 16;
    cfg.micro_batch_size = 2;
    cfg.lr = 1e-2;
    let summary = run_training(&cfg, &mut NoProgress).unwrap();
    assert_eq!(summary.losses.len(), 6);
    let ck = tmp.path().join("out/checkpoint-6");
    // The checkpoint is a complete HF dir: config (from the random-init config) and the tokenizer files.
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(ck.join(f).is_file(), "{f}");
    }
    let (first, last) = (summary.losses[0].1, summary.losses[5].1);
    assert!(last < first, "{first} → {last}");
}

/// The byte-level BPE tokenizer fixture (Qwen3-style pre-tokenizer regex, made by
/// tests/fixtures/tokenizer/make_tokenizer.py) gives transformers' ids through our pure-Rust-regex build.
#[test]
fn qwen_style_tokenizer_matches_transformers_ids() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let tok = TextCodec::from_dir(&dir).unwrap();
    let cases = golden["encode"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
    }
    println!("eos id {:?}", tok.eos_id());
}
