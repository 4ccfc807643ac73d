//! Tokenizers for llmtune.
//!
//! One [`Tokenizer`] type serves every consumer (data encoding, generation, chat, the API
//! server and export). It wraps a Hugging Face `tokenizers` pipeline loaded from a
//! `tokenizer.json` or built from GGUF metadata (byte-level BPE from tokens + merges), and
//! knows the model's special tokens (bos, eos, pad) from `tokenizer_config.json`,
//! `generation_config.json` or the GGUF header.
//!
//! ChatGLM's SentencePiece tokenizers (v1/v2/v3, [`chatglm`]) are another backend behind the
//! same type: [`Tokenizer::from_dir`] picks them for a folder with `ice_text.model`, or with
//! `tokenizer.model` and a `ChatGLMTokenizer` config, when it has no `tokenizer.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod chatglm;
pub mod gguf;

pub use chatglm::{ChatGlmTokenizer, ChatGlmVersion};

/// Errors from loading or running a tokenizer. Each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid tokenizer file {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("tokenizer error: {0}")]
    Run(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// Special tokens of a model, as ids of its vocabulary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    /// The primary eos (the one appended after a training target).
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    /// Every id that ends generation (eos plus e.g. `generation_config.json`'s list).
    pub stop: Vec<u32>,
}

/// The tokenizer implementation behind [`Tokenizer`].
#[derive(Clone)]
enum Backend {
    /// A Hugging Face `tokenizers` pipeline (`tokenizer.json`, GGUF).
    Hf(Box<tokenizers::Tokenizer>),
    /// A ChatGLM SentencePiece tokenizer.
    ChatGlm(Arc<ChatGlmTokenizer>),
}

