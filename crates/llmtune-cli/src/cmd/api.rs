//! `llmtune api`: an OpenAI-compatible HTTP server (axum + tokio).
//!
//! * `GET /v1/models`: the one model served.
//! * `POST /v1/chat/completions`: system/user/assistant messages, `temperature`, `top_p`,
//!   `max_tokens`, `n`, `stop`, `stream` (server-sent `chat.completion.chunk` events: a role
//!   delta, content deltas, a final chunk with `finish_reason`, then `data: [DONE]`), with the
//!   real token `usage`.
//! * Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with 400 for
//!   bad requests, 401 for a missing or wrong `--api_key` bearer token, 404 for unknown routes
//!   and models.
//!
//! Continuous batching: one scheduler thread owns the model. New requests are prefilled
//! together (one left-padded forward for those that arrived since the last step) and join the
//! running batch at the step boundary (the `n` choices of a request share its prefill);
//! every step decodes all running sequences together in one batched forward over one KV
//! cache (rows left-padded to a common length and masked, see
//! [`llmtune_generate::DecodeBatch`]); finished sequences leave at once and free their rows.
//! Each request samples from its own RNG stream, so its output does not depend on what else
//! is running (greedy outputs equal those of the request served alone). Tokens are streamed
//! per request as they are chosen; a client that goes away (drops its stream or its
//! connection) cancels only its own sequences, before the next step. `--max_batch` caps the
//! rows decoded together (1 = one sequence at a time). Ctrl-C (or SIGTERM) stops accepting
//! connections and lets running requests finish.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llmtune_data::template::Template;
use llmtune_generate::{DecodeBatch, GenerationConfig, Sampler};
use llmtune_models::Pretrained;
use llmtune_tokenize::StreamDecoder;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;
use tokio_stream::StreamExt;

use crate::args::{load_merged, GenFlags};

/// Serve the model over an OpenAI-compatible HTTP API.
#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct ApiArgs {
    /// A HF model folder, a .gguf file, or a built-in alias (default: smollm2-135m).
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    /// LoRA adapter folders to merge, comma-separated, in order.
    #[arg(long)]
    pub checkpoint_dir: Option<String>,
    /// Chat template (default: the model's own).
    #[arg(long)]
    pub template: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on every request.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model id reported by /v1/models (default: the model's name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Most sequences decoded together (continuous batching; 1 = one sequence at a time).
    /// A request with `n` choices adds `n` sequences; one larger than this runs alone.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch: u64,
    /// Defaults for requests that omit a setting.
    #[command(flatten)]
    pub gen: GenFlags,
}

struct Engine {
    p: Pretrained,
    template: &'static Template,
    model_id: String,
    api_key: Option<String>,
    defaults: GenFlags,
    /// Requests for the scheduler thread.
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    stats: Stats,
    max_batch: usize,
}

/// An OpenAI-style error response.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Value>,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Message>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    n: Option<usize>,
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    seed: Option<u64>,
}

/// Message content: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts.
fn content_text(c: &Option<Value>) -> Result<String, ApiError> {
    match c {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::bad(
                            "only text content parts are supported",
                            Some("messages"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::bad(
            "message content must be a string",
            Some("messages"),
        )),
    }
}

/// `(system, history, query)` from the messages: system messages first, then alternating
/// user/assistant turns ending with a user message.
#[allow(clippy::type_complexity)]
fn split_messages(
    msgs: &[Message],
) -> Result<(Option<String>, Vec<(String, String)>, String), ApiError> {
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<(String, String)> = Vec::new();
    for m in msgs {
        let text = content_text(&m.content)?;
        match m.role.as_str() {
            "system" | "developer" => system.push(text),
            "user" | "assistant" => turns.push((m.role.clone(), text)),
            other => {
                return Err(ApiError::bad(
                    format!("unsupported message role {other:?} (system, user, assistant)"),
                    Some("messages"),
                ))
            }
        }
    }
    let Some((last_role, query)) = turns.pop() else {
        return Err(ApiError::bad(
            "messages must contain a user message",
            Some("messages"),
        ));
    };
    if last_role != "user" {
        return Err(ApiError::bad(
            "the last message must come from the user",
            Some("messages"),
        ));
    }
    if turns.len() % 2 != 0 {
        return Err(ApiError::bad(
            "messages before the last must alternate user, assistant",
            Some("messages"),
        ));
    }
    let mut history = Vec::new();
    for pair in turns.chunks(2) {
        if pair[0].0 != "user" || pair[1].0 != "assistant" {
            return Err(ApiError::bad(
                "messages before the last must alternate user, assistant",
                Some("messages"),
            ));
        }
        history.push((pair[0].1.clone(), pair[1].1.clone()));
    }
    let system = (!system.is_empty()).then(|| system.join("\n"));
    Ok((system, history, query))
}

fn stops(v: &Option<Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::bad("stop must be a string or a list of strings", Some("stop"))
                })
            })
            .collect(),
        Some(_) => Err(ApiError::bad(
            "stop must be a string or up to 4 strings",
            Some("stop"),
        )),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "chatcmpl-{:x}{:04x}",
        now(),
        N.fetch_add(1, Ordering::Relaxed) % 0x10000
    )
}

