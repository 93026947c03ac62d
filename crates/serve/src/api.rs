//! The OpenAI API's request fields, checked one by one so that every refusal names its field, and
//! its response objects.

use crate::engine::{Finish, FinishReason};
use eval::generate::Sampling;
use llm::tokenizer::ChatMessage;
use llm::Model;
use serde_json::{json, Map, Value};

/// A refused request: HTTP status and an OpenAI-style error object.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// `invalid_request_error`, `server_busy`, `server_error`.
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
}

impl ApiError {
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": Value::Null,
        }})
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

/// A checked request, ready for the engine.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub stream: bool,
    /// Not in OpenAI's API (vLLM's name): generate past end-of-sequence tokens, for benchmarks.
    pub ignore_eos: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
}

/// Stop strings a request may give.
const MAX_STOPS: usize = 16;

/// Output tokens when a request does not say.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Parses and checks a request body against the served model.
pub fn parse(
    body: &[u8],
    endpoint: Endpoint,
    model: &Model,
    model_name: &str,
) -> Result<Request, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    };
    let f = Fields(&fields);
    if let Some(name) = f.string("model")? {
        if name != model_name {
            return Err(ApiError::invalid(
                Some("model"),
                format!("unknown model '{name}'; this server serves '{model_name}'"),
            ));
        }
    }
    if let Some(n) = f.integer("n")? {
        if n != 1 {
            return Err(ApiError::invalid(
                Some("n"),
                format!("n = {n}: only one choice per request is supported"),
            ));
        }
    }
    let prompt = match endpoint {
        Endpoint::Completions => completion_prompt(&f, model)?,
        Endpoint::ChatCompletions => chat_prompt(&f, model)?,
    };
    let context = model.context_len();
    if prompt.len() >= context {
        return Err(ApiError::invalid(
            Some(f.prompt_field(endpoint)),
            format!(
                "the prompt has {} tokens; the model's context is {context}, which leaves no room to generate",
                prompt.len()
            ),
        ));
    }
    let room = context - prompt.len();
    let max_field = ["max_tokens", "max_completion_tokens"]
        .into_iter()
        .find(|k| fields.get(*k).is_some_and(|v| !v.is_null()));
    let max_tokens = match max_field {
        None => DEFAULT_MAX_TOKENS.min(room),
        Some(key) => {
            let n = f.integer(key)?.expect("present");
            if n < 1 || n as usize > room {
                return Err(ApiError::invalid(
                    Some(key),
                    format!(
                        "{key} = {n}: must be 1 to {room} (the context of {context} tokens minus the prompt's {})",
                        prompt.len()
                    ),
                ));
            }
            n as usize
        }
    };
    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature = {temperature}: must be 0 to 2"),
        ));
    }
    let top_p = f.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            format!("top_p = {top_p}: must be in (0, 1]"),
        ));
    }
    let seed = match f.integer("seed")? {
        Some(s) => s as u64,
        None => rand::random(),
    };
    let stop = stop_strings(&f)?;
    let stream = f.boolean("stream")?.unwrap_or(false);
    let ignore_eos = f.boolean("ignore_eos")?.unwrap_or(false);
    let include_usage = match fields.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("stream_options.include_usage"),
                    "stream_options.include_usage must be a boolean",
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stream_options"),
                "stream_options must be an object",
            ))
        }
    };
    Ok(Request {
        prompt,
        max_tokens,
        sampling: Sampling {
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed,
        },
        stop,
        stream,
        ignore_eos,
        include_usage,
    })
}

/// The request's fields, read with their expected types.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// `None` when absent or null; an error naming the field when of another type.
    fn typed<T>(
        &self,
        key: &str,
        kind: &str,
        get: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => get(v)
                .map(Some)
                .ok_or_else(|| ApiError::invalid(Some(key), format!("{key} must be {kind}"))),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, ApiError> {
        self.typed(key, "a string", |v| v.as_str().map(str::to_string))
    }

    fn integer(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.typed(key, "an integer", |v| {
            v.as_i64()
                .or_else(|| v.as_u64().map(|u| u.min(i64::MAX as u64) as i64))
        })
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        self.typed(key, "a number", Value::as_f64)
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.typed(key, "a boolean", Value::as_bool)
    }

    fn prompt_field(&self, endpoint: Endpoint) -> &'static str {
        match endpoint {
            Endpoint::Completions => "prompt",
            Endpoint::ChatCompletions => "messages",
        }
    }
}

