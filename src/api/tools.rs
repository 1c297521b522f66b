//! Tool (function) calling: validating `tools` / `tool_choice`, and reading the calls a model
//! wrote back out of its text.
//!
//! Models trained for tools write calls in one of two common shapes, both recognised:
//! - Hermes / Qwen 2.5 style, one JSON object per `<tool_call>...</tool_call>` block (a list
//!   of objects in one block is accepted too, as SmolLM2 and others write it);
//! - the whole reply being a JSON call object or a list of them (Llama 3.1 style), with the
//!   arguments under `arguments` or `parameters`.

use crate::api::validation::{self, ValidationError};
use crate::engine::constraint::{lark_literal, with_layout, Spec};
use crate::settings::Limits;
use crate::text::chat_template::ChatMessage;
use serde_json::{json, Value};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The validated `tools` and whether the model should be offered them.
#[derive(Debug, Clone, Default)]
pub struct ToolSetup {
    /// Passed to the chat template (None: no tools, or `tool_choice: "none"`).
    pub tools: Option<Value>,
    /// With `tool_choice` `required` or a named function: the grammar of the call the reply must
    /// be, in the format [`parse`] reads.
    pub forced: Option<Spec>,
}

/// The grammar of one call of one of `tools` (the `function` objects), in the Hermes format:
/// `<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`, ARGS valid against the
/// tool's `parameters` (an object with no keys when it has none).
pub fn call_grammar(tools: &[&Value]) -> Spec {
    let mut lark = String::from("start: ");
    let mut rules = String::new();
    for (i, function) in tools.iter().enumerate() {
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let parameters = function
            .get("parameters")
            .cloned()
            .unwrap_or(json!({"type": "object", "properties": {}, "additionalProperties": false}));
        if i > 0 {
            lark.push_str(" | ");
        }
        lark.push_str(&format!("call_{i}"));
        rules.push_str(&format!(
            "call_{i}: {} args_{i} {}\nargs_{i}: %json {}\n",
            lark_literal(&format!(
                "{OPEN}\n{{\"name\": {}, \"arguments\": ",
                lark_literal(name)
            )),
            lark_literal(&format!("}}\n{CLOSE}")),
            with_layout(&parameters),
        ));
    }
    lark.push('\n');
    lark.push_str(&rules);
    Spec::Lark(lark)
}

/// For a chat template that knows nothing of tools (as llama.cpp's server does for such
/// templates): the tools are described in the system message, with the call format [`parse`]
/// reads and [`call_grammar`] enforces, and earlier calls are written back into their assistant
/// turns in that format, so any model can be offered tools.
pub fn describe_in_messages(messages: &mut Vec<ChatMessage>, tools: &Value) {
    let signatures: Vec<String> = tools
        .as_array()
        .into_iter()
        .flatten()
        .map(|tool| tool.get("function").unwrap_or(tool).to_string())
        .collect();
    let description = format!(
        "You can call functions to help with the user's request. Their signatures, one JSON \
         object per line:\n{OPEN_LIST}\n{}\n{CLOSE_LIST}\nTo call one, reply with one block per \
         call and nothing else:\n{OPEN}\n{{\"name\": \"<function name>\", \"arguments\": \
         <arguments as a JSON object>}}\n{CLOSE}",
        signatures.join("\n")
    );
    for message in messages.iter_mut() {
        let Some(calls) = message.tool_calls.take() else {
            continue;
        };
        for call in calls.as_array().into_iter().flatten() {
            let function = call.get("function").unwrap_or(call);
            let arguments = match function.get("arguments") {
                // OpenAI sends arguments as a JSON string.
                Some(Value::String(text)) => {
                    serde_json::from_str(text).unwrap_or(Value::String(text.clone()))
                }
                Some(value) => value.clone(),
                None => json!({}),
            };
            let name = function.get("name").cloned().unwrap_or(Value::Null);
            let call = json!({"name": name, "arguments": arguments});
            if !message.content.is_empty() {
                message.content.push('\n');
            }
            message
                .content
                .push_str(&format!("{OPEN}\n{call}\n{CLOSE}"));
        }
    }
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{description}", first.content);
        }
        _ => messages.insert(0, ChatMessage::new("system", description)),
    }
}