/// A tokenizer with its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Backend,
    specials: SpecialTokens,
    source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("specials", &self.specials)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Invalid {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// `tokenizer_config.json` stores a token either as a string or as `{"content": ...}`.
pub(crate) fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn id_list(v: &serde_json::Value) -> Vec<u32> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl Tokenizer {
    /// Wraps an already-built `tokenizers` pipeline.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        specials: SpecialTokens,
        source: PathBuf,
    ) -> Self {
        let mut t = Self {
            inner: Backend::Hf(Box::new(inner)),
            specials,
            source,
        };
        t.normalize_stop();
        t
    }

    fn normalize_stop(&mut self) {
        if let Some(e) = self.specials.eos {
            if !self.specials.stop.contains(&e) {
                self.specials.stop.insert(0, e);
            }
        }
    }

    /// Loads a `tokenizer.json` file. Special tokens are left unset.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Invalid {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        Ok(Self::from_parts(
            inner,
            SpecialTokens::default(),
            path.to_path_buf(),
        ))
    }

    /// Wraps a ChatGLM tokenizer; its special ids come from [`ChatGlmTokenizer::special_tokens`].
    pub fn from_chatglm(tok: ChatGlmTokenizer) -> Self {
        let specials = tok.special_tokens();
        let source = tok.model_file().to_path_buf();
        let mut t = Self {
            inner: Backend::ChatGlm(Arc::new(tok)),
            specials,
            source,
        };
        t.normalize_stop();
        t
    }

    /// Loads a Hugging Face model folder's tokenizer: `tokenizer.json`, with special tokens
    /// from `tokenizer_config.json`, then `config.json` / `generation_config.json` ids.
    /// A folder without `tokenizer.json` that holds a ChatGLM tokenizer (see
    /// [`ChatGlmTokenizer::detect`]) loads that instead.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.join("tokenizer.json").exists() {
            if let Some(version) = ChatGlmTokenizer::detect(dir)? {
                return Ok(Self::from_chatglm(ChatGlmTokenizer::from_dir(
                    dir, version,
                )?));
            }
        }
        let mut tok = Self::from_file(dir.join("tokenizer.json"))?;
        let mut sp = SpecialTokens::default();
        let tc = dir.join("tokenizer_config.json");
        if tc.exists() {
            let v = read_json(&tc)?;
            let lookup = |key: &str| {
                v.get(key)
                    .and_then(token_string)
                    .and_then(|s| tok.token_to_id(&s))
            };
            sp.bos = lookup("bos_token");
            sp.eos = lookup("eos_token");
            sp.pad = lookup("pad_token");
        }
        for f in ["config.json", "generation_config.json"] {
            let p = dir.join(f);
            if !p.exists() {
                continue;
            }
            let v = read_json(&p)?;
            if sp.bos.is_none() {
                sp.bos = v
                    .get("bos_token_id")
                    .and_then(|x| x.as_u64())
                    .map(|x| x as u32);
            }
            if let Some(e) = v.get("eos_token_id") {
                let ids = id_list(e);
                if sp.eos.is_none() {
                    sp.eos = ids.first().copied();
                }
                for id in ids {
                    if !sp.stop.contains(&id) {
                        sp.stop.push(id);
                    }
                }
            }
            if sp.pad.is_none() {
                sp.pad = v
                    .get("pad_token_id")
                    .and_then(|x| x.as_u64())
                    .map(|x| x as u32);
            }
        }
        tok.specials = sp;
        tok.normalize_stop();
        Ok(tok)
    }

    /// Where this tokenizer was loaded from (for messages and cache keys).
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    pub fn specials_mut(&mut self) -> &mut SpecialTokens {
        &mut self.specials
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.specials.bos
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.specials.eos
    }
    /// The pad id; falls back to eos when the model defines none (as most trainers do).
    pub fn pad_id(&self) -> Option<u32> {
        self.specials.pad.or(self.specials.eos)
    }
    /// Ids that end generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.specials.stop
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Backend::Hf(t) => t.get_vocab_size(true),
            Backend::ChatGlm(t) => t.vocab_size(),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Backend::Hf(t) => t.token_to_id(token),
            Backend::ChatGlm(t) => t.token_to_id(token),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Backend::Hf(t) => t.id_to_token(id),
            Backend::ChatGlm(t) => t.id_to_token(id),
        }
    }

    /// Encodes text. With a `tokenizers` pipeline, special-token strings inside the text map
    /// to their ids; ChatGLM tokenizers treat them as plain text, as the reference does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match &self.inner {
            Backend::Hf(t) => {
                let enc = t
                    .encode(text, add_special_tokens)
                    .map_err(|e| TokenizerError::Run(e.to_string()))?;
                Ok(enc.get_ids().to_vec())
            }
            Backend::ChatGlm(t) => t.encode(text, add_special_tokens),
        }
    }

    /// Encodes many texts in parallel (order kept).
    pub fn encode_batch(&self, texts: &[&str], add_special_tokens: bool) -> Result<Vec<Vec<u32>>> {
        match &self.inner {
            Backend::Hf(t) => {
                let encs = t
                    .encode_batch(texts.to_vec(), add_special_tokens)
                    .map_err(|e| TokenizerError::Run(e.to_string()))?;
                Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
            }
            Backend::ChatGlm(t) => texts
                .iter()
                .map(|s| t.encode(s, add_special_tokens))
                .collect(),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        match &self.inner {
            Backend::Hf(t) => t
                .decode(ids, skip_special_tokens)
                .map_err(|e| TokenizerError::Run(e.to_string())),
            Backend::ChatGlm(t) => t.decode(ids, skip_special_tokens),
        }
    }

    /// Whether decode removes spaces before punctuation (transformers'
    /// `clean_up_tokenization`; ChatGLM-6B does, `tokenizers` pipelines here do not).
    pub fn cleans_up_spaces(&self) -> bool {
        match &self.inner {
            Backend::Hf(_) => false,
            Backend::ChatGlm(t) => t.clean_up_tokenization_spaces(),
        }
    }

    /// Whether `id` is a special token (an added special token of a `tokenizers` pipeline;
    /// see [`ChatGlmTokenizer::is_special`] for ChatGLM).
    pub fn is_special(&self, id: u32) -> bool {
        match &self.inner {
            Backend::Hf(t) => t
                .get_added_tokens_decoder()
                .get(&id)
                .map(|t| t.special)
                .unwrap_or(false),
            Backend::ChatGlm(t) => t.is_special(id),
        }
    }

    /// The wrapped `tokenizers` pipeline (for export); `None` for a ChatGLM tokenizer.
    pub fn hf(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.inner {
            Backend::Hf(t) => Some(t.as_ref()),
            Backend::ChatGlm(_) => None,
        }
    }

    /// The ChatGLM tokenizer, when this is one.
    pub fn chatglm(&self) -> Option<&ChatGlmTokenizer> {
        match &self.inner {
            Backend::Hf(_) => None,
            Backend::ChatGlm(t) => Some(t),
        }
    }

    /// The vocabulary (token -> id), added tokens included.
    pub fn vocab(&self) -> HashMap<String, u32> {
        match &self.inner {
            Backend::Hf(t) => t.get_vocab(true),
            Backend::ChatGlm(t) => (0..t.vocab_size() as u32)
                .filter_map(|i| t.id_to_token(i).map(|s| (s, i)))
                .collect(),
        }
    }

    /// A string that changes whenever tokenization could change (for cache keys): the
    /// serialized `tokenizers` pipeline, or the ChatGLM version + model-file sha256.
    pub fn fingerprint_text(&self) -> Result<String> {
        match &self.inner {
            Backend::Hf(t) => t
                .to_string(false)
                .map_err(|e| TokenizerError::Run(e.to_string())),
            Backend::ChatGlm(t) => Ok(t.fingerprint()),
        }
    }
}