fn check_auth(e: &Engine, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &e.api_key else { return Ok(()) };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect API key provided.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        })
    }
}

async fn models(State(e): State<Arc<Engine>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    check_auth(&e, &headers)?;
    Ok(Json(json!({"object": "list", "data": [
        {"id": e.model_id, "object": "model", "created": 0, "owned_by": "llmtune"}
    ]})))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "Unknown route. Use GET /v1/models or POST /v1/chat/completions.".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
    }
}

/// What the scheduler tells a request, in order: text pieces per choice, each choice's end,
/// then `Done` with the completion tokens of all choices (or `Error`).
enum Ev {
    Delta(usize, String),
    Finish { choice: usize, reason: &'static str },
    Done(usize),
    Error(String),
}

/// One admitted request, queued for the scheduler.
struct Job {
    prompt: Vec<u32>,
    n: usize,
    cfg: GenerationConfig,
    stop: Vec<String>,
    tx: UnboundedSender<Ev>,
}

/// Per-choice decoding state: the streaming detokenizer and the stop-string hold-back.
struct ChoiceState {
    dec: StreamDecoder,
    text: String,
    sent: usize,
    tokens: usize,
    seen: Vec<u32>,
    done: bool,
}

/// A request being decoded: its sampler (one RNG stream per request, so its output does not
/// depend on what else is in the batch), its choices and how many are still running.
struct Running {
    job: Job,
    sampler: Sampler,
    choices: Vec<ChoiceState>,
    left: usize,
    completion: usize,
}

impl Running {
    fn new(job: Job) -> Self {
        let choices = (0..job.n)
            .map(|_| ChoiceState {
                dec: StreamDecoder::new(),
                text: String::new(),
                sent: 0,
                tokens: 0,
                seen: if job.cfg.repetition_penalty != 1.0 {
                    job.prompt.clone()
                } else {
                    vec![]
                },
                done: false,
            })
            .collect();
        Self {
            sampler: Sampler::new(job.cfg.seed),
            left: job.n,
            completion: 0,
            choices,
            job,
        }
    }

