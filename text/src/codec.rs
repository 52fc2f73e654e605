//! [`TextCodec`]: one model directory's tokenizer, special tokens and chat template, read once.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Value};

use crate::template;

/// Errors of the text side; each names the file or the step at fault.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `tokenizer.json` is missing or cannot be loaded.
    #[error("loading {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the model has no chat_template")]
    NoChatTemplate,
    /// The template does not compile, or rendering failed (`raise_exception`, a type error, …).
    #[error("chat template: {0}")]
    Template(String),
    /// The tokenizer refused the text or the ids.
    #[error("tokenizer: {0}")]
    Encode(String),
    /// No end-of-text token can be resolved (see [`TextCodec::eos_id`]).
    #[error(
        "{}: no EOS token: set eos_token in tokenizer_config.json or eos_token_id in config.json",
        dir.display()
    )]
    NoEos { dir: PathBuf },
}

/// Token ids of a text plus where each token lies in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// `[n]` token ids.
    pub ids: Vec<u32>,
    /// `[n]` byte ranges `start..end` of each token in the encoded text, as `tokenizers` reports them.
    ///
    /// Ranges are non-decreasing and never cross a char boundary; several tokens of one multi-byte char (byte
    /// fallback / byte-level BPE) share that char's range. With a byte-level pre-tokenizer that has
    /// `trim_offsets` (Qwen's), leading spaces are trimmed off a token's range and a token of spaces only
    /// gets the empty range at its end; the *end* of a range is always the true end of the token's text.
    pub offsets: Vec<(usize, usize)>,
}

/// Tokenizer, special tokens and chat template of one model dir.
///
/// Files read by [`TextCodec::from_dir`]: `tokenizer.json` (required), `tokenizer_config.json` (`chat_template`,
/// `bos_token`, `eos_token`, `pad_token`; optional), `chat_template.jinja` (when the config has no template),
/// `config.json` and `generation_config.json` (`eos_token_id`, `pad_token_id`; optional).
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    env: Option<Environment<'static>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    dir: PathBuf,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec")
            .field("dir", &self.dir)
            .field("has_chat_template", &self.env.is_some())
            .field("eos_id", &self.eos_id)
            .field("eos_ids", &self.eos_ids)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

fn read(path: &Path) -> Result<String, TextError> {
    std::fs::read_to_string(path).map_err(|source| TextError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The JSON in `path`, or `Null` when the file does not exist.
fn read_json_opt(path: &Path) -> Result<serde_json::Value, TextError> {
    if !path.exists() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&read(path)?).map_err(|source| TextError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// A special-token entry is either a string or `{"content": …}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id`-style entries: a number or a list of numbers.
fn ids_of(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl TextCodec {
    /// Loads a model dir (see the type docs for the files).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TextError> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(TextError::Tokenizer {
                path: tok_path,
                message: "not found (text is tokenized with the model's tokenizer.json)".into(),
            });
        }
        let tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| TextError::Tokenizer {
                path: tok_path.clone(),
                message: format!("cannot load: {e}"),
            })?;
        let tcfg = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let config = read_json_opt(&dir.join("config.json"))?;
        let generation = read_json_opt(&dir.join("generation_config.json"))?;

        let mut template = tcfg
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(str::to_string);
        let jinja = dir.join("chat_template.jinja");
        if template.is_none() && jinja.exists() {
            template = Some(read(&jinja)?);
        }
        let bos_token = token_string(tcfg.get("bos_token"));
        let eos_token = token_string(tcfg.get("eos_token"));
        let lookup = |t: Option<String>| t.and_then(|t| tokenizer.token_to_id(&t));

        // Generation stops: every EOS the model dir names.
        let mut eos_ids = ids_of(generation.get("eos_token_id"));
        eos_ids.extend(ids_of(config.get("eos_token_id")));
        eos_ids.extend(lookup(eos_token.clone()));
        eos_ids.sort_unstable();
        eos_ids.dedup();

        // The one document end: tokenizer_config's eos_token, else config.json's (first) eos_token_id, else
        // Qwen's `<|endoftext|>`.
        let eos_id = lookup(eos_token.clone())
            .or_else(|| ids_of(config.get("eos_token_id")).first().copied())
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"));
        let pad_id = lookup(token_string(tcfg.get("pad_token")))
            .or_else(|| ids_of(config.get("pad_token_id")).first().copied())
            .or(eos_id);

        let mut codec = TextCodec {
            tokenizer,
            env: None,
            bos_token,
            eos_token,
            eos_ids,
            eos_id,
            pad_id,
            dir: dir.to_path_buf(),
        };
        if let Some(t) = template {
            codec.set_chat_template(t)?;
        }
        Ok(codec)
    }

    /// The directory this codec was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces the chat template.
    pub fn set_chat_template(&mut self, source: String) -> Result<(), TextError> {
        let env =
            template::environment(source).map_err(|e| TextError::Template(format!("{e:#}")))?;
        self.env = Some(env);
        Ok(())
    }

    /// True when the model dir has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.env.is_some()
    }

    /// Token ids that end generation (generation_config, config and the tokenizer's `eos_token`), sorted.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The end-of-text id appended after a pretraining document: `tokenizer_config.json`'s `eos_token` looked
    /// up in the vocabulary, else `config.json`'s `eos_token_id` (a number, or the first of a list), else a
    /// token named `<|endoftext|>`. `None` when none of them exists.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// [`eos_id`](Self::eos_id), or [`TextError::NoEos`] naming the directory.
    pub fn require_eos_id(&self) -> Result<u32, TextError> {
        self.eos_id.ok_or_else(|| TextError::NoEos {
            dir: self.dir.clone(),
        })
    }

    /// The padding id: `tokenizer_config.json`'s `pad_token`, else `config.json`'s `pad_token_id`, else
    /// [`eos_id`](Self::eos_id).
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The id of one token of the vocabulary (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Ids of `text`; special-token strings in it map to their ids (as transformers does by default). No BOS /
    /// EOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`encode`](Self::encode) plus the byte range of every token in `text` (see [`Encoded::offsets`]).
    pub fn encode_with_offsets(&self, text: &str) -> Result<Encoded, TextError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Text of `ids`; `skip_special` drops special tokens (`<|im_end|>` …, not `<think>`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| TextError::Encode(e.to_string()))
    }

    /// Size of the tokenizer's vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Renders the chat template. `messages` and `tools` are template values (maps keep their key order);
    /// `kwargs` are extra context entries (`chat_template_kwargs`, e.g. `enable_thinking`).
    ///
    /// The context holds `messages`, `tools` (when given), `add_generation_prompt`, `bos_token`, `eos_token`
    /// (when the tokenizer config names them) and every `kwargs` entry.
    pub fn apply_chat_template(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
        kwargs: &[(String, Value)],
    ) -> Result<String, TextError> {
        let env = self.env.as_ref().ok_or(TextError::NoChatTemplate)?;
        let tmpl = env
            .get_template(template::CHAT)
            .map_err(|e| TextError::Template(format!("{e:#}")))?;
        let mut ctx: Vec<(String, Value)> = kwargs.to_vec();
        ctx.push(("messages".into(), Value::from(messages.to_vec())));
        if let Some(t) = tools {
            ctx.push(("tools".into(), t.clone()));
        }
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(v) = v {
                ctx.push((k.into(), Value::from(v.clone())));
            }
        }
        tmpl.render(Value::from_iter(ctx))
            .map_err(|e| TextError::Template(format!("{e:#}")))
    }
}
