//! The model's own tokenizer (`tokenizer.json`, HF `tokenizers` format) plus its end-of-text id.
//!
//! The EOS id comes from `tokenizer_config.json`'s `eos_token` (a string or `{"content": …}`) looked up in the
//! vocabulary, else from `config.json`'s `eos_token_id` (a number or a list, first entry), else from a token
//! named `<|endoftext|>` (Qwen's document separator).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{DataError, Result};

/// A loaded tokenizer and the id appended after every text document.
pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
    eos_id: u32,
    path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn read_json(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` and resolves the EOS id (see the module docs).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(DataError::Tokenizer {
                path,
                message: "not found (text datasets are tokenized with the model's tokenizer.json)"
                    .into(),
            });
        }
        let tokenizer =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| DataError::Tokenizer {
                path: path.clone(),
                message: format!("cannot load: {e}"),
            })?;
        let from_config = read_json(&dir.join("tokenizer_config.json"))
            .and_then(|c| {
                let t = c.get("eos_token")?;
                t.as_str()
                    .or_else(|| t.get("content").and_then(Value::as_str))
                    .map(str::to_string)
            })
            .and_then(|t| tokenizer.token_to_id(&t));
        let from_model_config = || {
            let c = read_json(&dir.join("config.json"))?;
            let e = c.get("eos_token_id")?;
            e.as_u64()
                .or_else(|| e.as_array()?.first()?.as_u64())
                .map(|v| v as u32)
        };
        let eos_id = from_config
            .or_else(from_model_config)
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
            .ok_or_else(|| DataError::Tokenizer {
                path: path.clone(),
                message: "no EOS token: set eos_token in tokenizer_config.json or eos_token_id in \
                          config.json"
                    .into(),
            })?;
        Ok(TextTokenizer {
            tokenizer,
            eos_id,
            path,
        })
    }

    /// The id appended after every text document.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Token ids of `text`, without special tokens and without EOS.
    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("cannot tokenize: {e}"))
    }

    /// The vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}
