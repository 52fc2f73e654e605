//! Rendering one [`Conversation`] into tokens and loss weights.
//!
//! # How the trained tokens are found
//!
//! 1. The conversation is rendered with the model's own chat template (`add_generation_prompt = false`), so the
//!    text is exactly what transformers' `apply_chat_template` gives (thinking blocks, tool calls, Qwen3's
//!    dropping of reasoning from earlier turns). A final `\n` after the last `<|im_end|>` is cut when the
//!    conversation ends with an assistant turn: ms-swift ends a training sample at that `<|im_end|>`.
//! 2. The assistant turns are located in the *rendered* text as ChatML blocks: `<|im_start|>assistant\n`
//!    (header, never trained) then the turn up to and including its `<|im_end|>`. The turn span is what
//!    ms-swift trains: the response as the template wrote it (for Qwen3's last turn that includes the
//!    `<think>\n\n</think>\n\n` block the template inserts) plus the closing `<|im_end|>`; the `\n` after it is
//!    not trained.
//! 3. `loss_scale` turns spans into per-byte weights of the text: `default` every assistant span, `last_round`
//!    the last one, `all` every byte; `ignore_empty_think` then zeroes an empty think block
//!    (`<think>`, whitespace, `</think>`, whitespace) at the start of a weighted assistant span.
//! 4. The whole text is tokenized once with byte offsets ([`qtext::TextCodec::encode_with_offsets`]); a token
//!    takes the weight of the *last* byte of its range. Span ends are special tokens (`<|im_end|>`, `</think>`)
//!    so no token crosses one; a token that crosses a span *start* (e.g. the header's `\n` merged with content
//!    that starts with newlines) counts as trained.
//! 5. `loss_weights[t]` (for predicting `input_ids[t+1]` at `t`) is the weight of token `t+1`; the last entry
//!    is 0.
//!
//! # Limits
//!
//! - Only ChatML-style templates (Qwen, Qwen3, …) are supported: the loader probes the template once and
//!   refuses one that does not render `<|im_start|>assistant\n … <|im_end|>` blocks.
//! - Rows whose contents contain `<|im_start|>` / `<|im_end|>` are refused by [`Conversation::check`], and the
//!   number of assistant blocks found must equal the number of assistant messages, else the row is refused.
//! - Tokenizing the whole text (as transformers does) can differ from ms-swift, which tokenizes each piece of
//!   the template separately, where a pre-token would cross a piece boundary; with Qwen's tokenizer this only
//!   happens for contents that start with whitespace followed by a newline.

use std::fmt;
use std::str::FromStr;

use qtext::TextCodec;

use super::conversation::Conversation;
use super::{RowError, SftSample};
use crate::data::DataError;

pub(crate) const IM_START: &str = "<|im_start|>";
pub(crate) const IM_END: &str = "<|im_end|>";
const ASSISTANT_HEADER: &str = "<|im_start|>assistant\n";

/// Which turns `loss_scale` trains (before `ignore_empty_think`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LossScaleBase {
    /// Every assistant turn.
    #[default]
    Default,
    /// Only the last assistant turn.
    LastRound,
    /// Every token (system and user turns and the template's markup included).
    All,
}

/// ms-swift's `loss_scale`: a base (`default`, `last_round`, `all`) optionally combined with
/// `ignore_empty_think` by `+`. `ignore_empty_think` alone means `default+ignore_empty_think`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossScale {
    pub base: LossScaleBase,
    /// Weight 0 on an empty think block at the start of an assistant turn.
    pub ignore_empty_think: bool,
}

impl FromStr for LossScale {
    type Err = DataError;

    /// Parts joined by `+` (spaces around parts allowed), at most one base.
    fn from_str(value: &str) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::Invalid {
            key: "loss_scale",
            reason,
        };
        let mut base: Option<LossScaleBase> = None;
        let mut ignore_empty_think = false;
        for part in value.split('+').map(str::trim) {
            let b = match part {
                "default" => LossScaleBase::Default,
                "last_round" => LossScaleBase::LastRound,
                "all" => LossScaleBase::All,
                "ignore_empty_think" => {
                    ignore_empty_think = true;
                    continue;
                }
                other => {
                    return Err(bad(format!(
                        "unknown part {other:?} in {value:?}; use default, last_round, all or \
                         ignore_empty_think, joined by '+'"
                    )));
                }
            };
            if base.replace(b).is_some() {
                return Err(bad(format!(
                    "{value:?} names more than one of default, last_round, all"
                )));
            }
        }
        Ok(LossScale {
            base: base.unwrap_or_default(),
            ignore_empty_think,
        })
    }
}

