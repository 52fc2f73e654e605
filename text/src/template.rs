//! The Jinja environment transformers sets up for `apply_chat_template`, rebuilt on minijinja.
//!
//! - `trim_blocks` and `lstrip_blocks`;
//! - Python string methods (`startswith`, `split`, `strip`, …) through minijinja-contrib's pycompat;
//! - `raise_exception(msg)`, failing the render with `msg`;
//! - a `tojson` filter that writes JSON as Python's `json.dumps(x, ensure_ascii=False, indent=…)` does
//!   (`", "` / `": "` separators, keys in insertion order, non-ASCII kept), so tool schemas render byte for
//!   byte as in HF.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};

/// Name of the chat template inside its environment.
pub(crate) const CHAT: &str = "chat";

/// A fresh environment holding `source` as [`CHAT`].
pub(crate) fn environment(source: String) -> Result<Environment<'static>, JinjaError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", tojson);
    env.add_template_owned(CHAT, source)?;
    Ok(env)
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
