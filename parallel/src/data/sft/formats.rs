//! Reading SFT files into rows, by extension:
//!
//! - `.jsonl`: one JSON object per line; blank lines are skipped; a row's line is its line.
//! - `.json`: a JSON array of objects (a row's line is the line its element starts on); a `.json` file that
//!   does not start with `[` is read as JSON Lines, as HF `datasets` does.
//! - `.csv`: RFC 4180 (`,` separated, `"` quoted with `""` for a quote, quoted fields may span lines), a
//!   header row, then one row per record (its line is the line the record starts on). Columns: `messages`
//!   (a JSON string), or `query` + `response` with optional `system` and `history` (a JSON string of pairs);
//!   optional `tools` (a JSON string). Empty cells count as absent; other columns are ignored.
//!
//! A row that cannot be used becomes a [`Row`] with an error message (the caller decides between strict and
//! lenient); only a file that cannot be read or split into rows at all (I/O, a `.json` array that is not
//! closed) is an error here.

use std::path::Path;

use qtext::Value;

use super::conversation::Conversation;
use crate::data::{DataError, Result};

/// One row of a file: its 1-based line and the conversation or why it is unusable.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub line: usize,
    pub conv: std::result::Result<Conversation, String>,
}

fn parse_object(text: &str) -> std::result::Result<Conversation, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    Conversation::from_value(&v)
}

/// Rows of `path` (see the module docs).
pub(crate) fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    match ext.as_deref() {
        Some("jsonl") => Ok(jsonl_rows(text)),
        Some("json") if text.trim_start().starts_with('[') => json_array_rows(path, text),
        Some("json") => Ok(jsonl_rows(text)),
        Some("csv") => Ok(csv_rows(text)),
        _ => Err(DataError::Invalid {
            key: "dataset",
            reason: format!(
                "{}: unknown format (SFT datasets are .jsonl, .json or .csv files, or self-cognition)",
                path.display()
            ),
        }),
    }
}

pub(crate) fn jsonl_rows(text: &str) -> Vec<Row> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Row {
            line: i + 1,
            conv: parse_object(l),
        })
        .collect()
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn json_array_rows(path: &Path, text: &str) -> Result<Vec<Row>> {
    let elements = array_elements(text).map_err(|(at, message)| DataError::Line {
        path: path.to_path_buf(),
        line: line_of(text, at),
        message,
    })?;
    Ok(elements
        .into_iter()
        .map(|(s, e)| Row {
            line: line_of(text, s),
            conv: parse_object(&text[s..e]),
        })
        .collect())
}

/// Byte ranges of the elements of the top-level JSON array in `text`, found syntactically (strings, escapes
/// and nesting respected; the elements themselves are parsed later). Errors are `(byte, message)`.
pub(crate) fn array_elements(
    text: &str,
) -> std::result::Result<Vec<(usize, usize)>, (usize, String)> {
    let b = text.as_bytes();
    let open = text
        .find(|c: char| !c.is_whitespace())
        .filter(|&i| b[i] == b'[')
        .ok_or((0, "expected a JSON array of objects".to_string()))?;
    let mut out = Vec::new();
    let (mut depth, mut in_string, mut escape) = (0usize, false, false);
    let mut start: Option<usize> = None;
    let mut last = open;
    for (i, &c) in b.iter().enumerate().skip(open + 1) {
        if in_string {
            match (escape, c) {
                (true, _) => escape = false,
                (false, b'\\') => escape = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => {}
            b',' | b']' if depth == 0 => {
                match start.take() {
                    Some(s) => out.push((s, text[..i].trim_end().len())),
                    None if c == b']' && out.is_empty() => {}
                    None => return Err((i, "empty element in the JSON array".into())),
                }
                if c == b']' {
                    if !text[i + 1..].trim().is_empty() {
                        return Err((i + 1, "text after the end of the JSON array".into()));
                    }
                    return Ok(out);
                }
            }
            b'}' | b']' if depth > 0 => depth -= 1,
            _ => {
                if depth == 0 && start.is_none() {
                    start = Some(i);
                }
                match c {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    _ => {}
                }
            }
        }
        last = i;
    }
    Err((last, "the JSON array is not closed".into()))
}

/// Records of an RFC 4180 CSV text, each with the 1-based line it starts on (blank lines skipped).
pub(crate) fn csv_records(text: &str) -> Vec<(usize, std::result::Result<Vec<String>, String>)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let start_line = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut error = None;
        loop {
            let Some(c) = chars.next() else {
                if quoted {
                    error = Some("unterminated quoted field".to_string());
                }
                break;
            };
            if quoted {
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => quoted = false,
                    c => {
                        if c == '\n' {
                            line += 1;
                        }
                        field.push(c);
                    }
                }
                continue;
            }
            match c {
                '"' if field.is_empty() => quoted = true,
                ',' => fields.push(std::mem::take(&mut field)),
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    break;
                }
                c => field.push(c),
            }
        }
        fields.push(field);
        if error.is_none() && fields.len() == 1 && fields[0].trim().is_empty() {
            continue;
        }
        out.push((start_line, error.map_or(Ok(fields), Err)));
    }
    out
}

fn csv_rows(text: &str) -> Vec<Row> {
    let mut records = csv_records(text).into_iter();
    let Some((hline, header)) = records.next() else {
        return Vec::new();
    };
    let header: Vec<String> = match header {
        Ok(h) => h.into_iter().map(|c| c.trim().to_string()).collect(),
        Err(e) => {
            return vec![Row {
                line: hline,
                conv: Err(format!("header: {e}")),
            }];
        }
    };
    let has = |c: &str| header.iter().any(|h| h == c);
    let usable = has("messages") || (has("query") && has("response"));
    if !usable {
        let conv = Err(format!(
            "the header ({}) has neither a `messages` column nor `query` and `response` columns",
            header.join(", ")
        ));
        return vec![Row { line: hline, conv }];
    }
    records
        .map(|(line, rec)| {
            let conv = rec.and_then(|fields| {
                if fields.len() != header.len() {
                    return Err(format!(
                        "{} fields, the header has {}",
                        fields.len(),
                        header.len()
                    ));
                }
                let known = [
                    "messages", "query", "response", "system", "history", "tools",
                ];
                let pairs: Vec<(Value, Value)> = header
                    .iter()
                    .zip(fields)
                    .filter(|(h, f)| known.contains(&h.as_str()) && !f.is_empty())
                    .map(|(h, f)| (Value::from(h.as_str()), Value::from(f)))
                    .collect();
                Conversation::from_value(&Value::from_iter(pairs))
            });
            Row { line, conv }
        })
        .collect()
}
