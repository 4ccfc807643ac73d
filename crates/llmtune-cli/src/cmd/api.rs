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
//! Generation runs on a blocking thread; requests take turns on the model (one batch at a
//! time; the `n` choices of a request are decoded together as one batch). A client that drops
//! its stream cancels its generation before the next token. Ctrl-C (or SIGTERM) stops
//! accepting connections and lets running requests finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
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
use llmtune_generate::{generate_cancellable, FinishReason, GenerationConfig};
use llmtune_models::Pretrained;
use llmtune_tokenize::StreamDecoder;
use serde::Deserialize;
use serde_json::{json, Value};
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
    /// One generation at a time.
    turn: Mutex<()>,
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
    use std::sync::atomic::AtomicU64;
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

/// What one decoding run produced per choice.
struct Choice {
    text: String,
    tokens: usize,
    finish: &'static str,
}

/// A piece of streamed output: `(choice index, text)`; `None` text = the choice finished.
type Piece = (usize, Option<String>, &'static str);

/// Runs one request's decoding on the calling (blocking) thread. `emit` gets each new text
/// piece per choice; it returns false when the client is gone (cancels the run).
fn decode(
    e: &Engine,
    prompt: Vec<u32>,
    n: usize,
    cfg: &GenerationConfig,
    stop: &[String],
    mut emit: impl FnMut(usize, &str) -> bool,
) -> anyhow::Result<Vec<Choice>> {
    let _turn = e.turn.lock().unwrap_or_else(|p| p.into_inner());
    let cancel = AtomicBool::new(false);
    let mut decs: Vec<StreamDecoder> = (0..n).map(|_| StreamDecoder::new()).collect();
    let mut texts = vec![String::new(); n];
    let mut sent = vec![0usize; n];
    let mut stopped = vec![false; n];
    let mut err = None;
    let pad = e.p.tokenizer.pad_id().unwrap_or(0);
    let prompts = vec![prompt; n];
    let out = generate_cancellable(
        &e.p.model,
        &prompts,
        pad,
        cfg,
        |row, tok| {
            if stopped[row] || cfg.stop_ids.contains(&tok) {
                return;
            }
            let piece = match decs[row].push(&e.p.tokenizer, tok) {
                Ok(s) => s,
                Err(x) => {
                    err = Some(x);
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
            };
            texts[row].push_str(&piece);
            // Hold back text that could be the start of a stop string.
            let mut upto = texts[row].len();
            if let Some(pos) = stop
                .iter()
                .filter_map(|s| texts[row].find(s.as_str()))
                .min()
            {
                texts[row].truncate(pos);
                upto = pos;
                stopped[row] = true;
            } else if let Some(longest) = stop.iter().map(|s| s.len()).max() {
                let mut keep = upto.saturating_sub(longest.saturating_sub(1));
                while !texts[row].is_char_boundary(keep) {
                    keep -= 1;
                }
                upto = keep.max(sent[row]);
            }
            if upto > sent[row] {
                if !emit(row, &texts[row][sent[row]..upto]) {
                    cancel.store(true, Ordering::Relaxed);
                }
                sent[row] = upto;
            }
            if stopped.iter().all(|s| *s) {
                cancel.store(true, Ordering::Relaxed);
            }
        },
        &cancel,
    )?;
    if let Some(x) = err {
        return Err(x.into());
    }
    let mut choices = Vec::with_capacity(n);
    for (row, g) in out.iter().enumerate() {
        if sent[row] < texts[row].len() {
            emit(row, &texts[row][sent[row]..]);
        }
        let finish = if stopped[row] || g.finish == FinishReason::Stop {
            "stop"
        } else {
            "length"
        };
        choices.push(Choice {
            text: std::mem::take(&mut texts[row]),
            tokens: g.content_tokens().len(),
            finish,
        });
    }
    Ok(choices)
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
    cfg.temperature = temperature;
    cfg.top_p = top_p;
    cfg.do_sample = temperature > 0.0;
    cfg.max_new_tokens = max_tokens;
    if let Some(s) = req.seed {
        cfg.seed = s;
    }
    let id = request_id();
    let created = now();
    let model_id = e.model_id.clone();
    if !req.stream {
        let e2 = e.clone();
        let choices = tokio::task::spawn_blocking(move || {
            decode(&e2, enc.input_ids, n, &cfg, &stop, |_, _| true)
        })
        .await
        .map_err(|x| server_error(x.to_string()))?
        .map_err(|x| server_error(x.to_string()))?;
        let completion: usize = choices.iter().map(|c| c.tokens).sum();
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model_id,
            "choices": choices.iter().enumerate().map(|(i, c)| json!({
                "index": i, "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish, "logprobs": null,
            })).collect::<Vec<_>>(),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
        });
        return Ok(Json(body).into_response());
    }
    // Streaming: the blocking decoder sends pieces through a channel; a closed channel (the
    // client went away) cancels the decoding.
    let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(256);
    let e2 = e.clone();
    tokio::task::spawn_blocking(move || {
        let res = decode(&e2, enc.input_ids, n, &cfg, &stop, |row, text| {
            tx.blocking_send((row, Some(text.to_string()), "")).is_ok()
        });
        match res {
            Ok(choices) => {
                let completion: usize = choices.iter().map(|c| c.tokens).sum();
                for (i, c) in choices.iter().enumerate() {
                    let _ = tx.blocking_send((i, None, c.finish));
                }
                let _ = tx.blocking_send((usize::MAX, Some(completion.to_string()), ""));
            }
            Err(x) => {
                let _ = tx.blocking_send((usize::MAX - 1, Some(x.to_string()), ""));
            }
        }
    });
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
    let body = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |(i, text, finish)| {
        Ok::<_, Infallible>(match (i, text) {
            (usize::MAX, Some(c)) => {
                let c: usize = c.parse().unwrap_or(0);
                chunk2(
                    json!([]),
                    json!({"prompt_tokens": prompt_tokens, "completion_tokens": c,
                           "total_tokens": prompt_tokens + c}),
                )
            }
            (x, Some(msg)) if x == usize::MAX - 1 => Event::default()
                .data(json!({"error": {"message": msg, "type": "server_error"}}).to_string()),
            (i, Some(t)) => chunk2(
                json!([{"index": i, "delta": {"content": t}, "finish_reason": null}]),
                Value::Null,
            ),
            (i, None) => chunk2(
                json!([{"index": i, "delta": {}, "finish_reason": finish}]),
                Value::Null,
            ),
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

/// The router, for the server and for tests.
fn router(e: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .with_state(e)
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

pub fn run(a: ApiArgs) -> anyhow::Result<ExitCode> {
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
    let engine = Arc::new(Engine {
        p,
        template,
        model_id,
        api_key: a.api_key.clone(),
        defaults: a.gen.clone(),
        turn: Mutex::new(()),
    });
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
            "llmtune api: serving {} on http://{local}/v1",
            engine.model_id
        );
        axum::serve(listener, router(engine))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
