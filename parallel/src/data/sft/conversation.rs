//! [`Conversation`]: one SFT row as the chat template takes it, built from ms-swift's row shapes and checked.
//!
//! Accepted row shapes (a JSON object, or a CSV row turned into one):
//! - `{"messages": [{"role", "content", …}, …], "tools"?: [...], "system"?: "…"}` — ms-swift's standard
//!   format. Roles `system`, `user`, `assistant`, `tool`; an assistant message may carry `tool_calls` (then
//!   `content` may be missing or null) and `reasoning_content`. ms-swift's agent roles are mapped onto the
//!   template's: `tool_call` (content = JSON `{"name", "arguments"}`) becomes a `tool_calls` entry of the
//!   preceding assistant message (or of a new one with empty content), `tool_response` becomes `tool`. A
//!   top-level `system` is prepended when the messages have no system message of their own.
//! - `{"query", "response", "system"?, "history"?: [[query, response], …]}` — ms-swift's shortcut.
//! - `messages`, `tools` and `history` may also be JSON strings holding the list (CSV cells).
//!
//! A checked conversation has at least one message, only known roles, string contents (see above for
//! assistant tool calls), at least one assistant message, and no ChatML control token (`<|im_start|>`,
//! `<|im_end|>`) inside a content: those would be tokenized as the special tokens and corrupt the turn
//! structure the loss mask is found from.

use qtext::Value;
use qtext::minijinja::value::ValueKind;

use super::render::{IM_END, IM_START};

/// One chat sample as the chat template takes it (see the module docs for the accepted rows).
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// Template maps with at least `role`; keys keep the order of the row.
    pub messages: Vec<Value>,
    /// The `tools` list of the template, when the row has one.
    pub tools: Option<Value>,
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

fn present(v: Value) -> Option<Value> {
    (!v.is_undefined() && !v.is_none()).then_some(v)
}

fn attr(v: &Value, key: &str) -> Option<Value> {
    v.get_attr(key).ok().and_then(present)
}

/// A list, or a string holding a JSON list.
fn list(v: Value, what: &str) -> Result<Value, String> {
    let v = match v.as_str() {
        Some(s) => serde_json::from_str::<Value>(s)
            .map_err(|e| format!("`{what}` is a string but not valid JSON: {e}"))?,
        None => v,
    };
    if v.kind() != ValueKind::Seq {
        return Err(format!("`{what}` must be a list"));
    }
    Ok(v)
}

fn string(v: Option<Value>, what: &str) -> Result<String, String> {
    match v {
        Some(v) if v.kind() == ValueKind::String => Ok(v.as_str().unwrap_or_default().to_string()),
        Some(_) => Err(format!("`{what}` must be a string")),
        None => Err(format!("`{what}` is missing")),
    }
}

/// A map value from `(key, value)` pairs, in order.
fn map(pairs: Vec<(Value, Value)>) -> Value {
    Value::from_iter(pairs)
}

fn message(role: &str, content: &str) -> Value {
    map(vec![
        (Value::from("role"), Value::from(role)),
        (Value::from("content"), Value::from(content)),
    ])
}

/// The `(key, value)` pairs of a map.
fn pairs(v: &Value) -> Vec<(Value, Value)> {
    v.try_iter()
        .map(|keys| {
            keys.map(|k| {
                let item = v.get_item(&k).unwrap_or_default();
                (k, item)
            })
            .collect()
        })
        .unwrap_or_default()
}

/// `pairs` with `key` set to `value` (replaced in place, or appended).
fn with(mut pairs: Vec<(Value, Value)>, key: &str, value: Value) -> Vec<(Value, Value)> {
    match pairs.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
        Some(slot) => slot.1 = value,
        None => pairs.push((Value::from(key), value)),
    }
    pairs
}

