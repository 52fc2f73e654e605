//! Tokenizer and chat-template parity with transformers: tests/fixtures/tokenizer/golden.json holds the ids and
//! renderings `make_tokenizer.py` computed with `AutoTokenizer` / `apply_chat_template`.

use std::path::PathBuf;

use qserve::text::TextCodec;
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer")
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("golden.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn encode_and_decode_match_transformers() {
    let codec = TextCodec::from_dir(dir()).unwrap();
    let g = golden();
    assert_eq!(codec.vocab_size() as u64, g["vocab_size"].as_u64().unwrap());
    for case in g["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(codec.encode(text).unwrap(), want, "encode {text:?}");
        assert_eq!(
            codec.decode(&want, false).unwrap(),
            case["decoded"].as_str().unwrap()
        );
        assert_eq!(
            codec.decode(&want, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap()
        );
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    let codec = TextCodec::from_dir(dir()).unwrap();
    assert!(codec.has_chat_template());
    // Parse the raw file so maps keep their key order, as they do in a request body.
    #[derive(serde::Deserialize)]
    struct Conv {
        messages: Vec<minijinja::Value>,
        tools: Option<minijinja::Value>,
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
        text: String,
        ids: Vec<u32>,
    }
    #[derive(serde::Deserialize)]
    struct Golden {
        chat: Vec<Conv>,
    }
    let g: Golden =
        serde_json::from_str(&std::fs::read_to_string(dir().join("golden.json")).unwrap()).unwrap();
    assert!(g.chat.len() >= 5);
    for (i, conv) in g.chat.iter().enumerate() {
        let kwargs: Vec<(String, minijinja::Value)> = conv
            .enable_thinking
            .map(|b| ("enable_thinking".to_string(), minijinja::Value::from(b)))
            .into_iter()
            .collect();
        let text = codec
            .apply_chat_template(
                &conv.messages,
                conv.tools.as_ref(),
                conv.add_generation_prompt,
                &kwargs,
            )
            .unwrap();
        assert_eq!(text, conv.text, "conversation {i}");
        assert_eq!(codec.encode(&text).unwrap(), conv.ids, "conversation {i}");
    }
}

#[test]
fn eos_ids_come_from_the_model_dir() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/models/qwen3-tiny-chat");
    let codec = TextCodec::from_dir(&model).unwrap();
    let im_end = codec.encode("<|im_end|>").unwrap();
    let eot = codec.encode("<|endoftext|>").unwrap();
    assert_eq!(im_end.len(), 1);
    let mut want = vec![im_end[0], eot[0]];
    want.sort();
    assert_eq!(codec.eos_ids(), want.as_slice());
}
