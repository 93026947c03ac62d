//! The HTTP surface: routes, streaming (server-sent events) and error responses.

use crate::api::{self, ApiError, Endpoint, Envelope, Request};
use crate::engine::{Engine, Event, Finish, Job, SubmitError};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{self, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use llm::Model;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// What every handler shares.
pub struct AppState {
    pub engine: Engine,
    pub model: Arc<Model>,
    /// The name clients pass as `model`.
    pub model_name: String,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(engine: Engine, model: Arc<Model>, model_name: String) -> Self {
        Self {
            engine,
            model,
            model_name,
            next_id: AtomicU64::new(1),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "rvq-kv",
            "context_length": s.model.context_len(),
            "cache": s.engine.config().cache,
        }],
    }))
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.engine.metrics().render(),
    )
}

async fn not_found() -> ApiError {
    ApiError {
        status: 404,
        message: "no such route; the API is under /v1 (completions, chat/completions, models), \
                  with /health and /metrics beside it"
            .into(),
        kind: "invalid_request_error",
        param: None,
    }
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(s, body, Endpoint::Completions).await
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(s, body, Endpoint::ChatCompletions).await
}

async fn respond(s: Arc<AppState>, body: Bytes, endpoint: Endpoint) -> Response {
    // Tokenizing a long prompt is CPU work: off the async threads.
    let parsed = {
        let s = s.clone();
        tokio::task::spawn_blocking(move || api::parse(&body, endpoint, &s.model, &s.model_name))
            .await
    };
    let request = match parsed {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return e.into_response(),
        Err(_) => return internal("the request could not be parsed").into_response(),
    };
    let Request {
        prompt,
        max_tokens,
        sampling,
        stop,
        stream,
        ignore_eos,
        include_usage,
    } = request;
    let (tx, rx) = unbounded_channel();
    let job = Job {
        prompt,
        max_tokens,
        sampling,
        stop,
        ignore_eos,
        events: tx,
    };
    if let Err(e) = s.engine.submit(job) {
        let (status, kind, param) = match e {
            SubmitError::LargerThanBudget { .. } => {
                (400, "invalid_request_error", Some("max_tokens"))
            }
            SubmitError::QueueFull(_) | SubmitError::ShuttingDown => (503, "server_busy", None),
        };
        return ApiError {
            status,
            message: e.to_string(),
            kind,
            param: param.map(str::to_string),
        }
        .into_response();
    }
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::ChatCompletions => "chatcmpl",
    };
    let reply = Reply {
        id: format!("{prefix}-{}", s.next_id.fetch_add(1, Ordering::Relaxed)),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: s.model_name.clone(),
        endpoint,
    };
    if stream {
        Sse::new(reply.stream(rx, include_usage))
            .keep_alive(sse::KeepAlive::default())
            .into_response()
    } else {
        reply.collect(rx).await
    }
}

fn internal(message: &str) -> ApiError {
    ApiError {
        status: 500,
        message: message.into(),
        kind: "server_error",
        param: None,
    }
}

/// One request's answer under way.
struct Reply {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
}

impl Reply {
    fn envelope(&self) -> Envelope<'_> {
        Envelope {
            id: &self.id,
            created: self.created,
            model: &self.model,
            endpoint: self.endpoint,
        }
    }

    /// Waits for the whole text.
    async fn collect(self, mut rx: UnboundedReceiver<Event>) -> Response {
        let mut text = String::new();
        while let Some(event) = rx.recv().await {
            match event {
                Event::Text(piece) => text += &piece,
                Event::Done(finish) => {
                    return Json(self.envelope().complete(&text, &finish)).into_response()
                }
                Event::Failed(message) => return internal(&message).into_response(),
            }
        }
        internal("the scheduler stopped before the answer was complete").into_response()
    }

    /// Server-sent events: one chunk per piece of text, the finish reason, optionally the usage,
    /// then `[DONE]`. Dropping the stream (the client left) cancels the request.
    fn stream(
        self,
        rx: UnboundedReceiver<Event>,
        include_usage: bool,
    ) -> impl Stream<Item = Result<sse::Event, Infallible>> {
        struct State {
            reply: Reply,
            rx: UnboundedReceiver<Event>,
            first: bool,
            include_usage: bool,
            ready: VecDeque<String>,
            ended: bool,
        }
        let state = State {
            reply: self,
            rx,
            first: true,
            include_usage,
            ready: VecDeque::new(),
            ended: false,
        };
        stream::unfold(state, |mut st| async move {
            loop {
                if let Some(data) = st.ready.pop_front() {
                    return Some((Ok(sse::Event::default().data(data)), st));
                }
                if st.ended {
                    return None;
                }
                let env = st.reply.envelope();
                match st.rx.recv().await {
                    Some(Event::Text(piece)) => {
                        st.ready
                            .push_back(env.chunk(&piece, None, st.first).to_string());
                        st.first = false;
                    }
                    Some(Event::Done(finish)) => {
                        let Finish { reason, .. } = finish;
                        st.ready
                            .push_back(env.chunk("", Some(reason), st.first).to_string());
                        if st.include_usage {
                            st.ready.push_back(env.usage_chunk(&finish).to_string());
                        }
                        st.ready.push_back("[DONE]".into());
                        st.ended = true;
                    }
                    Some(Event::Failed(message)) => {
                        st.ready.push_back(internal(&message).body().to_string());
                        st.ended = true;
                    }
                    None => {
                        let e = internal("the scheduler stopped before the answer was complete");
                        st.ready.push_back(e.body().to_string());
                        st.ended = true;
                    }
                }
            }
        })
    }
}