fn tokenize(model: &Model, text: &str, field: &str) -> Result<Vec<u32>, ApiError> {
    model
        .tokenizer
        .encode(text, true)
        .map_err(|e| ApiError::invalid(Some(field), format!("{field} could not be tokenized: {e}")))
}

/// `prompt`: a string, a one-element array of strings, or an array of token ids.
fn completion_prompt(f: &Fields, model: &Model) -> Result<Vec<u32>, ApiError> {
    let bad = || {
        ApiError::invalid(
            Some("prompt"),
            "prompt must be a string or an array of token ids (one prompt per request)",
        )
    };
    let tokens = match f.0.get("prompt") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(Some("prompt"), "prompt is required"))
        }
        Some(Value::String(s)) => {
            if s.is_empty() {
                return Err(ApiError::invalid(Some("prompt"), "prompt is empty"));
            }
            tokenize(model, s, "prompt")?
        }
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] if !s.is_empty() => tokenize(model, s, "prompt")?,
            [] => return Err(ApiError::invalid(Some("prompt"), "prompt is empty")),
            items if items.iter().all(Value::is_number) => {
                let vocab = model.vocab() as u64;
                items
                    .iter()
                    .map(|v| match v.as_u64() {
                        Some(t) if t < vocab => Ok(t as u32),
                        _ => Err(ApiError::invalid(
                            Some("prompt"),
                            format!(
                                "token id {v} is outside the vocabulary (0 to {})",
                                vocab - 1
                            ),
                        )),
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    Ok(tokens)
}

/// `messages`: [{role, content}], rendered with the model's chat template.
fn chat_prompt(f: &Fields, model: &Model) -> Result<Vec<u32>, ApiError> {
    let Some(Value::Array(items)) = f.0.get("messages") else {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages must be an array of {role, content} objects",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages is empty"));
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let field = |name: &str| -> Result<String, ApiError> {
            match m.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                // Content given as parts: the text parts, joined.
                Some(Value::Array(parts)) if name == "content" => Ok(parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("")),
                _ => Err(ApiError::invalid(
                    Some(&format!("messages[{i}].{name}")),
                    format!("messages[{i}].{name} must be a string"),
                )),
            }
        };
        messages.push(ChatMessage {
            role: field("role")?,
            content: field("content")?,
        });
    }
    if messages.iter().all(|m| m.content.is_empty()) {
        return Err(ApiError::invalid(
            Some("messages"),
            "every message is empty",
        ));
    }
    let text = model.tokenizer.chat(&messages).map_err(|e| ApiError {
        status: 400,
        message: format!("the model's chat template failed: {e}"),
        kind: "invalid_request_error",
        param: Some("messages".into()),
    })?;
    tokenize(model, &text, "messages")
}

fn stop_strings(f: &Fields) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid(Some("stop"), "stop must be a string or an array of strings");
    let stops = match f.0.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if stops.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("{} stop strings: at most {MAX_STOPS}", stops.len()),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(Some("stop"), "a stop string is empty"));
    }
    Ok(stops)
}

/// What every response object starts with.
pub struct Envelope<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub endpoint: Endpoint,
}

impl Envelope<'_> {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::ChatCompletions, false) => "chat.completion",
            (Endpoint::ChatCompletions, true) => "chat.completion.chunk",
        }
    }

    fn with_choices(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The whole answer of a non-streaming request.
    pub fn complete(&self, text: &str, finish: &Finish) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => {
                json!({"index": 0, "text": text, "logprobs": Value::Null, "finish_reason": finish.reason})
            }
            Endpoint::ChatCompletions => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish.reason,
            }),
        };
        let mut v = self.with_choices(false, json!([choice]));
        v["usage"] = usage(finish);
        v
    }

    /// One streamed piece (`finish` on the last).
    pub fn chunk(&self, text: &str, finish: Option<FinishReason>, first: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => {
                json!({"index": 0, "text": text, "logprobs": Value::Null, "finish_reason": finish})
            }
            Endpoint::ChatCompletions => {
                let delta = match (first, finish.is_some() && text.is_empty()) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, true) => json!({}),
                    (false, false) => json!({"content": text}),
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
        };
        self.with_choices(true, json!([choice]))
    }

    /// The chunk that carries the token counts (`stream_options.include_usage`).
    pub fn usage_chunk(&self, finish: &Finish) -> Value {
        let mut v = self.with_choices(true, json!([]));
        v["usage"] = usage(finish);
        v
    }
}

fn usage(f: &Finish) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    })
}