impl Conversation {
    /// ms-swift's shortcut: `system`, then each `(query, response)` of `history`, then `query`/`response`.
    pub fn from_query(
        system: Option<&str>,
        history: &[(String, String)],
        query: &str,
        response: &str,
    ) -> Self {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(message("system", s));
        }
        for (q, r) in history {
            messages.push(message("user", q));
            messages.push(message("assistant", r));
        }
        messages.push(message("user", query));
        messages.push(message("assistant", response));
        Conversation {
            messages,
            tools: None,
        }
    }

    /// A conversation from one row object (see the module docs), checked.
    pub fn from_value(row: &Value) -> Result<Self, String> {
        if row.kind() != ValueKind::Map {
            return Err("expected a JSON object".into());
        }
        let tools = attr(row, "tools").map(|t| list(t, "tools")).transpose()?;
        let system = attr(row, "system")
            .map(|s| string(Some(s), "system"))
            .transpose()?;
        let conv = if let Some(m) = attr(row, "messages") {
            let raw: Vec<Value> = list(m, "messages")?
                .try_iter()
                .map_err(|e| e.to_string())?
                .collect();
            let mut messages = normalize_roles(raw)?;
            let has_system = messages
                .first()
                .and_then(|m| attr(m, "role"))
                .is_some_and(|r| r.as_str() == Some("system"));
            if let (Some(s), false) = (&system, has_system) {
                messages.insert(0, message("system", s));
            }
            Conversation { messages, tools }
        } else if attr(row, "query").is_some() || attr(row, "response").is_some() {
            let query = string(attr(row, "query"), "query")?;
            let response = string(attr(row, "response"), "response")?;
            let mut history = Vec::new();
            if let Some(h) = attr(row, "history") {
                for (i, pair) in list(h, "history")?
                    .try_iter()
                    .map_err(|e| e.to_string())?
                    .enumerate()
                {
                    let items: Vec<Value> = match pair.kind() {
                        ValueKind::Seq => pair.try_iter().map_err(|e| e.to_string())?.collect(),
                        _ => Vec::new(),
                    };
                    match items.as_slice() {
                        [q, r] if q.as_str().is_some() && r.as_str().is_some() => history.push((
                            q.as_str().unwrap_or_default().to_string(),
                            r.as_str().unwrap_or_default().to_string(),
                        )),
                        _ => {
                            return Err(format!(
                                "history[{i}] must be a [query, response] pair of strings"
                            ));
                        }
                    }
                }
            }
            let mut conv = Conversation::from_query(system.as_deref(), &history, &query, &response);
            conv.tools = tools;
            conv
        } else {
            return Err("expected `messages`, or `query` and `response`".into());
        };
        conv.check()?;
        Ok(conv)
    }

    /// The role of message `i`.
    pub fn role(&self, i: usize) -> Option<String> {
        attr(self.messages.get(i)?, "role").and_then(|r| r.as_str().map(str::to_string))
    }

    /// Number of assistant messages.
    pub fn assistant_turns(&self) -> usize {
        (0..self.messages.len())
            .filter(|&i| self.role(i).as_deref() == Some("assistant"))
            .count()
    }

    /// The checks of the module docs.
    pub fn check(&self) -> Result<(), String> {
        if self.messages.is_empty() {
            return Err("no messages".into());
        }
        for (i, m) in self.messages.iter().enumerate() {
            if m.kind() != ValueKind::Map {
                return Err(format!("messages[{i}] must be an object"));
            }
            let role = match attr(m, "role") {
                Some(r) if r.as_str().is_some() => r.as_str().unwrap_or_default().to_string(),
                _ => return Err(format!("messages[{i}] has no `role` string")),
            };
            if !ROLES.contains(&role.as_str()) {
                return Err(format!(
                    "messages[{i}]: unknown role {role:?} (expected system, user, assistant or tool)"
                ));
            }
            let tool_calls = attr(m, "tool_calls");
            if let Some(tc) = &tool_calls
                && (role != "assistant" || tc.kind() != ValueKind::Seq)
            {
                return Err(format!(
                    "messages[{i}]: `tool_calls` must be a list on an assistant message"
                ));
            }
            match attr(m, "content") {
                Some(c) if c.kind() == ValueKind::String => {}
                None if tool_calls.is_some() => {}
                Some(_) => {
                    return Err(format!(
                        "messages[{i}] ({role}): `content` must be a string"
                    ));
                }
                None => return Err(format!("messages[{i}] ({role}): `content` is missing")),
            }
            for key in ["content", "reasoning_content"] {
                if let Some(text) = attr(m, key).as_ref().and_then(|c| c.as_str())
                    && let Some(tok) = [IM_START, IM_END].into_iter().find(|t| text.contains(t))
                {
                    return Err(format!(
                        "messages[{i}] ({role}): `{key}` contains the chat template's control token {tok}"
                    ));
                }
            }
        }
        if self.assistant_turns() == 0 {
            return Err("no assistant message to train on".into());
        }
        Ok(())
    }
}

/// Maps ms-swift's `tool_call` / `tool_response` roles onto the template's `tool_calls` / `tool`.
fn normalize_roles(raw: Vec<Value>) -> Result<Vec<Value>, String> {
    let mut out: Vec<Value> = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        let role = attr(&m, "role").and_then(|r| r.as_str().map(str::to_string));
        match role.as_deref() {
            Some("tool_response") => out.push(map(with(pairs(&m), "role", Value::from("tool")))),
            Some("tool_call") => {
                let content = string(attr(&m, "content"), &format!("messages[{i}].content"))?;
                let call: Value = serde_json::from_str(&content).map_err(|e| {
                    format!("messages[{i}] (tool_call): content is not a JSON object: {e}")
                })?;
                if call.kind() != ValueKind::Map || attr(&call, "name").is_none() {
                    return Err(format!(
                        "messages[{i}] (tool_call): content must be {{\"name\": …, \"arguments\": …}}"
                    ));
                }
                let entry = map(vec![
                    (Value::from("type"), Value::from("function")),
                    (Value::from("function"), call),
                ]);
                let prev_is_assistant = out
                    .last()
                    .and_then(|p| attr(p, "role"))
                    .is_some_and(|r| r.as_str() == Some("assistant"));
                if prev_is_assistant {
                    let prev = out.pop().expect("checked above");
                    let mut calls: Vec<Value> = attr(&prev, "tool_calls")
                        .and_then(|c| c.try_iter().ok().map(|it| it.collect()))
                        .unwrap_or_default();
                    calls.push(entry);
                    out.push(map(with(pairs(&prev), "tool_calls", Value::from(calls))));
                } else {
                    out.push(map(vec![
                        (Value::from("role"), Value::from("assistant")),
                        (Value::from("content"), Value::from("")),
                        (Value::from("tool_calls"), Value::from(vec![entry])),
                    ]));
                }
            }
            _ => out.push(m),
        }
    }
    Ok(out)
}
