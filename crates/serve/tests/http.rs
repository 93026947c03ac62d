//! The server over real HTTP on an ephemeral port, with the default model (SmolLM2-135M).

use eval::generate::{generate, Sampling};
use futures_util::StreamExt;
use kvcache::hooked::{Hooked, Hooks};
use kvcache::{CacheError, KvCache};
use llm::Model;
use serde_json::{json, Value};
use serve::{AppState, Engine, EngineConfig};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

fn home() -> PathBuf {
    match std::env::var_os("RVQ_KV_HOME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.rvq-kv")),
    }
}

fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = eval::assets::ensure_model(&home()).expect("fetching the default model");
            Arc::new(Model::load(&path).expect("loading the default model"))
        })
        .clone()
}

/// Codebooks calibrated on a few hundred tokens (quality is not the point here), made once.
fn small_codebooks() -> &'static str {
    static PATH: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    &PATH
        .get_or_init(|| {
            let model = model();
            let text = eval::assets::ensure_calib(&home(), "wiki.utf8").unwrap();
            let tokens = model
                .tokenizer
                .encode(&eval::text::read_text(&text).unwrap(), true)
                .unwrap();
            let config = eval::calibrate::CalibConfig {
                tokens: 512,
                train: rvq::TrainConfig {
                    size: 32,
                    stages: 2,
                    kmeans_iters: 2,
                    ..rvq::TrainConfig::paper()
                },
                ..eval::calibrate::CalibConfig::paper("wiki.utf8")
            };
            let (books, _) = eval::calibrate::calibrate(&model, &tokens, &config, true).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("small.safetensors");
            books.save(&path).unwrap();
            let path = path.to_string_lossy().into_owned();
            (dir, path)
        })
        .1
}

fn config(cache: &str) -> EngineConfig {
    EngineConfig {
        cache: cache.into(),
        kv_budget: 1 << 30,
        max_queue: 64,
        prefill_chunk: 256,
        max_sequences: 64,
    }
}

/// A server on 127.0.0.1:0; stops (gracefully) when dropped.
struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    client: reqwest::Client,
}

impl Server {
    async fn start(config: EngineConfig) -> Self {
        let engine = Engine::start(model(), config).expect("starting the engine");
        Self::with_engine(engine).await
    }