/// What follows a space that transformers' `clean_up_tokenization` removes (`" ,"` → `","`,
/// `" 'm"` → `"'m"`, `" ' "` → `"'"` ...).
const CLEANUP_TAILS: [&str; 10] = [".", "?", "!", ",", "' ", "n't", "'m", "'s", "'ve", "'re"];

/// The length of `text` that a longer decode cannot change through clean-up: everything
/// before the last space when the text after it could still grow into a clean-up pattern.
fn cleanup_safe_end(text: &str) -> usize {
    match text.rfind(' ') {
        Some(pos) => {
            let rest = &text[pos + 1..];
            // A complete tail was already cleaned up (replace runs once over the full text,
            // so the space still before it stays); only a proper prefix is pending.
            if CLEANUP_TAILS
                .iter()
                .any(|t| t.len() > rest.len() && t.starts_with(rest))
            {
                pos
            } else {
                text.len()
            }
        }
        None => text.len(),
    }
}

/// Decodes tokens incrementally for streaming: returns only newly completed text, holding
/// back bytes of an unfinished UTF-8 sequence. With a tokenizer whose decode cleans up
/// spaces (ChatGLM-6B: `" ,"` → `","`), a last space that clean-up may still remove is held
/// back with what follows it; [`StreamDecoder::finish`] returns what is still held.
///
/// Each push decodes only a short window of the latest tokens (linear in the reply, not
/// quadratic): once everything decoded so far has gone out, the window restarts one chunk
/// back (the chunk gives the next tokens their context, e.g. SentencePiece's leading-space
/// handling), and the text of that chunk counts as already emitted.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// The window decoded on each push: `ids[ctx..]`.
    ctx: usize,
    /// Tokens from here on have text not yet (fully) emitted; `ids[ctx..start]` is context.
    start: usize,
    /// Bytes of the window's text already emitted.
    emitted: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many tokens the next push re-decodes besides the new one (for tests and
    /// diagnostics; stays small while text flows out).
    pub fn window_len(&self) -> usize {
        self.ids.len() - self.ctx
    }

    /// Pushes one token id and returns the text that became final with it (maybe empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids[self.ctx..], true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let end = if tok.cleans_up_spaces() {
            cleanup_safe_end(&text)
        } else {
            text.len()
        };
        let out = self.emit(&text, end);
        if end == text.len() {
            // All out: restart the window at the tokens just emitted, if decoding them on
            // their own gives the end of this window's text (else keep the longer window).
            let chunk = tok.decode(&self.ids[self.start..], true)?;
            if text.ends_with(&chunk) {
                self.ctx = self.start;
                self.start = self.ids.len();
                self.emitted = chunk.len();
            }
        }
        Ok(out)
    }

    /// The text still held back after the last token (trailing spaces, or an unfinished
    /// UTF-8 sequence as U+FFFD), so that all pushes plus `finish` equal the full decode.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let text = tok.decode(&self.ids[self.ctx..], true)?;
        Ok(self.emit(&text, text.len()))
    }

    fn emit(&mut self, text: &str, end: usize) -> String {
        let new = if end >= self.emitted && text.is_char_boundary(self.emitted) {
            text[self.emitted..end].to_string()
        } else {
            String::new()
        };
        self.emitted = end;
        new
    }
}
