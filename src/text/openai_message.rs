//! OpenAI chat messages as chat templates see them, one mapping for serving and training: a
//! model fine-tuned on a `developer` or `tool` message is served the same prompt for it.

use crate::text::chat_template::{content_text, ChatMessage};
use serde_json::Value;

/// The roles an OpenAI chat message may carry.
pub const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// The role is missing or not one of [`ROLES`] (the role given, empty when missing).
    Role(String),
    /// The content is not text.
    Content(String),
}

/// One OpenAI chat message as the template's message: its role mapped (templates written
/// before `developer` existed know it as `system`; the deprecated `function` role is a tool
/// result), its content as text, and its `name`, `tool_call_id` and `tool_calls`.
pub fn from_openai(m: &Value) -> Result<ChatMessage, MessageError> {
    let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
    if !ROLES.contains(&role) {
        return Err(MessageError::Role(role.to_string()));
    }
    let content =
        content_text(m.get("content"), role == "assistant").map_err(MessageError::Content)?;
    let role = match role {
        "developer" => "system",
        "function" => "tool",
        r => r,
    };
    let mut message = ChatMessage::new(role, content);
    message.name = m.get("name").and_then(Value::as_str).map(String::from);
    message.tool_call_id = m
        .get("tool_call_id")
        .and_then(Value::as_str)
        .map(String::from);
    message.tool_calls = m.get("tool_calls").filter(|v| !v.is_null()).cloned();
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roles_map_and_fields_carry_over() {
        let m = from_openai(&json!({"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]})).unwrap();
        assert_eq!(
            (m.role.as_str(), m.content.as_str()),
            ("system", "Be brief.")
        );
        let m = from_openai(&json!({"role": "function", "name": "f", "content": "42"})).unwrap();
        assert_eq!((m.role.as_str(), m.name.as_deref()), ("tool", Some("f")));
        let m = from_openai(
            &json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c"}]}),
        )
        .unwrap();
        assert!(m.content.is_empty() && m.tool_calls.is_some());
        assert_eq!(
            from_openai(&json!({"role": "wizard", "content": "x"})),
            Err(MessageError::Role("wizard".into()))
        );
        assert!(matches!(
            from_openai(&json!({"role": "user", "content": [{"type": "image_url"}]})),
            Err(MessageError::Content(_))
        ));
        assert!(matches!(
            from_openai(&json!({"role": "user", "content": null})),
            Err(MessageError::Content(_))
        ));
    }
}
