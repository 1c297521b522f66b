//! The `structured_outputs` extension of chat and legacy completions, in the style of vLLM's
//! (for what `response_format` cannot say): exactly one of `regex` (the whole output matches
//! it), `grammar` (a Lark grammar, llguidance's dialect), `choice` (one of these strings) or
//! `json` (a JSON Schema).

use crate::api::validation::{self, ValidationError};
use crate::engine::constraint::{lark_literal, Spec};
use crate::settings::Limits;
use serde_json::Value;

/// The body's `structured_outputs` into a constraint (None when absent or null).
pub fn spec(value: Option<&Value>, limits: &Limits) -> Result<Option<Spec>, ValidationError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let invalid = |reason: &str| ValidationError::StructuredOutputs(reason.to_string());
    let object = value.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
        invalid("expected an object with one of `regex`, `grammar`, `choice` or `json`")
    })?;
    let (kind, body) = object.iter().next().expect("one entry");
    let text = |what: &str| -> Result<String, ValidationError> {
        let text = body
            .as_str()
            .ok_or_else(|| invalid(&format!("`{what}` must be a string")))?;
        if text.len() > limits.max_schema_bytes {
            return Err(ValidationError::TooLarge {
                param: "structured_outputs".into(),
                what: format!("{} bytes", text.len()),
                max: limits.max_schema_bytes,
            });
        }
        Ok(text.to_string())
    };
    match kind.as_str() {
        "regex" => Ok(Some(Spec::Regex(text("regex")?))),
        "grammar" => Ok(Some(Spec::Lark(text("grammar")?))),
        "json" => {
            if !(body.is_object() || body.is_boolean()) {
                return Err(invalid("`json` must be a JSON Schema object"));
            }
            validation::schema_within("structured_outputs", body, limits)?;
            Ok(Some(Spec::JsonSchema(body.clone())))
        }
        "choice" => {
            let choices: Vec<&str> = body
                .as_array()
                .filter(|c| !c.is_empty())
                .and_then(|c| c.iter().map(Value::as_str).collect())
                .ok_or_else(|| invalid("`choice` must be a non-empty array of strings"))?;
            validation::at_most("structured_outputs", choices.len(), limits.max_tools * 8)?;
            let alternatives: Vec<String> = choices.iter().map(|c| lark_literal(c)).collect();
            Ok(Some(Spec::Lark(format!(
                "start: {}\n",
                alternatives.join(" | ")
            ))))
        }
        other => Err(invalid(&format!(
            "unknown kind `{other}`; expected regex, grammar, choice or json"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_kind_becomes_its_constraint_and_bad_shapes_name_the_parameter() {
        let limits = Limits::default();
        let spec = |v: Value| spec(Some(&v), &limits);
        assert!(matches!(
            spec(json!({"regex": "[0-9]+"})),
            Ok(Some(Spec::Regex(_)))
        ));
        assert!(matches!(
            spec(json!({"grammar": "start: \"a\""})),
            Ok(Some(Spec::Lark(_)))
        ));
        assert!(matches!(
            spec(json!({"json": {"type": "object"}})),
            Ok(Some(Spec::JsonSchema(_)))
        ));
        match spec(json!({"choice": ["yes", "no \"quoted\""]})) {
            Ok(Some(Spec::Lark(g))) => assert_eq!(g, "start: \"yes\" | \"no \\\"quoted\\\"\"\n"),
            other => panic!("{other:?}"),
        }
        assert!(spec(json!(null)).unwrap().is_none());
        for bad in [
            json!("x"),
            json!({}),
            json!({"regex": 1}),
            json!({"choice": []}),
            json!({"regex": "a", "json": {}}),
            json!({"sql": "x"}),
        ] {
            let e = spec(bad.clone()).unwrap_err();
            assert_eq!(e.param().as_deref(), Some("structured_outputs"), "{bad}");
        }
    }
}