    /// Samples choice `c`'s next token from `logits` and streams its text. Returns the
    /// token when the choice goes on decoding, `None` when it finished. `Err` = the client
    /// went away or the tokenizer failed (the whole request ends).
    fn advance(
        &mut self,
        tok: &llmtune_tokenize::Tokenizer,
        c: usize,
        logits: &mut [f32],
    ) -> Result<Option<u32>, ()> {
        let cfg = &self.job.cfg;
        let ch = &mut self.choices[c];
        let id = self.sampler.pick(logits, &ch.seen, cfg);
        if cfg.repetition_penalty != 1.0 {
            ch.seen.push(id);
        }
        let mut reason = None;
        if cfg.stop_ids.contains(&id) {
            reason = Some("stop");
        } else {
            ch.tokens += 1;
            let piece = match ch.dec.push(tok, id) {
                Ok(p) => p,
                Err(x) => {
                    let _ = self.job.tx.send(Ev::Error(x.to_string()));
                    return Err(());
                }
            };
            ch.text.push_str(&piece);
            let stop = &self.job.stop;
            // Hold back text that could be the start of a stop string.
            let mut upto = ch.text.len();
            if let Some(pos) = stop.iter().filter_map(|s| ch.text.find(s.as_str())).min() {
                ch.text.truncate(pos);
                upto = pos.max(ch.sent);
                reason = Some("stop");
            } else if let Some(longest) = stop.iter().map(|s| s.len()).max() {
                let mut keep = upto.saturating_sub(longest.saturating_sub(1));
                while !ch.text.is_char_boundary(keep) {
                    keep -= 1;
                }
                upto = keep.max(ch.sent);
            }
            if reason.is_none() && ch.tokens >= cfg.max_new_tokens {
                reason = Some("length");
                upto = ch.text.len();
            }
            if upto > ch.sent {
                let piece = ch.text[ch.sent..upto].to_string();
                ch.sent = upto;
                if self.job.tx.send(Ev::Delta(c, piece)).is_err() {
                    return Err(());
                }
            }
        }
        let Some(reason) = reason else {
            return Ok(Some(id));
        };
        ch.done = true;
        self.left -= 1;
        self.completion += ch.tokens;
        let _ = self.job.tx.send(Ev::Finish { choice: c, reason });
        if self.left == 0 {
            let _ = self.job.tx.send(Ev::Done(self.completion));
        }
        Ok(None)
    }
}

/// Most padded prompt tokens prefilled in one forward.
const PREFILL_TOKENS: usize = 4096;

/// One row of the running batch: which request and choice it decodes and the token to feed
/// at the next step.
struct Row {
    req: u64,
    choice: usize,
    next: u32,
}

/// The scheduler: owns the decoding of every request. Queued requests join the running batch
/// at step boundaries (after their own prefill) while it has fewer than `max_batch` rows;
/// every step decodes all rows together; rows leave when they finish, and a request whose
/// client went away (its event receiver dropped) leaves before the next step.
fn scheduler(e: Arc<Engine>, jobs: std::sync::mpsc::Receiver<Job>, max_batch: usize) {
    let model = &e.p.model;
    let tok = &e.p.tokenizer;
    let mut batch = DecodeBatch::new(model);
    let mut rows: Vec<Row> = Vec::new();
    let mut reqs: HashMap<u64, Running> = HashMap::new();
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut next_id = 0u64;
    loop {
        if rows.is_empty() && queue.is_empty() {
            match jobs.recv() {
                Ok(j) => queue.push_back(j),
                Err(_) => return, // the server is gone
            }
        }
        while let Ok(j) = jobs.try_recv() {
            queue.push_back(j);
        }
        // Admit queued requests (FIFO while they fit): prefill them together, sample each
        // choice's first token, join the running rows.
        let mut admit: Vec<Job> = Vec::new();
        let mut admitted_rows = rows.len();
        while let Some(j) = queue.front() {
            if admitted_rows > 0 && admitted_rows + j.n > max_batch {
                break;
            }
            let job = queue.pop_front().expect("front");
            if job.tx.is_closed() {
                e.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            admitted_rows += job.n;
            admit.push(job);
        }
        // Prefill groups of at most PREFILL_TOKENS padded tokens (memory of the attention
        // scores); a longer prompt goes alone.
        while !admit.is_empty() {
            let mut take = 1;
            let mut longest = admit[0].prompt.len();
            while take < admit.len() {
                let l = longest.max(admit[take].prompt.len());
                if l * (take + 1) > PREFILL_TOKENS {
                    break;
                }
                longest = l;
                take += 1;
            }
            let group: Vec<Job> = admit.drain(..take).collect();
            let prompts: Vec<&[u32]> = group.iter().map(|j| j.prompt.as_slice()).collect();
            let pre = match DecodeBatch::prefill_many(model, &prompts) {
                Ok(x) => x,
                Err(x) => {
                    for j in &group {
                        let _ = j.tx.send(Ev::Error(x.to_string()));
                    }
                    continue;
                }
            };
            let mut join_idx = Vec::new();
            let mut new_rows = Vec::new();
            let mut new_reqs = Vec::new();
            for (i, job) in group.into_iter().enumerate() {
                let mut r = Running::new(job);
                let mut joined = Vec::new();
                for c in 0..r.job.n {
                    match r.advance(tok, c, &mut pre.logits[i].clone()) {
                        Ok(Some(t)) => joined.push((c, t)),
                        Ok(None) => {}
                        Err(()) => {
                            e.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                            joined.clear();
                            break;
                        }
                    }
                }
                if joined.is_empty() {
                    continue;
                }
                let id = next_id;
                next_id += 1;
                for (choice, next) in joined {
                    join_idx.push(i);
                    new_rows.push(Row {
                        req: id,
                        choice,
                        next,
                    });
                }
                new_reqs.push((id, r));
            }
            match batch.join_rows(&pre, &join_idx) {
                Ok(()) => {
                    rows.extend(new_rows);
                    reqs.extend(new_reqs);
                }
                Err(x) => {
                    for (_, r) in new_reqs {
                        let _ = r.job.tx.send(Ev::Error(x.to_string()));
                    }
                }
            }
        }
        if rows.is_empty() {
            e.stats.running.store(0, Ordering::Relaxed);
            e.stats.queued.store(queue.len(), Ordering::Relaxed);
            continue;
        }
        // Requests whose client went away leave before the step.
        let gone: Vec<u64> = reqs
            .iter()
            .filter(|(_, r)| r.job.tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        if !gone.is_empty() {
            e.stats
                .cancelled
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
            for id in &gone {
                reqs.remove(id);
            }
            let keep: Vec<bool> = rows.iter().map(|r| reqs.contains_key(&r.req)).collect();
            if let Err(x) = retain(&mut batch, &mut rows, &keep) {
                fail_all(&mut batch, &mut rows, &mut reqs, &x.to_string());
            }
            e.stats.running.store(rows.len(), Ordering::Relaxed);
            if rows.is_empty() {
                continue;
            }
        }
        let st = &e.stats;
        st.running.store(rows.len(), Ordering::Relaxed);
        st.queued.store(queue.len(), Ordering::Relaxed);
        st.peak_batch.fetch_max(rows.len(), Ordering::Relaxed);
        st.steps.fetch_add(1, Ordering::Relaxed);
        st.tokens.fetch_add(rows.len() as u64, Ordering::Relaxed);
        let inputs: Vec<u32> = rows.iter().map(|r| r.next).collect();
        let logits = match batch.step(model, &inputs) {
            Ok(l) => l,
            Err(x) => {
                fail_all(&mut batch, &mut rows, &mut reqs, &x.to_string());
                continue;
            }
        };
        let mut keep = vec![true; rows.len()];
        let mut ended: Vec<u64> = Vec::new();
        for (j, mut l) in logits.into_iter().enumerate() {
            let row = &mut rows[j];
            let Some(r) = reqs.get_mut(&row.req) else {
                keep[j] = false;
                continue;
            };
            match r.advance(tok, row.choice, &mut l) {
                Ok(Some(t)) => row.next = t,
                Ok(None) => keep[j] = false,
                Err(()) => {
                    keep[j] = false;
                    ended.push(row.req);
                    reqs.remove(&row.req);
                }
            }
        }
        // Rows of requests that ended in this step, and requests with no rows left.
        for (j, r) in rows.iter().enumerate() {
            if ended.contains(&r.req) {
                keep[j] = false;
            }
        }
        reqs.retain(|_, r| r.left > 0);
        if let Err(x) = retain(&mut batch, &mut rows, &keep) {
            fail_all(&mut batch, &mut rows, &mut reqs, &x.to_string());
        }
        e.stats
            .cancelled
            .fetch_add(ended.len() as u64, Ordering::Relaxed);
        e.stats.running.store(rows.len(), Ordering::Relaxed);
    }
}

fn retain(batch: &mut DecodeBatch, rows: &mut Vec<Row>, keep: &[bool]) -> anyhow::Result<()> {
    if keep.iter().all(|k| *k) {
        return Ok(());
    }
    batch.retain(keep)?;
    let mut j = 0;
    rows.retain(|_| {
        j += 1;
        keep[j - 1]
    });
    Ok(())
}

/// A failed step ends every running request with the error (the server keeps serving).
fn fail_all(
    batch: &mut DecodeBatch,
    rows: &mut Vec<Row>,
    reqs: &mut HashMap<u64, Running>,
    msg: &str,
) {
    for (_, r) in reqs.drain() {
        let _ = r.job.tx.send(Ev::Error(msg.to_string()));
    }
    rows.clear();
    let _ = batch.retain(&vec![false; batch.len()]);
}

async fn chat(
    State(e): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_auth(&e, &headers)?;
    let req: ChatRequest = serde_json::from_slice(&body)
        .map_err(|x| ApiError::bad(format!("invalid request body: {x}"), None))?;
    if let Some(m) = &req.model {
        if !m.is_empty() && *m != e.model_id {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "The model `{m}` does not exist; this server serves `{}`.",
                    e.model_id
                ),
                kind: "invalid_request_error",
                param: Some("model"),
                code: Some("model_not_found"),
            });
        }
    }
    let n = req.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::bad("n must be between 1 and 16", Some("n")));
    }
    let temperature = req.temperature.unwrap_or(e.defaults.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let top_p = req.top_p.unwrap_or(e.defaults.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p must be in (0, 1]", Some("top_p")));
    }
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(e.defaults.max_new_tokens);
    if max_tokens == 0 {
        return Err(ApiError::bad(
            "max_tokens must be at least 1",
            Some("max_tokens"),
        ));
    }
    let stop = stops(&req.stop)?;
    let (system, history, query) = split_messages(&req.messages)?;
    let rt = e
        .template
        .resolve(&e.p.tokenizer)
        .map_err(|x| ApiError::bad(x.to_string(), None))?;
    let enc = rt
        .encode_prompt(system.as_deref(), &history, &query, e.defaults.max_length)
        .map_err(|x| ApiError::bad(x.to_string(), Some("messages")))?
        .ok_or_else(|| {
            ApiError::bad(
                "the last message alone is longer than the context",
                Some("messages"),
            )
        })?;
    let prompt_tokens = enc.input_ids.len();
    let mut cfg = e.defaults.config(rt.stop_ids());
    // ChatGLM2/3's output layer is padded past the vocabulary (65024 logits, 64794 tokens):
    // sample only real tokens, as predict/chat/generate do.
    cfg.vocab_size = e.p.model.is_chatglm().then(|| e.p.tokenizer.vocab_size());
    cfg.temperature = temperature;
    cfg.top_p = top_p;
    cfg.do_sample = temperature > 0.0;
    // The reply ends at the model's context ("length"), as the positions run out.
    let context = e.p.model.max_positions();
    if context > 0 && prompt_tokens >= context {
        return Err(ApiError::bad(
            format!("the prompt has {prompt_tokens} tokens; the model's context is {context}"),
            Some("messages"),
        ));
    }
    cfg.max_new_tokens = if context > 0 {
        max_tokens.min(context - prompt_tokens)
    } else {
        max_tokens
    };
    if let Some(s) = req.seed {
        cfg.seed = s;
    }
    let id = request_id();
    let created = now();
    let model_id = e.model_id.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Ev>();
    e.jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(Job {
            prompt: enc.input_ids,
            n,
            cfg,
            stop,
            tx,
        })
        .map_err(|_| server_error("the generation scheduler stopped".into()))?;
    if !req.stream {
        let mut texts = vec![String::new(); n];
        let mut finish = vec![""; n];
        let completion = loop {
            match rx.recv().await {
                Some(Ev::Delta(c, t)) => texts[c].push_str(&t),
                Some(Ev::Finish { choice, reason }) => finish[choice] = reason,
                Some(Ev::Done(c)) => break c,
                Some(Ev::Error(x)) => return Err(server_error(x)),
                None => return Err(server_error("generation ended early".into())),
            }
        };
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model_id,
            "choices": texts.iter().zip(&finish).enumerate().map(|(i, (t, f))| json!({
                "index": i, "message": {"role": "assistant", "content": t},
                "finish_reason": f, "logprobs": null,
            })).collect::<Vec<_>>(),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
        });
        return Ok(Json(body).into_response());
    }
    // Streaming: the scheduler's events become chunks as they come; dropping the stream (the
    // client went away) drops the receiver, which cancels this request's rows.
    let chunk = move |choices: Value, usage: Value| -> Event {
        let mut v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                           "model": model_id, "choices": choices});
        if !usage.is_null() {
            v["usage"] = usage;
        }
        Event::default().data(v.to_string())
    };
    let first: Vec<Result<Event, Infallible>> = (0..n)
        .map(|i| {
            Ok(chunk(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
                Value::Null,
            ))
        })
        .collect();
    let chunk2 = chunk.clone();
    let body = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |ev| {
        Ok::<_, Infallible>(match ev {
            Ev::Delta(i, t) => chunk2(
                json!([{"index": i, "delta": {"content": t}, "finish_reason": null}]),
                Value::Null,
            ),
            Ev::Finish { choice, reason } => chunk2(
                json!([{"index": choice, "delta": {}, "finish_reason": reason}]),
                Value::Null,
            ),
            Ev::Done(c) => chunk2(
                json!([]),
                json!({"prompt_tokens": prompt_tokens, "completion_tokens": c,
                       "total_tokens": prompt_tokens + c}),
            ),
            Ev::Error(msg) => Event::default()
                .data(json!({"error": {"message": msg, "type": "server_error"}}).to_string()),
        })
    });
    let done = tokio_stream::once(Ok(Event::default().data("[DONE]")));
    let stream = tokio_stream::iter(first).chain(body).chain(done);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn server_error(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// The browser chat page of `llmtune web` (static; it talks to the API below with SSE).
const WEB_PAGE: &str = include_str!("web.html");

async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(WEB_PAGE)
}