const OPEN_LIST: &str = "<tools>";
const CLOSE_LIST: &str = "</tools>";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub fn validate(
    tools: Option<&[Value]>,
    tool_choice: Option<&Value>,
    limits: &Limits,
) -> Result<ToolSetup, ValidationError> {
    let tools = tools.unwrap_or_default();
    validation::at_most("tools", tools.len(), limits.max_tools)?;
    let mut names = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let kind = tool
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("function");
        if kind != "function" {
            return Err(ValidationError::Tools(format!(
                "tools[{i}] has type `{kind}`; only `function` tools are supported"
            )));
        }
        let name = tool
            .pointer("/function/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !valid_name(name) {
            return Err(ValidationError::Tools(format!(
                "tools[{i}].function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -"
            )));
        }
        if let Some(p) = tool.pointer("/function/parameters") {
            if !p.is_object() {
                return Err(ValidationError::Tools(format!(
                    "tools[{i}].function.parameters must be a JSON Schema object"
                )));
            }
            validation::schema_within(&format!("tools[{i}].function.parameters"), p, limits)?;
        }
        names.push(name);
    }
    let functions = || tools.iter().filter_map(|t| t.get("function"));
    let mut forced = None;
    let offered = match tool_choice {
        None | Some(Value::Null) => !tools.is_empty(),
        Some(Value::String(s)) => match s.as_str() {
            "none" => false,
            "auto" | "required" => {
                if tools.is_empty() {
                    return Err(ValidationError::ToolChoice(format!(
                        "`{s}` needs a non-empty `tools` list"
                    )));
                }
                if s == "required" {
                    forced = Some(call_grammar(&functions().collect::<Vec<_>>()));
                }
                true
            }
            other => {
                return Err(ValidationError::ToolChoice(format!(
                    "unknown value `{other}`"
                )))
            }
        },
        Some(choice @ Value::Object(_)) => {
            match choice.get("type").and_then(Value::as_str) {
                Some("function") => {
                    let name = choice
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if !names.contains(&name) {
                        return Err(ValidationError::ToolChoice(format!(
                            "function `{name}` is not among `tools`"
                        )));
                    }
                    let chosen: Vec<&Value> = functions()
                        .filter(|f| f.get("name").and_then(Value::as_str) == Some(name))
                        .take(1)
                        .collect();
                    forced = Some(call_grammar(&chosen));
                }
                Some("allowed_tools") => {}
                _ => {
                    return Err(ValidationError::ToolChoice(
                        "expected a `function` or `allowed_tools` choice".into(),
                    ))
                }
            }
            !tools.is_empty()
        }
        Some(_) => {
            return Err(ValidationError::ToolChoice(
                "expected a string or an object".into(),
            ))
        }
    };
    Ok(ToolSetup {
        tools: offered.then(|| Value::Array(tools.to_vec())),
        forced,
    })
}

/// Tool calls found in a reply, and the text outside them.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub content: String,
    /// OpenAI `tool_calls` entries (`{id, type, function: {name, arguments}}`).
    pub calls: Vec<Value>,
}

