//! Property-based fuzzing of what a client controls, through the library's public parsing and
//! validation functions (no server): request bodies, query strings, `response_format` schemas
//! and the grammars they compile to, chat messages and their template, tool calls in model
//! output, `rewind.scheme`, and training files. The properties: nothing panics, overflows or
//! hangs; every refusal of a JSON object names the parameter at fault; every training-file error
//! names a line that exists.
//!
//! 256 cases per property (well under a second in all; `PROPTEST_CASES=20000` for a longer
//! hunt); failures are not persisted to disk.

use proptest::prelude::*;
use proptest::test_runner::Config;
use rewind::api::chat::{self, ChatCompletionRequest};
use rewind::api::completions::CompletionRequest;
use rewind::api::error::ApiError;
use rewind::api::extractors::parse_query;
use rewind::api::validation::{self, ValidationError};
use rewind::api::{
    files::ListQuery, fine_tuning::PageQuery, legacy_fine_tunes::EventsQuery, tools,
};
use rewind::engine::constraint::{Grammar, Spec, TokenTable};
use rewind::model::reversible::ReversibleConfig;
use rewind::settings::Limits;
use rewind::text::chat_template::ChatTemplate;
use rewind::train::data::{parse_jsonl, parse_line};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const VOCAB: usize = 49_152;
const TOOLS_TEMPLATE: &str = "{%- if tools %}<|im_start|>system\nYou may call these tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// 256 cases per property, or `PROPTEST_CASES` for a longer hunt.
fn config() -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Small limits, so random values cross them.
/// SmolLM2's tokenizer and its constrained-decoding table, built once per test binary.
fn vocabulary() -> &'static (rewind::text::tokenizer::TextTokenizer, TokenTable) {
    static TABLE: std::sync::OnceLock<(rewind::text::tokenizer::TextTokenizer, TokenTable)> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let path = rewind::provision::resolve(Some(rewind::provision::BASE_MODEL))
            .expect("the base model is provisioned (run `rewind pull`)");
        let mut file = std::fs::File::open(path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let tokenizer =
            rewind::text::tokenizer::TextTokenizer::from_gguf_metadata(&content.metadata).unwrap();
        let table = TokenTable::new(&tokenizer, tokenizer.vocab_size());
        (tokenizer, table)
    })
}

/// A schema compiled for SmolLM2's vocabulary, as the server compiles a request's.
fn compile(schema: &Value) -> anyhow::Result<std::sync::Arc<Grammar>> {
    vocabulary().1.compile(&Spec::JsonSchema(schema.clone()))
}

/// Feeds `bytes` (as text) token by token while the grammar allows them; how many it took.
fn feed(grammar: &Grammar, bytes: &[u8]) -> usize {
    let ids = vocabulary()
        .0
        .encode(&String::from_utf8_lossy(bytes), false)
        .unwrap_or_default();
    let mut c = grammar.start();
    let mut fed = 0;
    for id in ids {
        match c.mask() {
            Ok(mask) if mask.is_allowed(id) && c.advance(id).is_ok() => fed += 1,
            _ => break,
        }
    }
    let _ = c.is_accepting();
    fed
}

fn limits() -> Limits {
    Limits {
        max_messages: 8,
        max_tools: 4,
        max_logit_bias: 4,
        max_stop_chars: 16,
        max_schema_bytes: 8 << 10,
        max_n: 4,
        max_tokens: 64,
        ..Limits::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies.

/// Request fields, schema keywords and training-file keys, so random objects hit real paths.
const KEYS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "include_usage",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "echo",
    "best_of",
    "suffix",
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "type",
    "text",
    "function",
    "parameters",
    "json_schema",
    "schema",
    "properties",
    "items",
    "required",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "additionalProperties",
    "minItems",
    "maxItems",
    "completion",
    "0",
    "5",
    "-1",
    "",
];

const STRINGS: &[&str] = &[
    "tiny",
    "user",
    "assistant",
    "system",
    "developer",
    "tool",
    "function",
    "text",
    "image_url",
    "json_object",
    "json_schema",
    "object",
    "array",
    "string",
    "number",
    "integer",
    "boolean",
    "null",
    "none",
    "auto",
    "required",
    "#",
    "#/$defs/a",
    "#/$defs/b",
    "\u{0}",
    "<tool_call>",
    "{{ 7*7 }}",
    "",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(KEYS).prop_map(String::from),
        1 => ".{0,8}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-3i64..70).prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        prop::sample::select(STRINGS).prop_map(|s| json!(s)),
        ".{0,16}".prop_map(Value::String),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(key(), arb_json(), 0..12)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// A chat request: the required fields, then random fields over them.
fn arb_chat_body() -> impl Strategy<Value = Value> {
    (arb_messages(), arb_object()).prop_map(|(messages, extra)| {
        let mut body = json!({"model": "tiny", "messages": messages});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    })
}

fn arb_message() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => (prop::sample::select(STRINGS), prop_oneof![
                ".{0,24}".prop_map(Value::String),
                arb_json(),
                prop::collection::vec((prop::sample::select(STRINGS), ".{0,8}"), 0..3).prop_map(|parts| {
                    Value::Array(parts.into_iter().map(|(t, s)| json!({"type": t, "text": s})).collect())
                }),
            ])
            .prop_map(|(role, content)| json!({"role": role, "content": content})),
        1 => arb_json(),
    ]
}