/// Scheduler counters, for load tests and monitoring.
#[derive(Default)]
struct Stats {
    /// Sequences in the running batch now.
    running: AtomicUsize,
    /// Requests waiting to join.
    queued: AtomicUsize,
    /// The most sequences ever decoded in one step.
    peak_batch: AtomicUsize,
    /// Batched decode steps run.
    steps: AtomicU64,
    /// Tokens produced (all requests).
    tokens: AtomicU64,
    /// Requests that ended because their client went away (before or while decoding).
    cancelled: AtomicU64,
}

async fn stats(State(e): State<Arc<Engine>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    check_auth(&e, &headers)?;
    let s = &e.stats;
    Ok(Json(json!({
        "running": s.running.load(Ordering::Relaxed),
        "queued": s.queued.load(Ordering::Relaxed),
        "peak_batch": s.peak_batch.load(Ordering::Relaxed),
        "steps": s.steps.load(Ordering::Relaxed),
        "tokens": s.tokens.load(Ordering::Relaxed),
        "cancelled": s.cancelled.load(Ordering::Relaxed),
        "max_batch": e.max_batch,
    })))
}

/// The router, for the server and for tests; `web` adds the chat page at `/`.
fn router(e: Arc<Engine>, web: bool) -> Router {
    let r = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/stats", get(stats));
    let r = if web { r.route("/", get(page)) } else { r };
    r.fallback(not_found).with_state(e)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    eprintln!("shutting down: finishing running requests");
}

