//! Text side of serving: `tokenizer.json` via the `tokenizers` crate and the model's Jinja `chat_template`
//! (from `tokenizer_config.json`, or a `chat_template.jinja` file next to it) via minijinja.
//!
//! The template environment copies what transformers sets up for `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks`, Python string methods (`startswith`, `split`, `strip`, … through minijinja-contrib's
//! pycompat), `raise_exception(msg)`, and a `tojson` filter that writes JSON as Python's `json.dumps` does
//! (`", "` / `": "` separators, keys in insertion order, non-ASCII kept), so tool schemas render byte for byte
//! as in HF. The context holds `messages`, `tools` (when given), `add_generation_prompt`, `bos_token`,
//! `eos_token`, and every `chat_template_kwargs` entry (e.g. `enable_thinking`).

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};

use crate::engine::Detokenizer;

/// Errors of the text side.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the model has no chat_template")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// Tokenizer plus chat template of one model dir.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    env: Option<Environment<'static>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec")
            .field("has_chat_template", &self.env.is_some())
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn read(path: &Path) -> Result<String, TextError> {
    std::fs::read_to_string(path).map_err(|source| TextError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value, TextError> {
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
    /// Loads `tokenizer.json`, `tokenizer_config.json` (optional) and the EOS ids of `config.json` /
    /// `generation_config.json` (optional) from a model dir.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TextError> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        let tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| TextError::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let tcfg = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            serde_json::Value::Null
        };
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
        let mut eos_ids = Vec::new();
        for f in ["generation_config.json", "config.json"] {
            let p = dir.join(f);
            if p.exists() {
                eos_ids.extend(ids_of(read_json(&p)?.get("eos_token_id")));
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let mut codec = TextCodec {
            tokenizer,
            env: None,
            bos_token,
            eos_token,
            eos_ids,
        };
        if let Some(t) = template {
            codec.set_chat_template(t)?;
        }
        Ok(codec)
    }

    /// Replaces the chat template.
    pub fn set_chat_template(&mut self, source: String) -> Result<(), TextError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source)
            .map_err(|e| TextError::Template(format!("{e:#}")))?;
        self.env = Some(env);
        Ok(())
    }

    /// True when the model dir has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.env.is_some()
    }

    /// Token ids that end generation (generation_config, config and the tokenizer's `eos_token`).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Ids of `text`; special-token strings in it map to their ids (as transformers does by default).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
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
    pub fn apply_chat_template(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
        kwargs: &[(String, Value)],
    ) -> Result<String, TextError> {
        let env = self.env.as_ref().ok_or(TextError::NoChatTemplate)?;
        let tmpl = env
            .get_template("chat")
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

impl Detokenizer for TextCodec {
    fn decode(&self, ids: &[u32]) -> String {
        TextCodec::decode(self, ids, true).unwrap_or_default()
    }
}

fn raise_exception(msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn newline(indent: Option<usize>, level: usize, out: &mut String) {
    if let Some(n) = indent {
        out.push('\n');
        out.push_str(&" ".repeat(n * level));
    }
}

/// Python `json.dumps` layout: `", "`/`": "` without indent, `","`+newline/`": "` with it.
fn py_json(
    v: &Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> Result<(), JinjaError> {
    let sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&format!("{f}"));
                }
            }
        }
        ValueKind::String => py_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(indent, level + 1, out);
                py_json(item, indent, level + 1, out)?;
            }
            newline(indent, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(indent, level + 1, out);
                match k.as_str() {
                    Some(s) => py_str(s, out),
                    None => py_str(&k.to_string(), out),
                }
                out.push_str(": ");
                py_json(&v.get_item(k)?, indent, level + 1, out)?;
            }
            newline(indent, level, out);
            out.push('}');
        }
        _ => py_str(&v.to_string(), out),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_json_dumps() {
        let v: Value =
            serde_json::from_str(r#"{"b": 1, "a": [1.5, 2.0, true, null, "x\"y\n"], "é": {}}"#)
                .unwrap();
        let mut out = String::new();
        py_json(&v, None, 0, &mut out).unwrap();
        // python3 -c 'import json; print(json.dumps({"b": 1, "a": [1.5, 2.0, True, None, "x\"y\n"], "é": {}}, ensure_ascii=False))'
        assert_eq!(
            out,
            r#"{"b": 1, "a": [1.5, 2.0, true, null, "x\"y\n"], "é": {}}"#
        );
        let mut out = String::new();
        py_json(&v, Some(2), 0, &mut out).unwrap();
        assert_eq!(
            out,
            "{\n  \"b\": 1,\n  \"a\": [\n    1.5,\n    2.0,\n    true,\n    null,\n    \"x\\\"y\\n\"\n  ],\n  \"é\": {}\n}"
        );
    }
}
