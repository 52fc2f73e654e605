//! `qtext`: the text side of a model directory, shared by training (`qparallel::data`) and serving (`qserve`).
//!
//! [`TextCodec`] loads `tokenizer.json` through the `tokenizers` crate and the model's Jinja `chat_template`
//! (from `tokenizer_config.json`, or a `chat_template.jinja` file next to it) through minijinja, and resolves
//! the special tokens (generation EOS set, the single document EOS, padding) once, from the same files.
//!
//! # Invariants
//!
//! - Tokenization is transformers' `tokenizer(text, add_special_tokens=False)`: special-token strings in the
//!   text become their ids, nothing is prepended or appended.
//! - [`TextCodec::encode_with_offsets`] returns byte ranges into the encoded text, one per id (`[n]` and `[n]`),
//!   so callers can map character spans of a rendered chat (assistant turns) onto tokens.
//! - Chat rendering reproduces `tokenizer.apply_chat_template(..., tokenize=False)` byte for byte for the
//!   templates in `tests/fixtures/tokenizer/golden.json` (see `tests/text.rs`); the environment is described in
//!   the `template` module: `trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`,
//!   Python-style `tojson`.
//! - Template values are [`minijinja::Value`]s (re-exported); maps keep their insertion order, so tool schemas
//!   render in the order the caller wrote them.

mod codec;
mod template;

pub use codec::{Encoded, TextCodec, TextError};
pub use minijinja;
pub use minijinja::Value;