/// `llmtune api` (`web` = false) or `llmtune web` (the same server plus the chat page at `/`).
pub fn run(a: ApiArgs, web: bool) -> anyhow::Result<ExitCode> {
    let (p, name) = load_merged(&a.model_name_or_path, &a.checkpoint_dir)?;
    let template = match &a.template {
        Some(t) => Template::by_name(t)?,
        None => Template::default_for_model_type(&p.info.model_type, &p.tokenizer),
    };
    template.resolve(&p.tokenizer)?; // fail now, not per request
    let model_id = a.model_id.clone().unwrap_or_else(|| {
        std::path::Path::new(&name)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or(name)
    });
    let (jobs, queue) = std::sync::mpsc::channel();
    let engine = Arc::new(Engine {
        p,
        template,
        model_id,
        api_key: a.api_key.clone(),
        defaults: a.gen.clone(),
        jobs: Mutex::new(jobs),
        stats: Stats::default(),
        max_batch: a.max_batch as usize,
    });
    let e2 = engine.clone();
    let max_batch = a.max_batch as usize;
    std::thread::Builder::new()
        .name("llmtune-scheduler".into())
        .spawn(move || scheduler(e2, queue, max_batch))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", a.host, a.port)
            .parse()
            .with_context(|| format!("--host {} --port {}: not an address", a.host, a.port))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "llmtune {}: serving {} on http://{local}/v1",
            if web { "web" } else { "api" },
            engine.model_id
        );
        if web {
            eprintln!("chat page: http://{local}/");
        }
        axum::serve(listener, router(engine, web))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
