//! Tokenizer and chat-template parity with transformers: tests/fixtures/tokenizer/golden.json holds the ids and
//! renderings `make_tokenizer.py` computed with `AutoTokenizer` / `apply_chat_template`.

use std::path::PathBuf;

use qtext::TextCodec;
use qtext::minijinja;
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

fn tiny_chat() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/models/qwen3-tiny-chat")
}

#[test]
fn special_tokens_resolve_once_from_the_model_dir() {
    let codec = TextCodec::from_dir(tiny_chat()).unwrap();
    let im_end = codec.token_to_id("<|im_end|>").unwrap();
    let eot = codec.token_to_id("<|endoftext|>").unwrap();
    // tokenizer_config.json: eos_token <|im_end|>, pad_token <|endoftext|>.
    assert_eq!(codec.eos_id(), Some(im_end));
    assert_eq!(codec.require_eos_id().unwrap(), im_end);
    assert_eq!(codec.pad_id(), Some(eot));

    // Without tokenizer_config.json and config.json the document EOS falls back to <|endoftext|>.
    let scratch = tempfile::tempdir().unwrap();
    let tmp = scratch.path();
    std::fs::copy(
        tiny_chat().join("tokenizer.json"),
        tmp.join("tokenizer.json"),
    )
    .unwrap();
    let bare = TextCodec::from_dir(tmp).unwrap();
    assert_eq!(bare.eos_id(), Some(eot));
    assert!(!bare.has_chat_template());
    assert!(matches!(
        bare.apply_chat_template(&[], None, false, &[]),
        Err(qtext::TextError::NoChatTemplate)
    ));
    // config.json's eos_token_id list wins over <|endoftext|> when tokenizer_config.json has none.
    std::fs::write(
        tmp.join("config.json"),
        format!("{{\"eos_token_id\": [{im_end}, 3]}}"),
    )
    .unwrap();
    let with_config = TextCodec::from_dir(tmp).unwrap();
    assert_eq!(with_config.eos_id(), Some(im_end));
    assert_eq!(with_config.eos_ids(), &[3, im_end]);

    let missing = TextCodec::from_dir(tiny_chat().join("nope")).unwrap_err();
    assert!(missing.to_string().contains("tokenizer.json"), "{missing}");
}

#[test]
fn offsets_cover_the_text_and_end_at_token_ends() {
    let codec = TextCodec::from_dir(tiny_chat()).unwrap();
    let text = "<|im_start|>user\n你是谁？ who  are you?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nI am  a model.<|im_end|>";
    let enc = codec.encode_with_offsets(text).unwrap();
    assert_eq!(enc.ids, codec.encode(text).unwrap());
    assert_eq!(enc.ids.len(), enc.offsets.len());
    // Ends are non-decreasing, on char boundaries, and the last one is the end of the text.
    let mut prev = 0;
    for (&id, &(s, e)) in enc.ids.iter().zip(&enc.offsets) {
        assert!(s <= e && e >= prev, "token {id}: {s}..{e} after {prev}");
        assert!(text.is_char_boundary(s) && text.is_char_boundary(e));
        prev = e;
    }
    assert_eq!(prev, text.len());
    // Special tokens map onto exactly their own text.
    let im_end = codec.token_to_id("<|im_end|>").unwrap();
    for (i, &id) in enc.ids.iter().enumerate() {
        if id == im_end {
            let (s, e) = enc.offsets[i];
            assert_eq!(&text[s..e], "<|im_end|>");
        }
    }
    // Decoding the tokens whose range ends inside a span gives that span back.
    let span_start = text.find("I am").unwrap();
    let picked: Vec<u32> = enc
        .ids
        .iter()
        .zip(&enc.offsets)
        .filter(|(_, (_, e))| *e > span_start)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        codec.decode(&picked, false).unwrap(),
        "I am  a model.<|im_end|>"
    );
}