impl fmt::Display for LossScale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = match self.base {
            LossScaleBase::Default => "default",
            LossScaleBase::LastRound => "last_round",
            LossScaleBase::All => "all",
        };
        f.write_str(base)?;
        if self.ignore_empty_think {
            f.write_str("+ignore_empty_think")?;
        }
        Ok(())
    }
}

/// A rendered conversation: the template's text and the trained sample made from it.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedSample {
    /// The chat template's output (final `\n` cut, see the module docs).
    pub text: String,
    pub sample: SftSample,
}

/// The `[start, end)` byte spans of the assistant turns in `text`: from after the `<|im_start|>assistant\n`
/// header to the end of the turn's `<|im_end|>`.
pub(crate) fn assistant_spans(text: &str) -> Result<Vec<(usize, usize)>, String> {
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(ASSISTANT_HEADER) {
        let start = from + i + ASSISTANT_HEADER.len();
        let Some(j) = text[start..].find(IM_END) else {
            return Err("the rendered text has an assistant turn without <|im_end|>".into());
        };
        let end = start + j + IM_END.len();
        if text[start..end].contains(IM_START) {
            return Err("the rendered text has an assistant turn without <|im_end|>".into());
        }
        spans.push((start, end));
        from = end;
    }
    Ok(spans)
}

/// Length of an empty think block (`<think>`, whitespace, `</think>`, whitespace) at the start of `s`.
fn empty_think_len(s: &str) -> Option<usize> {
    let rest = s.strip_prefix("<think>")?;
    let rest = rest.trim_start();
    let rest = rest.strip_prefix("</think>")?;
    let rest = rest.trim_start();
    Some(s.len() - rest.len())
}

/// Renders and tokenizes `conv`, weighting tokens by `loss_scale` (see the module docs).
pub fn render_sample(
    codec: &TextCodec,
    conv: &Conversation,
    loss_scale: LossScale,
) -> Result<RenderedSample, RowError> {
    let mut text = codec
        .apply_chat_template(&conv.messages, conv.tools.as_ref(), false, &[])
        .map_err(|e| RowError(format!("cannot render: {e}")))?;
    let ends_with_assistant =
        conv.role(conv.messages.len().saturating_sub(1)).as_deref() == Some("assistant");
    if ends_with_assistant && text.ends_with(&format!("{IM_END}\n")) {
        text.pop();
    }
    let spans = assistant_spans(&text).map_err(RowError)?;
    let want = conv.assistant_turns();
    if spans.len() != want {
        return Err(RowError(format!(
            "the rendered text has {} assistant turns, the row has {want} assistant messages",
            spans.len()
        )));
    }

    // Per-byte weights.
    let mut bytes = vec![0.0f32; text.len()];
    let weighted: &[(usize, usize)] = match loss_scale.base {
        LossScaleBase::All => {
            bytes.fill(1.0);
            &spans
        }
        LossScaleBase::Default => &spans,
        LossScaleBase::LastRound => &spans[spans.len() - 1..],
    };
    for &(s, e) in weighted {
        bytes[s..e].fill(1.0);
        if loss_scale.ignore_empty_think
            && let Some(n) = empty_think_len(&text[s..e])
        {
            bytes[s..s + n].fill(0.0);
        }
    }

    let enc = codec
        .encode_with_offsets(&text)
        .map_err(|e| RowError(format!("cannot tokenize: {e}")))?;
    // Token i's weight goes to the prediction at i - 1; nothing predicts token 0; the last entry stays 0.
    let mut loss_weights: Vec<f32> = enc
        .offsets
        .iter()
        .skip(1)
        .map(|&(_, end)| if end == 0 { 0.0 } else { bytes[end - 1] })
        .collect();
    if !enc.ids.is_empty() {
        loss_weights.push(0.0);
    }
    Ok(RenderedSample {
        text,
        sample: SftSample {
            input_ids: enc.ids,
            loss_weights,
        },
    })
}

/// Renders a fixed two-turn conversation and checks the template produces ChatML assistant blocks.
pub(crate) fn probe_template(codec: &TextCodec) -> Result<(), DataError> {
    let conv = Conversation::from_query(None, &[], "hi", "ok");
    let text = codec.apply_chat_template(&conv.messages, None, false, &[])?;
    match assistant_spans(&text) {
        Ok(spans) if spans.len() == 1 && text[spans[0].0..spans[0].1].contains("ok") => Ok(()),
        _ => Err(DataError::Invalid {
            key: "chat_template",
            reason: format!(
                "SFT loss masks need a ChatML template (`<|im_start|>assistant\\n … <|im_end|>` turns); \
                 {} renders a user/assistant exchange as {text:?}",
                codec.dir().display()
            ),
        }),
    }
}
