//! Text side of serving: [`qtext::TextCodec`] (tokenizer.json + the model's Jinja chat template, shared with
//! training) re-exported under `qserve::text`, plus its [`Detokenizer`] impl for the engine.

pub use qtext::{Encoded, TextCodec, TextError};

use crate::engine::Detokenizer;

impl Detokenizer for TextCodec {
    fn decode(&self, ids: &[u32]) -> String {
        TextCodec::decode(self, ids, true).unwrap_or_default()
    }
}
