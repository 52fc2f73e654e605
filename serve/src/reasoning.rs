//! Qwen3 reasoning parser: splits generated text into `reasoning_content` (the `<think>…</think>` block) and
//! `content`, for whole answers and for streamed deltas alike (opt-in: `ServeConfig::reasoning_parser`).
//!
//! Rule: an answer whose text starts (after whitespace) with `<think>` is reasoning up to `</think>`, with the
//! newlines right after `<think>` and right before `</think>` removed; everything after `</think>` (its leading
//! newlines removed) is content. An answer that does not open with `<think>` is all content (Qwen3 with
//! `enable_thinking: false` gets the empty think block in its prompt, so its output opens with the answer).
//! A reasoning block cut off by `max_tokens` is all reasoning.
//!
//! Invariant: feeding the text in any split into deltas yields the same concatenated reasoning and content as
//! feeding it whole; text that might still turn into a tag (`<thi`, `</th`) or be a stripped newline is held
//! back until it is decided or [`ReasoningSplitter::finish`] is called.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing decided yet (leading whitespace and a possible partial `<think>`).
    Start,
    /// Inside the think block.
    Reasoning { emitted: bool },
    /// After `</think>` (`emitted`: content has started, so newlines are no longer stripped), or no think block.
    Content { emitted: bool },
}

/// Incremental splitter (see module docs).
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    phase: Phase,
    /// Text received but not yet emitted.
    buf: String,
}

/// What one [`ReasoningSplitter::push`] releases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl Default for ReasoningSplitter {
    fn default() -> Self {
        ReasoningSplitter {
            phase: Phase::Start,
            buf: String::new(),
        }
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag`.
fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&k| s.ends_with(&tag[..k]))
        .unwrap_or(0)
}

impl ReasoningSplitter {
    /// Feeds a delta; returns what is decided.
    pub fn push(&mut self, delta: &str) -> Split {
        self.buf.push_str(delta);
        let mut out = Split::default();
        loop {
            match self.phase {
                Phase::Start => {
                    let t = self.buf.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN) {
                        self.buf = rest.to_string();
                        self.phase = Phase::Reasoning { emitted: false };
                    } else if OPEN.starts_with(t) {
                        return out; // empty or a partial tag: undecided
                    } else {
                        self.phase = Phase::Content { emitted: true };
                    }
                }
                Phase::Reasoning { emitted } => {
                    if !emitted {
                        let t = self.buf.trim_start_matches('\n').len();
                        self.buf.drain(..self.buf.len() - t);
                    }
                    if let Some(i) = self.buf.find(CLOSE) {
                        let r = self.buf[..i].trim_end_matches('\n');
                        out.reasoning.push_str(r);
                        self.buf.drain(..i + CLOSE.len());
                        self.phase = Phase::Content { emitted: false };
                        continue;
                    }
                    // Hold back a partial `</think>` and trailing newlines (they may precede it).
                    let keep = partial_suffix(&self.buf, CLOSE);
                    let body = &self.buf[..self.buf.len() - keep];
                    let cut = body.trim_end_matches('\n').len();
                    if cut > 0 {
                        out.reasoning.push_str(&self.buf[..cut]);
                        self.buf.drain(..cut);
                        self.phase = Phase::Reasoning { emitted: true };
                    }
                    return out;
                }
                Phase::Content { emitted } => {
                    if !emitted {
                        let t = self.buf.trim_start_matches('\n').len();
                        self.buf.drain(..self.buf.len() - t);
                        if self.buf.is_empty() {
                            return out;
                        }
                        self.phase = Phase::Content { emitted: true };
                    }
                    out.content.push_str(&self.buf);
                    self.buf.clear();
                    return out;
                }
            }
        }
    }

    /// The end of the text: releases what was held back.
    pub fn finish(&mut self) -> Split {
        let mut out = Split::default();
        let rest = std::mem::take(&mut self.buf);
        match self.phase {
            Phase::Start => out.content = rest,
            // A cut-off think block: trailing newlines are dropped, a partial `</th` is reasoning text.
            Phase::Reasoning { .. } => out.reasoning = rest.trim_end_matches('\n').to_string(),
            Phase::Content { .. } => out.content = rest.trim_start_matches('\n').to_string(),
        }
        out
    }

    /// Splits a whole answer.
    pub fn split(text: &str) -> Split {
        let mut s = ReasoningSplitter::default();
        let mut a = s.push(text);
        let b = s.finish();
        a.reasoning.push_str(&b.reasoning);
        a.content.push_str(&b.content);
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(r: &str, c: &str) -> Split {
        Split {
            reasoning: r.into(),
            content: c.into(),
        }
    }

    #[test]
    fn splits_whole_answers() {
        let s = ReasoningSplitter::split;
        assert_eq!(
            s("<think>\nAdd 1 and 2.\n</think>\n\nIt is 3."),
            whole("Add 1 and 2.", "It is 3.")
        );
        assert_eq!(s("It is 3."), whole("", "It is 3."));
        assert_eq!(s("<think>\n\n</think>\n\nHi"), whole("", "Hi"));
        assert_eq!(s("<think>\nstill thinking\n"), whole("still thinking", ""));
        assert_eq!(
            s("  <thinking is not a tag"),
            whole("", "  <thinking is not a tag")
        );
        assert_eq!(s("<th"), whole("", "<th"));
        assert_eq!(
            s("a</think>b"),
            whole("", "a</think>b"),
            "no opening tag: all content"
        );
    }

    #[test]
    fn any_split_into_deltas_gives_the_whole_result() {
        let texts = [
            "<think>\nAdd 1 and 2.\nThen 3.\n</think>\n\nIt is 3.\nDone\n",
            "<think>\nline\n\n</thin</think>x",
            "\n<think>a</think>",
            "plain answer with </think> inside",
            "<think>\nnever closed </thi",
        ];
        for text in texts {
            let want = ReasoningSplitter::split(text);
            let chars: Vec<char> = text.chars().collect();
            for step in 1..=4 {
                let mut sp = ReasoningSplitter::default();
                let mut got = Split::default();
                for piece in chars.chunks(step) {
                    let d: String = piece.iter().collect();
                    let o = sp.push(&d);
                    got.reasoning.push_str(&o.reasoning);
                    got.content.push_str(&o.content);
                }
                let o = sp.finish();
                got.reasoning.push_str(&o.reasoning);
                got.content.push_str(&o.content);
                assert_eq!(got, want, "{text:?} in pieces of {step}");
            }
        }
    }
}
