//! The scheduler: one thread owns the model and steps every admitted sequence together
//! (continuous batching). Each step runs one decode token of every decoding sequence as a single
//! batch, then up to `prefill_chunk` prompt tokens of newly admitted ones, so a long prompt never
//! stalls the running streams for more than one chunk. Requests are admitted in arrival order
//! while the exact bytes of their caches at full length fit the budget.

use crate::metrics::Metrics;
use crate::stop::StopStrings;
use eval::generate::{sample, Sampling};
use kvcache::KvCache;
use llm::tokenizer::TokenStream;
use llm::{Model, Sequence};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The cache spec every sequence gets (`f16`, `rvq:FILE,…`).
    pub cache: String,
    /// Bytes the caches may hold together: the shared codebooks (counted once) and every
    /// admitted sequence's cache at its full length.
    pub kv_budget: u64,
    /// Requests that may wait for memory; past that, new requests are refused.
    pub max_queue: usize,
    /// Prompt tokens prefilled per step, between decode steps.
    pub prefill_chunk: usize,
    /// Most sequences admitted at once.
    pub max_sequences: usize,
}

/// One request, tokenized and checked.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    /// Generate past end-of-sequence tokens, up to max_tokens (benchmarks).
    pub ignore_eos: bool,
    /// Where the output goes; dropping the receiver cancels the request at the next step.
    pub events: UnboundedSender<Event>,
}

#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Finish),
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// max_tokens reached.
    Length,
}

#[derive(Clone, Copy, Debug)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("prompt + max_tokens = {tokens} tokens need {need} bytes of KV cache; the whole budget for sequences is {budget} bytes")]
    LargerThanBudget {
        tokens: usize,
        need: u64,
        budget: u64,
    },
    #[error("{0} requests are already waiting for KV memory; retry later")]
    QueueFull(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
}

struct Shared {
    model: Arc<Model>,
    /// An empty cache of the configured spec: new sequences are copies of it, sharing its
    /// codebooks; it also prices a sequence before admission.
    template: Box<dyn KvCache>,
    /// The KV budget less the shared codebooks: what sequences' own bytes may add up to.
    sequence_budget: u64,
    config: EngineConfig,
    metrics: Arc<Metrics>,
}

/// The handle requests are submitted through.
pub struct Engine {
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Builds the cache `config.cache` names (loading codebooks once) and starts the scheduler.
    pub fn start(model: Arc<Model>, config: EngineConfig) -> anyhow::Result<Self> {
        let template = model.new_cache(&config.cache)?;
        Self::start_with_cache(model, config, template)
    }