fn arb_messages() -> impl Strategy<Value = Value> {
    prop::collection::vec(arb_message(), 0..10).prop_map(Value::Array)
}

const TYPES: [&str; 7] = [
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// JSON Schemas, hostile ones included: recursion through `$ref`, alternatives, type lists,
/// bounds, odd `required` lists.
fn arb_schema() -> impl Strategy<Value = Value> {
    let fixed = prop::sample::select(vec![
        json!(true),
        json!(false),
        json!({}),
        json!({"$ref": "#"}),
        json!({"$ref": "#/$defs/a"}),
        json!({"$ref": "#/$defs/b"}),
        json!({"$ref": "#/nowhere"}),
    ]);
    let leaf = prop_oneof![
        prop::sample::select(TYPES.to_vec()).prop_map(|t| json!({"type": t})),
        prop::sample::subsequence(TYPES.to_vec(), 0..=7).prop_map(|t| json!({"type": t})),
        fixed,
        leaf().prop_map(|v| json!({"const": v})),
        prop::collection::vec(leaf(), 0..6).prop_map(|v| json!({"enum": v})),
        leaf(),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            (
                prop::collection::btree_map(key(), inner.clone(), 0..5),
                prop::collection::vec(key(), 0..3),
                prop_oneof![Just(None), any::<bool>().prop_map(|b| Some(json!(b))), inner.clone().prop_map(Some)],
            )
                .prop_map(|(props, required, additional)| {
                    let mut s = json!({"type": "object", "properties": props.into_iter().collect::<serde_json::Map<_, _>>()});
                    if !required.is_empty() {
                        s["required"] = json!(required);
                    }
                    if let Some(a) = additional {
                        s["additionalProperties"] = a;
                    }
                    s
                }),
            (inner.clone(), prop::option::of(0u64..5), prop::option::of(0u64..5), any::<bool>())
                .prop_map(|(items, min, max, huge)| {
                    let mut s = json!({"type": "array", "items": items});
                    if let Some(m) = min {
                        s["minItems"] = json!(if huge { u64::MAX } else { m });
                    }
                    if let Some(m) = max {
                        s["maxItems"] = json!(m);
                    }
                    s
                }),
            (prop::sample::select(vec!["anyOf", "oneOf", "allOf"]), prop::collection::vec(inner.clone(), 0..4))
                .prop_map(|(k, v)| json!({k: v})),
            (prop::sample::subsequence(TYPES.to_vec(), 1..=7), inner.clone())
                .prop_map(|(types, child)| json!({"type": types, "properties": {"a": child.clone()}, "items": child})),
            (inner.clone(), inner.clone(), inner).prop_map(|(root, a, b)| {
                let mut root = if root.is_object() { root } else { json!({"$ref": "#/$defs/a"}) };
                root["$defs"] = json!({"a": a, "b": b});
                root
            }),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// (a) Request parsing and validation.

/// A refusal of a JSON object names its parameter; every refusal maps to a 400 in the envelope.
fn check_refusal(e: &ValidationError, body_is_object: bool) -> Result<(), TestCaseError> {
    let api = ApiError::from(e.clone());
    prop_assert_eq!(api.status.as_u16(), 400);
    let envelope = api.body();
    prop_assert!(envelope["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    prop_assert!(envelope["error"]["code"].is_string());
    if body_is_object && !matches!(e, ValidationError::InvalidJson(_)) {
        prop_assert!(e.param().is_some(), "a refusal names no parameter: {e}");
    }
    Ok(())
}

/// The engine never re-checks: what the API accepts, the sampler accepts (a value it refuses
/// mid-request is a 500).
fn check_sampling(
    sampling: &validation::SamplingFields,
    limits: &Limits,
) -> Result<(), TestCaseError> {
    match sampling.validate(VOCAB, limits) {
        Ok(s) => {
            let checked = s.params.validate();
            prop_assert!(
                checked.is_ok(),
                "accepted, then refused by the sampler: {checked:?} ({sampling:?})"
            );
        }
        Err(e) => check_refusal(&e, true)?,
    }
    Ok(())
}

/// Everything the chat handler does with a body before it needs a served model.
fn validate_chat(bytes: &[u8]) -> Result<(), TestCaseError> {
    let is_object = serde_json::from_slice::<Value>(bytes).is_ok_and(|v| v.is_object());
    let parsed = validation::parse_generation_body::<ChatCompletionRequest>(bytes);
    let (request, sampling) = match parsed {
        Ok(p) => p,
        Err(e) => return check_refusal(&e, is_object),
    };
    prop_assert!(is_object);
    let limits = limits();
    check_sampling(&sampling, &limits)?;
    if let Err(e) = validation::at_most("messages", request.messages.len(), limits.max_messages) {
        check_refusal(&e, true)?;
    }
    let messages = chat::messages(&request.messages);
    if let Err(e) = &messages {
        check_refusal(e, true)?;
    }
    let setup = tools::validate(
        request.tools.as_deref(),
        request.tool_choice.as_ref(),
        &limits,
    );
    if let Err(e) = &setup {
        check_refusal(e, true)?;
    }
    let started = Instant::now();
    match chat::response_format(request.response_format.as_ref(), &limits) {
        Ok(Some(spec)) => {
            if let Ok(grammar) = vocabulary().1.compile(&spec) {
                feed(&grammar, br#"{"a": [1, "x", null, true], "b": {}}"#);
            }
        }
        Ok(None) => {}
        Err(e) => check_refusal(&e, true)?,
    }
    prop_assert!(
        started.elapsed() < Duration::from_secs(2),
        "response_format took {:?}",
        started.elapsed()
    );
    // The template renders what validation let through, or refuses it: never a panic.
    if let (Ok(messages), Ok(setup)) = (messages, setup) {
        let template =
            ChatTemplate::new("fuzz", TOOLS_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap();
        let _ = template.render(&messages, true, setup.tools.as_ref());
        let _ = ChatTemplate::chatml_default()
            .unwrap()
            .render(&messages, true, None);
    }
    for max in [
        None,
        Some(-1),
        Some(0),
        Some(1),
        Some(i64::MAX),
        Some(i64::MIN),
    ] {
        let _ = validation::max_tokens(max, "max_tokens", 10, 100, 50, "messages");
    }
    Ok(())
}

fn validate_completion(bytes: &[u8]) -> Result<(), TestCaseError> {
    let is_object = serde_json::from_slice::<Value>(bytes).is_ok_and(|v| v.is_object());
    match validation::parse_generation_body::<CompletionRequest>(bytes) {
        Ok((_, sampling)) => check_sampling(&sampling, &limits())?,
        Err(e) => check_refusal(&e, is_object)?,
    }
    Ok(())
}

/// f64s at the edges of f32: subnormal, tiny, huge, and ordinary.
fn edge_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()),
        prop::sample::select(vec![
            5e-324, 1e-50, 1e-45, 1.2e-38, 3.4e38, 3.5e38, 1e300, -0.0, 0.0, 1.0, 2.0, 100.0, 100.5
        ]),
        -3.0f64..3.0,
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sampling_values_the_api_accepts_the_sampler_accepts(
        fields in prop::collection::vec((prop::sample::select(vec![
            "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
        ]), edge_f64()), 0..6),
        bias in prop::collection::btree_map((0u32..60_000).prop_map(|i| i.to_string()), edge_f64(), 0..4),
    ) {
        let mut body = json!({"model": "m", "messages": [], "logit_bias": bias});
        for (k, v) in fields {
            body[k] = json!(v);
        }
        let sampling: validation::SamplingFields = validation::from_object(&body).unwrap();
        check_sampling(&sampling, &Limits::default())?;
    }

    #[test]
    fn arbitrary_bytes_are_refused_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        validate_chat(&bytes)?;
        validate_completion(&bytes)?;
        if let Err(e) = validation::json_object(&bytes) {
            check_refusal(&e, false)?;
        }
        let _ = validation::parse_body::<rewind::store::RewindOptions>(&bytes);
        let _ = tools::parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_json_is_parsed_or_refused_naming_the_parameter(value in arb_json()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        validate_chat(&bytes)?;
        validate_completion(&bytes)?;
    }

    #[test]
    fn arbitrary_chat_requests_are_validated_or_refused_naming_the_parameter(body in arb_chat_body()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        validate_chat(&bytes)?;
        // Reading from the parsed value gives the same answer as reading the bytes (the same
        // parameter and code: the messages may differ in a float's last digit).
        let a = validation::parse_generation_body::<ChatCompletionRequest>(&bytes).err();
        let b = validation::from_object::<ChatCompletionRequest>(&body)
            .and_then(|_| validation::from_object::<validation::SamplingFields>(&body))
            .err();
        let named = |e: Option<ValidationError>| e.map(|e| (e.param(), e.code()));
        prop_assert_eq!(named(a), named(b));
    }

    #[test]
    fn rewind_options_are_parsed_or_refused_naming_the_parameter(options in arb_json()) {
        let body = json!({"rewind": options});
        if let Err(e) = validation::from_object::<RewindBody>(&body) {
            check_refusal(&e, true)?;
            prop_assert!(e.param().is_some_and(|p| p.starts_with("rewind")), "{e}");
        }
    }

    #[test]
    fn query_strings_never_fail_outside_a_400(query in ".{0,64}", bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let raw: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
        for q in [query.clone(), format!("limit={raw}"), format!("after={raw}&purpose={raw}"), format!("{raw}={raw}")] {
            for e in [
                parse_query::<ListQuery>(&q).err(),
                parse_query::<PageQuery>(&q).err(),
                parse_query::<EventsQuery>(&q).err(),
            ].into_iter().flatten() {
                prop_assert_eq!(e.status.as_u16(), 400);
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn a_limit_that_is_not_a_count_is_refused_naming_limit(
        limit in prop_oneof![".{0,12}", any::<i64>().prop_map(|n| n.to_string()), Just("99999999999999999999".to_string())],
        after in ".{0,12}",
    ) {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("after", &after)
            .append_pair("limit", &limit)
            .finish();
        let result = parse_query::<PageQuery>(&query);
        if limit.parse::<usize>().is_ok() {
            prop_assert!(result.is_ok(), "{query}");
        } else {
            let e = result.err().unwrap();
            prop_assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("limit")), "{}", query);
        }
        prop_assert!(parse_query::<ListQuery>(&query).is_ok() == limit.parse::<usize>().is_ok());
    }

    #[test]
    fn schemas_compile_or_are_refused_and_grammars_do_not_hang(
        schema in arb_schema(),
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        document in arb_json(),
    ) {
        let started = Instant::now();
        let limits = limits();
        let wrapped = json!({"type": "json_schema", "json_schema": {"name": "f", "schema": schema.clone()}});
        if let Err(e) = chat::response_format(Some(&wrapped), &limits) {
            let param = e.param();
            prop_assert_eq!(param.as_deref(), Some("response_format"));
        }
        let _ = validation::schema_within("response_format", &schema, &limits);
        if validation::schema_within("response_format", &schema, &limits).is_ok() {
            if let Ok(grammar) = compile(&schema) {
                for input in [bytes.clone(), serde_json::to_vec(&document).unwrap(), serde_json::to_vec_pretty(&document).unwrap()] {
                    feed(&grammar, &input);
                }
            }
        }
        prop_assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }

    #[test]
    fn arbitrary_json_as_a_schema_never_panics(value in arb_json(), bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        let started = Instant::now();
        if validation::schema_within("response_format", &value, &limits()).is_ok() {
            if let Ok(grammar) = compile(&value) {
                feed(&grammar, &bytes);
            }
        }
        prop_assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn schemes_parse_or_are_refused(
        spec in prop_oneof![
            ".{0,24}",
            (prop::sample::select(vec!["euler", "midpoint", "midpoint_a", "leapfrog", "hamiltonian", "x", ""]),
             prop::collection::vec((prop::sample::select(vec!["a", "h", "q", ""]), prop_oneof![".{0,6}", any::<f64>().prop_map(|f| f.to_string()), Just("inf".to_string()), Just("NaN".to_string())]), 0..4),
             any::<bool>())
                .prop_map(|(name, args, close)| {
                    let args: Vec<String> = args.into_iter().map(|(k, v)| if k.is_empty() { v } else { format!("{k}={v}") }).collect();
                    format!("{name}({}{}", args.join(","), if close { ")" } else { "" })
                }),
        ],
    ) {
        if let Ok(config) = ReversibleConfig::parse(&spec) {
            let _ = config.label();
            let _ = config.validate(2);
        }
    }

    #[test]
    fn tool_calls_in_model_output_never_panic(
        parts in prop::collection::vec(prop_oneof![
            Just("<tool_call>".to_string()), Just("</tool_call>".to_string()),
            arb_json().prop_map(|v| v.to_string()), ".{0,12}",
        ], 0..8),
    ) {
        let text = parts.concat();
        let parsed = tools::parse(&text);
        for call in &parsed.calls {
            prop_assert!(call["function"]["name"].is_string());
            prop_assert!(call["function"]["arguments"].is_string());
        }
    }
}

/// Reads `rewind` from a body as both job APIs do (their own request types are private).
#[derive(serde::Deserialize)]
struct RewindBody {
    #[allow(dead_code)]
    rewind: Option<rewind::store::RewindOptions>,
}

// ---------------------------------------------------------------------------------------------
// (b) Training files.

/// A training line: valid chats and prompt/completion pairs, near misses, and anything.
fn arb_training_line() -> impl Strategy<Value = String> {
    let role = prop::sample::select(vec![
        "system",
        "developer",
        "user",
        "assistant",
        "tool",
        "robot",
        "",
    ]);
    let message = (
        role,
        prop_oneof![".{0,12}".prop_map(Value::String), leaf(), arb_json()],
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    prop_oneof![
        3 => prop::collection::vec(message, 0..5).prop_map(|m| json!({"messages": m}).to_string()),
        1 => (".{0,12}", ".{0,12}").prop_map(|(p, c)| json!({"prompt": p, "completion": c}).to_string()),
        1 => (leaf(), leaf()).prop_map(|(p, c)| json!({"prompt": p, "completion": c}).to_string()),
        1 => arb_json().prop_map(|v| v.to_string()),
        1 => "[^\n]{0,40}",
        1 => Just(String::new()),
        1 => Just("   \t".to_string()),
    ]
}

fn check_jsonl(text: &str) -> Result<(), TestCaseError> {
    let lines: Vec<&str> = text.lines().collect();
    match parse_jsonl(text) {
        Ok(examples) => {
            let filled = lines.iter().filter(|l| !l.trim().is_empty()).count();
            prop_assert_eq!(examples.len(), filled);
            prop_assert!(filled > 0);
        }
        Err(errors) => {
            prop_assert!(!errors.is_empty());
            let mut previous = 0;
            for e in &errors {
                prop_assert!(
                    e.line >= 1 && e.line <= lines.len().max(1),
                    "line {} of {}",
                    e.line,
                    lines.len()
                );
                prop_assert!(e.line > previous, "errors out of order");
                previous = e.line;
                prop_assert!(
                    e.to_string().starts_with(&format!("line {}: ", e.line)),
                    "{}",
                    e
                );
                prop_assert!(!e.reason.is_empty());
                if let Some(line) = lines.get(e.line - 1) {
                    if !line.trim().is_empty() {
                        prop_assert!(
                            parse_line(line).is_err(),
                            "line {} is valid: {line:?}",
                            e.line
                        );
                    }
                }
            }
            // Every invalid line is reported, not only the first.
            for (i, line) in lines.iter().enumerate() {
                if !line.trim().is_empty() && parse_line(line).is_err() {
                    prop_assert!(
                        errors.iter().any(|e| e.line == i + 1),
                        "line {} not reported",
                        i + 1
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_as_a_training_file(text in "(?s).{0,400}") {
        check_jsonl(&text)?;
    }

    #[test]
    fn arbitrary_bytes_as_a_training_file(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check_jsonl(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn arbitrary_json_lines_as_a_training_file(
        lines in prop::collection::vec(arb_training_line(), 0..12),
        crlf in any::<bool>(),
    ) {
        let text = lines.join(if crlf { "\r\n" } else { "\n" });
        check_jsonl(&text)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic extremes the strategies do not reach.

#[test]
fn deep_and_wide_schemas_are_refused_without_overflow() {
    // The test's own deep values need a larger stack to be built and dropped; the functions
    // under test refuse them after a bounded depth.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(|| {
            let limits = Limits::default();
            // (Built by moving: `json!` would copy the interpolated value at every level.)
            let object = |pairs: Vec<(&str, Value)>| {
                Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            };
            let mut deep = json!({"type": "string"});
            for _ in 0..5_000 {
                deep = object(vec![
                    ("type", json!("object")),
                    ("properties", object(vec![("a", deep)])),
                ]);
            }
            let refused = |schema: &Value| {
                let wrapped = json!({"type": "json_schema", "json_schema": {"schema": schema}});
                chat::response_format(Some(&wrapped), &limits).is_err()
            };
            assert!(refused(&deep));
            let mut items = json!({"type": "string"});
            for _ in 0..5_000 {
                items = object(vec![("type", json!("array")), ("items", items)]);
            }
            assert!(refused(&items));
            let mut any_of = json!({"type": "string"});
            for _ in 0..5_000 {
                any_of = object(vec![("anyOf", Value::Array(vec![any_of]))]);
            }
            assert!(refused(&any_of));
            // A chain of 5,000 $refs, each to the next.
            let defs: serde_json::Map<String, Value> = (0..5_000)
                .map(|i| {
                    (
                        format!("d{i}"),
                        json!({"$ref": format!("#/$defs/d{}", i + 1)}),
                    )
                })
                .chain([("d5000".to_string(), json!({"type": "string"}))])
                .collect();
            let chain = json!({"$defs": defs, "$ref": "#/$defs/d0"});
            assert!(refused(&chain));
            assert!(validation::schema_within("response_format", &chain, &limits).is_err());
            // Exploding type lists: 7 entries each compiling the same properties again.
            let mut exploding = json!({"type": "string"});
            for _ in 0..20 {
                exploding = object(vec![
                    ("type", json!(vec!["object"; 7])),
                    ("properties", object(vec![("a", exploding)])),
                ]);
            }
            // Within the limits, it reaches llguidance, which compiles it without blowing up (or
            // refuses it), quickly either way.
            vocabulary();
            let started = Instant::now();
            if let Ok(grammar) = compile(&exploding) {
                feed(&grammar, b"{\"a\": {\"a\": {");
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{:?}",
                started.elapsed()
            );
            // The deepest body serde_json parses (its limit is 128 levels) is refused cleanly.
            let mut text = String::from("{\"type\":\"string\"}");
            for _ in 0..60 {
                text = format!("{{\"type\":\"object\",\"properties\":{{\"a\":{text}}}}}");
            }
            let schema: Value = serde_json::from_str(&text).unwrap();
            let wrapped = json!({"type": "json_schema", "json_schema": {"schema": schema}});
            let e = chat::response_format(Some(&wrapped), &limits).unwrap_err();
            assert_eq!(e.param().as_deref(), Some("response_format"));
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn wide_bodies_are_refused_in_one_pass() {
    let mut many = String::from(r#"{"model": "m", "messages": [], "n": "x""#);
    for i in 0..100_000 {
        many.push_str(&format!(r#", "k{i}": [{i}, {{"a": "{i}"}}]"#));
    }
    many.push('}');
    let started = Instant::now();
    let e = validation::parse_generation_body::<ChatCompletionRequest>(many.as_bytes())
        .err()
        .unwrap();
    assert_eq!(e.param().as_deref(), Some("n"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(
        validation::json_object(nested.as_bytes())
            .unwrap_err()
            .code(),
        "invalid_json"
    );
    let lines = "{\"messages\": 5}\n".repeat(50_000);
    let started = Instant::now();
    let errors = parse_jsonl(&lines).unwrap_err();
    assert_eq!(errors.len(), 50_000);
    assert_eq!(errors.last().unwrap().line, 50_000);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