    async fn with_engine(engine: Engine) -> Self {
        let state = Arc::new(AppState::new(engine, model(), "smollm2".into()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve::serve(listener, state, async {
            let _ = stopped.await;
        }));
        Self {
            url,
            stop: Some(stop),
            task: Some(task),
            client: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// Streams a request; returns each `data:` payload, `[DONE]` included.
    async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self.open_stream(path, body).await;
        let mut events = Vec::new();
        let mut buffer = String::new();
        let mut bytes = r.bytes_stream();
        while let Some(chunk) = bytes.next().await {
            buffer += &String::from_utf8_lossy(&chunk.unwrap());
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                events.extend(
                    event
                        .lines()
                        .filter_map(|l| l.strip_prefix("data: "))
                        .map(str::to_string),
                );
            }
        }
        events
    }

    async fn open_stream(&self, path: &str, body: &Value) -> reqwest::Response {
        let mut body = body.clone();
        body["stream"] = json!(true);
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        r
    }

    async fn metric(&self, name: &str) -> f64 {
        serve::load::metric(&self.client, &self.url, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Polls `/metrics` until `name` satisfies `ok` (10 s at most).
    async fn wait_for(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let t = Instant::now();
        loop {
            let v = self.metric(name).await;
            if ok(v) {
                return v;
            }
            if t.elapsed() > Duration::from_secs(10) {
                let all = self
                    .client
                    .get(format!("{}/metrics", self.url))
                    .send()
                    .await;
                panic!(
                    "{name} stayed at {v}: {}",
                    all.unwrap().text().await.unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

fn greedy(prompt: &str, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// The text of a streamed answer, and its finish reason.
fn streamed_text(events: &[String]) -> (String, String) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    let mut finish = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(choice) = v["choices"].get(0) {
            let piece = choice["text"]
                .as_str()
                .or(choice["delta"]["content"].as_str());
            text += piece.unwrap_or("");
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.into();
            }
        }
    }
    (text, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_follow_the_openai_shapes_streaming_or_not() {
    let server = Server::start(config("f16")).await;
    let body = greedy("The capital of France is", 12);
    let (status, v) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "smollm2");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    let text = choice["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    let prompt_tokens = model()
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap()
        .len();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"], prompt_tokens + 12);

    let mut with_usage = body.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let events = server.stream("/v1/completions", &with_usage).await;
    assert_eq!(streamed_text(&events), (text.to_string(), "length".into()));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"], v["usage"]);

    let chat = json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8,
                      "temperature": 0});
    let (status, v) = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let events = server.stream("/v1/chat/completions", &chat).await;
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (streamed, _) = streamed_text(&events);
    assert_eq!(
        streamed,
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // A stop string ends the text before it, with finish_reason "stop".
    let mut stopped = body.clone();
    stopped["stop"] = json!(["."]);
    let (_, v) = server.post("/v1/completions", &stopped).await;
    assert_eq!(v["choices"][0]["text"], text.split('.').next().unwrap());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let r = reqwest::get(format!("{}/v1/models", server.url))
        .await
        .unwrap();
    let models: Value = r.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");
    let r = reqwest::get(format!("{}/health", server.url))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    server.shutdown().await;
}

/// Batching must not change greedy results: each of 8 concurrent streams gets exactly the text
/// `rvq-kv generate` gives for its prompt and cache (the batch test in `eval` shows why: with
/// block-format weights a decode row's logits do not depend on the rows beside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_greedy_streams_each_get_what_generate_gives() {
    let prompts = [
        "The capital of France is",
        "Once upon a time, there was a",
        "The three primary colors are",
        "Water boils at a temperature of",
        "My favourite programming language is",
        "The largest planet in the solar system",
        "To make a cup of tea, first",
        "In 1969, the first humans",
    ];
    let rvq = format!("rvq:{}", small_codebooks());
    for cache in ["f16", "q4_0,rot", rvq.as_str()] {
        let model = model();
        let greedy_sampling = Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        };
        let expected: Vec<String> = prompts
            .iter()
            .map(|p| {
                let ids = model.tokenizer.encode(p, true).unwrap();
                generate(&model, &ids, cache, 20, &greedy_sampling, |_| {})
                    .unwrap()
                    .text
            })
            .collect();
        let server = Arc::new(Server::start(config(cache)).await);
        let tasks: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let server = server.clone();
                let body = greedy(p, 20);
                tokio::spawn(async move {
                    if i % 2 == 0 {
                        streamed_text(&server.stream("/v1/completions", &body).await).0
                    } else {
                        let (status, v) = server.post("/v1/completions", &body).await;
                        assert_eq!(status, 200, "{v}");
                        v["choices"][0]["text"].as_str().unwrap().to_string()
                    }
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), expected[i], "{cache}: prompt {i}");
        }
        assert!(
            server.metric("rvq_kv_sequences_active_peak").await >= 4.0,
            "{cache}: the streams were not decoded together"
        );
        Arc::into_inner(server).unwrap().shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_admits_what_fits_and_queues_the_rest() {
    let model = model();
    // Room for exactly two sequences of 8 prompt + 24 new tokens.
    let prompt = "One two three four five six seven";
    let prompt_len = model.tokenizer.encode(prompt, true).unwrap().len();
    let engine = Engine::start(model.clone(), config("f16")).unwrap();
    let need = engine.bytes_for(prompt_len + 24);
    drop(engine);
    let server = Arc::new(
        Server::start(EngineConfig {
            kv_budget: 2 * need + need / 2,
            ..config("f16")
        })
        .await,
    );
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move { server.post("/v1/completions", &greedy(prompt, 24)).await })
        })
        .collect();
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 24);
    }
    assert_eq!(server.metric("rvq_kv_sequences_active_peak").await, 2.0);
    assert_eq!(server.metric("rvq_kv_requests_finished_total").await, 5.0);
    // A request that could never fit is refused at once, naming max_tokens.
    let (status, v) = server.post("/v1/completions", &greedy(prompt, 4000)).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "max_tokens");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("budget"),
        "{v}"
    );
    Arc::into_inner(server).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_a_client_that_leaves_frees_its_cache() {
    let model = model();
    let prompt = "Counting to a thousand: 1, 2, 3, 4, 5,";
    let prompt_len = model.tokenizer.encode(prompt, true).unwrap().len();
    let engine = Engine::start(model.clone(), config("f16")).unwrap();
    let need = engine.bytes_for(prompt_len + 500);
    drop(engine);
    // One sequence at a time, one waiting.
    let server = Arc::new(
        Server::start(EngineConfig {
            kv_budget: need + need / 2,
            max_queue: 1,
            ..config("f16")
        })
        .await,
    );
    let long = greedy(prompt, 500);
    let mut first = server
        .open_stream("/v1/completions", &long)
        .await
        .bytes_stream();
    first.next().await.unwrap().unwrap(); // admitted and decoding
    server
        .wait_for("rvq_kv_cache_bytes_in_use", |b| b > 0.0)
        .await;
    // As large as the first: it cannot fit beside it.
    let waiting = {
        let (server, long) = (server.clone(), long.clone());
        tokio::spawn(async move { server.post("/v1/completions", &long).await })
    };
    server
        .wait_for("rvq_kv_sequences_queued", |q| q == 1.0)
        .await;
    let r = server
        .client
        .post(format!("{}/v1/completions", server.url))
        .json(&greedy(prompt, 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_busy");
    // The first client hangs up: its cache is freed and the waiting request runs.
    drop(first);
    server
        .wait_for("rvq_kv_requests_cancelled_total", |n| n == 1.0)
        .await;
    let (status, v) = waiting.await.unwrap();
    assert_eq!(status, 200, "{v}");
    server
        .wait_for("rvq_kv_sequences_active", |n| n == 0.0)
        .await;
    assert_eq!(server.metric("rvq_kv_cache_bytes_in_use").await, 0.0);
    assert_eq!(server.metric("rvq_kv_cache_bytes_reserved").await, 0.0);
    Arc::into_inner(server).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_naming_the_field_and_the_server_goes_on() {
    let server = Server::start(config("f16")).await;
    let context = model().context_len();
    let too_long: Vec<u32> = vec![1; context];
    let cases: Vec<(&str, Value, Option<&str>, &str)> = vec![
        ("/v1/completions", json!([1, 2]), None, "JSON object"),
        (
            "/v1/completions",
            json!({"max_tokens": 5}),
            Some("prompt"),
            "required",
        ),
        (
            "/v1/completions",
            json!({"prompt": ""}),
            Some("prompt"),
            "empty",
        ),
        (
            "/v1/completions",
            json!({"prompt": []}),
            Some("prompt"),
            "empty",
        ),
        (
            "/v1/completions",
            json!({"prompt": 7}),
            Some("prompt"),
            "string or an array",
        ),
        (
            "/v1/completions",
            json!({"prompt": ["a", "b"]}),
            Some("prompt"),
            "one prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 99999999]}),
            Some("prompt"),
            "vocabulary",
        ),
        (
            "/v1/completions",
            json!({"prompt": too_long}),
            Some("prompt"),
            "context",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "model": "gpt-4"}),
            Some("model"),
            "unknown model 'gpt-4'",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "model": 3}),
            Some("model"),
            "must be a string",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 0}),
            Some("max_tokens"),
            "must be 1 to",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": -3}),
            Some("max_tokens"),
            "must be 1 to",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": context}),
            Some("max_tokens"),
            "must be 1 to",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": "ten"}),
            Some("max_tokens"),
            "an integer",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 2.5}),
            Some("max_tokens"),
            "an integer",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "temperature": -0.5}),
            Some("temperature"),
            "0 to 2",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "temperature": "hot"}),
            Some("temperature"),
            "a number",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "top_p": 0}),
            Some("top_p"),
            "(0, 1]",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "n": 2}),
            Some("n"),
            "one choice",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "stop": 5}),
            Some("stop"),
            "string or an array",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "stop": [""]}),
            Some("stop"),
            "empty",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "stream": "yes"}),
            Some("stream"),
            "a boolean",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "seed": "x"}),
            Some("seed"),
            "an integer",
        ),
        (
            "/v1/chat/completions",
            json!({"prompt": "Hi"}),
            Some("messages"),
            "array of",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            Some("messages"),
            "empty",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user"}]}),
            Some("messages[0].content"),
            "a string",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"content": "x"}]}),
            Some("messages[0].role"),
            "a string",
        ),
    ];
    for (path, body, param, needle) in cases {
        let (status, v) = server.post(path, &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(v["error"]["param"].as_str(), param, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{body}: '{needle}' not in '{message}'"
        );
    }
    for raw in [
        "{\"prompt\": \"Hi\"",
        "{\"prompt\": \"Hi\", \"temperature\": NaN}",
        "",
    ] {
        let (status, v) = server.post_raw("/v1/completions", raw).await;
        assert_eq!(status, 400, "{raw}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not valid JSON"),
            "{v}"
        );
    }
    let r = server
        .client
        .get(format!("{}/v2/nothing", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let (status, _) = server
        .post("/v1/completions", &greedy("Still here?", 3))
        .await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

/// Panics once a layer would hold `limit` positions: a stand-in for a bug that only one
/// request's input reaches.
struct PanicsPast(usize);

impl Hooks for PanicsPast {
    fn append(
        &self,
        inner: &mut dyn KvCache,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), CacheError> {
        let row = inner.shape().kv_heads * inner.shape().head_dim;
        assert!(inner.len(layer) + k.len() / row < self.0, "injected fault");
        inner.append(layer, k, v)
    }
    fn for_copy(&self) -> Self {
        PanicsPast(self.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_panics_fails_alone() {
    let model = model();
    let template = Box::new(Hooked::new(model.new_cache("f16").unwrap(), PanicsPast(40)));
    let engine = Engine::start_with_cache(model.clone(), config("f16"), template).unwrap();
    let server = Arc::new(Server::with_engine(engine).await);
    let doomed = greedy(
        "Count: one, two, three, four, five, six, seven, eight, nine, ten",
        30,
    );
    let fine = greedy("Hello", 12);
    let (a, b) = tokio::join!(
        server.post("/v1/completions", &doomed),
        server.post("/v1/completions", &fine)
    );
    assert_eq!(a.0, 500, "{}", a.1);
    assert!(
        a.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("injected fault"),
        "{}",
        a.1
    );
    assert_eq!(b.0, 200, "{}", b.1);
    assert_eq!(b.1["usage"]["completion_tokens"], 12);
    let (status, _) = server
        .post("/v1/completions", &greedy("And after?", 4))
        .await;
    assert_eq!(status, 200);
    assert_eq!(server.metric("rvq_kv_requests_failed_total").await, 1.0);
    Arc::into_inner(server).unwrap().shutdown().await;
}