    /// Starts the scheduler with every sequence's cache copied from `template` (emptied first):
    /// any [`KvCache`] backend, including one built outside this crate.
    pub fn start_with_cache(
        model: Arc<Model>,
        config: EngineConfig,
        mut template: Box<dyn KvCache>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(config.kv_budget > 0, "the KV budget must be positive");
        anyhow::ensure!(
            config.prefill_chunk > 0,
            "the prefill chunk must be at least 1 token"
        );
        anyhow::ensure!(
            config.max_sequences > 0,
            "at least one sequence must be allowed"
        );
        template.truncate(0);
        let codebooks = template.memory().fixed_bytes;
        anyhow::ensure!(
            codebooks < config.kv_budget,
            "the cache's shared codebooks alone take {codebooks} bytes, the whole KV budget of {} \
             bytes or more",
            config.kv_budget
        );
        let metrics = Arc::new(Metrics::default());
        metrics
            .kv_budget_bytes
            .store(config.kv_budget, Ordering::Relaxed);
        metrics.codebook_bytes.store(codebooks, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            model,
            template,
            sequence_budget: config.kv_budget - codebooks,
            config,
            metrics,
        });
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler::new(shared.clone());
        let threads = rayon::current_num_threads();
        let thread = std::thread::Builder::new()
            .name("rvq-kv scheduler".into())
            .spawn(move || {
                // The scheduler is a worker of its own pool (as `main` is of the global one in
                // the CLI): parallel work it starts is then stolen by the other workers, instead
                // of being handed over while it sleeps, which cost a thread wake-up per matrix
                // product (about half of a SmolLM2 decode step).
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .use_current_thread()
                    .thread_name(|i| format!("rvq-kv worker {i}"))
                    .build();
                match pool {
                    Ok(pool) => pool.install(|| scheduler.run(rx)),
                    Err(_) => scheduler.run(rx),
                }
            })?;
        Ok(Self {
            shared,
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Bytes a sequence of `tokens` positions takes in this server's cache.
    pub fn bytes_for(&self, tokens: usize) -> u64 {
        self.shared.template.bytes_at(tokens)
    }

    /// The budget left for sequences once the shared codebooks are counted.
    pub fn sequence_budget(&self) -> u64 {
        self.shared.sequence_budget
    }

    /// Queues a request; it is refused at once if it could never fit the budget, or if the queue
    /// is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let m = &self.shared.metrics;
        let tokens = job.prompt.len() + job.max_tokens;
        let need = self.bytes_for(tokens);
        let budget = self.sequence_budget();
        if need > budget {
            Metrics::add(&m.requests_rejected, 1);
            return Err(SubmitError::LargerThanBudget {
                tokens,
                need,
                budget,
            });
        }
        let max_queue = self.shared.config.max_queue as u64;
        let queued = m
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < max_queue).then_some(q + 1)
            });
        if queued.is_err() {
            Metrics::add(&m.requests_rejected, 1);
            return Err(SubmitError::QueueFull(max_queue as usize));
        }
        let sent = match &*self.jobs.lock().expect("jobs lock") {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        if !sent {
            m.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(())
    }

    /// Stops taking requests, lets the admitted and queued ones finish, and joins the scheduler.
    pub fn shutdown(&self) {
        self.jobs.lock().expect("jobs lock").take();
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An admitted request.
struct Active {
    job: Job,
    cache: Box<dyn KvCache>,
    reserved: u64,
    /// Prompt tokens in the cache.
    prefilled: usize,
    /// The token the next decode step feeds (sampled, not yet in the cache).
    next: u32,
    generated: usize,
    text: TokenStream,
    stops: StopStrings,
    rng: StdRng,
}

impl Active {
    fn decoding(&self) -> bool {
        self.prefilled == self.job.prompt.len()
    }

    /// Position of the next token fed.
    fn position(&self) -> usize {
        self.prefilled + self.generated.saturating_sub(1)
    }
}

struct Scheduler {
    shared: Arc<Shared>,
    waiting: VecDeque<Job>,
    active: Vec<Active>,
    /// Decode tokens and their wall time since the rate was last published.
    rate_window: (usize, f64),
}

impl Scheduler {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            waiting: VecDeque::new(),
            active: Vec::new(),
            rate_window: (0, 0.0),
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    fn run(mut self, jobs: Receiver<Job>) {
        let mut open = true;
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) if open => self.waiting.push_back(job),
                    _ => break,
                }
            }
            while open {
                match jobs.try_recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.drop_cancelled();
            self.admit();
            if self.active.is_empty() {
                continue;
            }
            self.decode_step();
            self.prefill_step();
            self.publish_memory();
        }
    }

    /// Requests whose clients went away, waiting or admitted, free their place.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        let gone = (before - self.waiting.len()) as u64;
        self.metrics().queued.fetch_sub(gone, Ordering::AcqRel);
        Metrics::add(&self.metrics().requests_cancelled, gone);
        let (kept, cancelled): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| !a.job.events.is_closed());
        self.active = kept;
        Metrics::add(&self.metrics().requests_cancelled, cancelled.len() as u64);
        if !cancelled.is_empty() {
            self.publish_memory();
        }
    }

    /// Admits waiting requests in arrival order while their full-length caches fit the budget.
    fn admit(&mut self) {
        let config = &self.shared.config;
        let budget = self.shared.sequence_budget;
        let mut reserved: u64 = self.active.iter().map(|a| a.reserved).sum();
        let before = self.active.len();
        while let Some(job) = self.waiting.front() {
            let need = self
                .shared
                .template
                .bytes_at(job.prompt.len() + job.max_tokens);
            if reserved + need > budget || self.active.len() >= config.max_sequences {
                break;
            }
            let job = self.waiting.pop_front().expect("a waiting job");
            self.metrics().queued.fetch_sub(1, Ordering::AcqRel);
            reserved += need;
            let mut cache = self.shared.template.box_clone();
            cache.truncate(0);
            let rng = StdRng::seed_from_u64(job.sampling.seed);
            let stops = StopStrings::new(job.stop.clone());
            self.active.push(Active {
                job,
                cache,
                reserved: need,
                prefilled: 0,
                next: 0,
                generated: 0,
                text: TokenStream::new(),
                stops,
                rng,
            });
        }
        if self.active.len() > before {
            self.publish_memory();
        }
    }

    /// One token of every decoding sequence, as one batch.
    fn decode_step(&mut self) {
        let t0 = Instant::now();
        let decoding: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].decoding())
            .collect();
        if decoding.is_empty() {
            return;
        }
        let logits = match self.decode(&decoding) {
            Ok(logits) => logits.into_iter().map(Ok).collect(),
            // A failed batch is retried one sequence at a time from where the step began, so
            // that only the sequence at fault fails.
            Err(_) => decoding
                .iter()
                .map(|&i| {
                    let a = &mut self.active[i];
                    a.cache.truncate(a.position());
                    self.decode(&[i]).map(|mut l| l.remove(0))
                })
                .collect::<Vec<_>>(),
        };
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for (&i, logits) in decoding.iter().zip(&logits) {
            match logits {
                Ok(logits) => {
                    if self.take_token(i, logits) {
                        done.push(i);
                    }
                }
                Err(message) => {
                    self.notify_failure(i, message);
                    failed.push(i);
                }
            }
        }
        done.extend(failed);
        self.remove(&done);
        let (tokens, seconds) = &mut self.rate_window;
        *tokens += decoding.len();
        *seconds += t0.elapsed().as_secs_f64();
        if *seconds >= 1.0 {
            self.shared
                .metrics
                .set_decode_rate(*tokens as f64 / *seconds);
            self.rate_window = (0, 0.0);
        }
    }

    /// A decode step of sequences `which` (ascending) as one batch: their next logits, or what
    /// went wrong (an error, or a panic caught here).
    fn decode(&mut self, which: &[usize]) -> Result<Vec<Vec<f32>>, String> {
        let model = self.shared.model.clone();
        let fed: Vec<[u32; 1]> = which.iter().map(|&i| [self.active[i].next]).collect();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut batch: Vec<Sequence> = self
                .active
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| which.contains(i))
                .zip(&fed)
                .map(|((_, a), t)| Sequence {
                    first_pos: a.position(),
                    tokens: t,
                    cache: a.cache.as_mut(),
                })
                .collect();
            model.forward_batch(&mut batch)
        }));
        match result {
            Ok(Ok(logits)) => Ok(logits),
            Ok(Err(e)) => Err(format!("decode step failed: {e}")),
            Err(panic) => Err(panic_message(&panic)),
        }
    }

    /// Up to `prefill_chunk` prompt tokens of the sequences still prefilling, oldest first.
    fn prefill_step(&mut self) {
        let model = self.shared.model.clone();
        let mut budget = self.shared.config.prefill_chunk;
        let mut done = Vec::new();
        for i in 0..self.active.len() {
            if budget == 0 {
                break;
            }
            let a = &mut self.active[i];
            if a.decoding() {
                continue;
            }
            let end = a.job.prompt.len().min(a.prefilled + budget);
            let chunk = &a.job.prompt[a.prefilled..end];
            let first = a.prefilled;
            let result = catch_unwind(AssertUnwindSafe(|| {
                model.forward(chunk, first, a.cache.as_mut(), Some(1))
            }));
            let message = match result {
                Ok(Ok(logits)) => Ok(logits),
                Ok(Err(e)) => Err(format!("prefill failed: {e}")),
                Err(panic) => Err(panic_message(&panic)),
            };
            let logits = match message {
                Ok(logits) => logits,
                Err(message) => {
                    self.notify_failure(i, &message);
                    done.push(i);
                    continue;
                }
            };
            budget -= chunk.len();
            Metrics::add(&self.shared.metrics.prompt_tokens, chunk.len() as u64);
            a.prefilled = end;
            if a.decoding() && self.take_token(i, &logits) {
                done.push(i);
            }
        }
        self.remove(&done);
    }

    /// Samples sequence `i`'s next token from `logits` and sends its text; true when it finished.
    fn take_token(&mut self, i: usize, logits: &[f32]) -> bool {
        let tokenizer = &self.shared.model.tokenizer;
        let a = &mut self.active[i];
        let token = sample(logits, &a.job.sampling, &mut a.rng);
        a.generated += 1;
        Metrics::add(&self.shared.metrics.generated_tokens, 1);
        let mut finish = None;
        let mut at_stop_string = false;
        if !a.job.ignore_eos && tokenizer.stop_tokens.contains(&token) {
            finish = Some(FinishReason::Stop);
        } else {
            let piece = a.text.push(tokenizer, token).unwrap_or_default();
            let (text, stopped) = a.stops.push(&piece);
            if !text.is_empty() {
                let _ = a.job.events.send(Event::Text(text));
            }
            if stopped {
                finish = Some(FinishReason::Stop);
                at_stop_string = true;
            } else if a.generated == a.job.max_tokens {
                finish = Some(FinishReason::Length);
            }
        }
        a.next = token;
        let Some(reason) = finish else {
            return false;
        };
        // Text held back as the possible start of a stop string was not one.
        let rest = a.stops.flush();
        if !at_stop_string && !rest.is_empty() {
            let _ = a.job.events.send(Event::Text(rest));
        }
        // Counted before the client hears of it, so /metrics never lags a finished response.
        Metrics::add(&self.shared.metrics.requests_finished, 1);
        let _ = a.job.events.send(Event::Done(Finish {
            reason,
            prompt_tokens: a.job.prompt.len(),
            completion_tokens: a.generated,
        }));
        true
    }

    /// Tells sequence `i`'s client it failed (it is removed by the caller).
    fn notify_failure(&mut self, i: usize, message: &str) {
        Metrics::add(&self.shared.metrics.requests_failed, 1);
        let _ = self.active[i]
            .job
            .events
            .send(Event::Failed(message.to_string()));
    }

    /// Drops sequences `which` (the step that calls this publishes the change when it ends).
    fn remove(&mut self, which: &[usize]) {
        let mut index = 0;
        self.active.retain(|_| {
            index += 1;
            !which.contains(&(index - 1))
        });
    }

    /// Publishes the active sequences and their bytes; the count goes last, so a reader that
    /// sees it change also sees the bytes that go with it.
    fn publish_memory(&self) {
        let m = self.metrics();
        let in_use = self.active.iter().map(|a| a.cache.memory().bytes).sum();
        let reserved = self.active.iter().map(|a| a.reserved).sum();
        m.kv_bytes_in_use.store(in_use, Ordering::Release);
        m.kv_bytes_reserved.store(reserved, Ordering::Release);
        let n = self.active.len() as u64;
        m.peak_active.fetch_max(n, Ordering::Relaxed);
        m.active.store(n, Ordering::Release);
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into());
    format!("internal error (a bug in rvq-kv, please report it): {what}")
}