/// One call object from the model: `{"name", "arguments" | "parameters"}`.
fn call(value: &Value) -> Option<Value> {
    let name = value.get("name")?.as_str()?;
    let arguments = value
        .get("arguments")
        .or_else(|| value.get("parameters"))
        .cloned()
        .unwrap_or(json!({}));
    // OpenAI sends the arguments as a JSON-encoded string.
    let arguments = match arguments {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(json!({
        "id": format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }))
}

/// Calls in one JSON text: an object or a list of objects.
fn calls_in(text: &str) -> Option<Vec<Value>> {
    match serde_json::from_str::<Value>(text.trim()).ok()? {
        Value::Array(items) if !items.is_empty() => items.iter().map(call).collect(),
        v @ Value::Object(_) => Some(vec![call(&v)?]),
        _ => None,
    }
}

pub fn parse(text: &str) -> Parsed {
    if text.contains(OPEN) {
        let mut content = String::new();
        let mut calls = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find(OPEN) {
            content.push_str(&rest[..start]);
            let after = &rest[start + OPEN.len()..];
            let (body, next) = match after.find(CLOSE) {
                Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
                // A reply cut off before the closing tag still carries its call.
                None => (after, ""),
            };
            match calls_in(body) {
                Some(found) => calls.extend(found),
                None => content.push_str(&rest[start..rest.len() - next.len()]),
            }
            rest = next;
        }
        content.push_str(rest);
        return Parsed {
            content: content.trim().to_string(),
            calls,
        };
    }
    match calls_in(text) {
        Some(calls) => Parsed {
            content: String::new(),
            calls,
        },
        None => Parsed {
            content: text.to_string(),
            calls: Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}})
    }

    #[test]
    fn tool_lists_and_choices_are_validated() {
        let tools = [tool("get_weather")];
        assert!(validate(Some(&tools), None, &Limits::default())
            .unwrap()
            .tools
            .is_some());
        assert!(
            validate(Some(&tools), Some(&json!("none")), &Limits::default())
                .unwrap()
                .tools
                .is_none()
        );
        assert!(validate(None, None, &Limits::default())
            .unwrap()
            .tools
            .is_none());
        assert!(validate(Some(&[tool("bad name")]), None, &Limits::default()).is_err());
        assert!(validate(Some(&tools), Some(&json!("sometimes")), &Limits::default()).is_err());
        assert!(validate(None, Some(&json!("required")), &Limits::default()).is_err());
        let named = json!({"type": "function", "function": {"name": "other"}});
        assert_eq!(
            validate(Some(&tools), Some(&named), &Limits::default())
                .unwrap_err()
                .param()
                .as_deref(),
            Some("tool_choice")
        );
    }

    #[test]
    fn required_and_named_choices_force_a_call() {
        let tools = [tool("get_weather"), tool("get_time")];
        let limits = Limits::default();
        let grammar = |choice: Value| match validate(Some(&tools), Some(&choice), &limits)
            .unwrap()
            .forced
        {
            Some(Spec::Lark(lark)) => Some(lark),
            _ => None,
        };
        assert!(grammar(json!("auto")).is_none());
        let required = grammar(json!("required")).unwrap();
        assert!(required.contains("get_weather") && required.contains("get_time"));
        let named = grammar(json!({"type": "function", "function": {"name": "get_time"}})).unwrap();
        assert!(named.contains("get_time") && !named.contains("get_weather"));
        assert!(named.contains("\\\"arguments\\\": ") && named.contains("%json"));
    }

    #[test]
    fn hermes_blocks_are_calls() {
        let p = parse("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>");
        assert_eq!(p.content, "Let me check.");
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0]["function"]["name"], "get_weather");
        assert_eq!(p.calls[0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert!(p.calls[0]["id"].as_str().unwrap().starts_with("call_"));
        // A list in one block, and an unterminated block.
        let p = parse("<tool_call>[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": \"{}\"}]");
        assert_eq!(p.calls.len(), 2);
        assert_eq!(p.calls[1]["function"]["arguments"], "{}");
    }

    #[test]
    fn bare_json_calls_and_plain_text() {
        let p = parse("{\"name\": \"lookup\", \"parameters\": {\"q\": 1}}");
        assert_eq!((p.content.as_str(), p.calls.len()), ("", 1));
        let p = parse("The answer is {\"x\": 1}");
        assert!(p.calls.is_empty());
        assert_eq!(p.content, "The answer is {\"x\": 1}");
        // A block that is not a call stays text.
        assert_eq!(
            parse("<tool_call>oops</tool_call>").content,
            "<tool_call>oops</tool_call>"
        );
    }
}
