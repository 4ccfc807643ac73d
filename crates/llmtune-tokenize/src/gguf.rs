//! Byte-level BPE tokenizers rebuilt from GGUF metadata (`tokenizer.ggml.*`).
//!
//! The GGUF header itself is parsed by the model loader; this module turns the token list,
//! merges, token types and pre-tokenizer name into a `tokenizers` pipeline equal to the
//! model's original `tokenizer.json`.

use std::path::PathBuf;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::{SpecialTokens, Tokenizer, TokenizerError};

/// The `tokenizer.ggml.*` fields needed to rebuild a BPE tokenizer.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model` (only `gpt2`, i.e. byte-level BPE, is supported).
    pub model: String,
    /// `tokenizer.ggml.pre` (e.g. `smollm`, `qwen2`, `llama-bpe`, `default`).
    pub pre: String,
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte.
    pub token_types: Vec<i32>,
    /// `"a b"` strings.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    /// Extra stop ids (e.g. `tokenizer.ggml.eot_token_id`).
    pub extra_stop: Vec<u32>,
}

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split(regex: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let s = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| TokenizerError::Run(e.to_string()))?;
    Ok(PreTokenizerWrapper::Split(s))
}

/// Builds the tokenizer. `source` is the GGUF file (for messages).
pub fn tokenizer_from_gguf(v: &GgufVocab, source: PathBuf) -> Result<Tokenizer, TokenizerError> {
    let invalid = |msg: String| TokenizerError::Invalid {
        path: source.clone(),
        msg,
    };
    if v.model != "gpt2" {
        return Err(invalid(format!(
            "tokenizer.ggml.model = {:?} is not supported (only byte-level BPE `gpt2`)",
            v.model
        )));
    }
    if v.tokens.is_empty() {
        return Err(invalid("tokenizer.ggml.tokens is empty".into()));
    }
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (i, t) in v.tokens.iter().enumerate() {
        vocab.insert(t.clone(), i as u32);
    }
    let mut merges = Vec::with_capacity(v.merges.len());
    for (i, m) in v.merges.iter().enumerate() {
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| invalid(format!("tokenizer.ggml.merges[{i}] = {m:?} has no space")))?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| invalid(format!("cannot build BPE: {e}")))?;
    let mut tk = tokenizers::Tokenizer::new(bpe);

    let byte_level_no_regex = ByteLevel::new(false, true, false);
    let pre: PreTokenizerWrapper = match v.pre.as_str() {
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])),
        "qwen2" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(QWEN2_REGEX)?,
            PreTokenizerWrapper::ByteLevel(byte_level_no_regex),
        ])),
        "llama-bpe" | "llama3" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(LLAMA3_REGEX)?,
            PreTokenizerWrapper::ByteLevel(byte_level_no_regex),
        ])),
        _ => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(GPT2_REGEX)?,
            PreTokenizerWrapper::ByteLevel(byte_level_no_regex),
        ])),
    };
    if v.pre == "qwen2" {
        tk.with_normalizer(Some(NFC))
            .map_err(|e| invalid(e.to_string()))?;
    }
    tk.with_pre_tokenizer(Some(pre));
    tk.with_decoder(Some(ByteLevelDecoder::default()));

    // Control (3) and user-defined (4) tokens are matched as whole strings before BPE.
    let (mut control, mut user) = (Vec::new(), Vec::new());
    for (i, t) in v.tokens.iter().enumerate() {
        match v.token_types.get(i).copied().unwrap_or(1) {
            3 => control.push(AddedToken::from(t.clone(), true).normalized(false)),
            4 => user.push(AddedToken::from(t.clone(), false).normalized(false)),
            _ => {}
        }
    }
    tk.add_special_tokens(control)
        .map_err(|e| invalid(e.to_string()))?;
    tk.add_tokens(user).map_err(|e| invalid(e.to_string()))?;

    let mut specials = SpecialTokens {
        bos: v.bos,
        eos: v.eos,
        pad: v.pad,
        stop: vec![],
    };
    for &id in &v.extra_stop {
        if !specials.stop.contains(&id) {
            specials.stop.push(id);
        }
    }
    Ok(Tokenizer::from_parts(tk, specials, source))
}

/// The `tokenizer.ggml.pre` name that llama.cpp knows for a `tokenizers` pipeline, recognized
/// from its serialized `pre_tokenizer` (the converter hashes a test string's encoding instead,
/// which only matches the published vocabularies): `smollm` (single digits + byte-level with
/// the GPT-2 regex), `qwen2` / `llama-bpe` (their split regex + byte-level without regex),
/// `gpt-2` (byte-level with the GPT-2 regex alone). `None` for anything else.
pub fn pre_tokenizer_name(tokenizer_json: &serde_json::Value) -> Option<&'static str> {
    let pre = tokenizer_json.get("pre_tokenizer")?;
    let parts: Vec<&serde_json::Value> = match pre.get("type")?.as_str()? {
        "Sequence" => pre.get("pretokenizers")?.as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let ty = |v: &serde_json::Value| v.get("type").and_then(|t| t.as_str()).map(str::to_owned);
    let byte_level = |v: &serde_json::Value, regex: bool| {
        ty(v).as_deref() == Some("ByteLevel")
            && v.get("use_regex").and_then(|b| b.as_bool()).unwrap_or(true) == regex
    };
    match parts.as_slice() {
        [b] if byte_level(b, true) => Some("gpt-2"),
        [d, b]
            if ty(d).as_deref() == Some("Digits")
                && d.get("individual_digits").and_then(|x| x.as_bool()) == Some(true)
                && byte_level(b, true) =>
        {
            Some("smollm")
        }
        [s, b] if ty(s).as_deref() == Some("Split") && byte_level(b, false) => {
            match s.pointer("/pattern/Regex").and_then(|r| r.as_str())? {
                QWEN2_REGEX => Some("qwen2"),
                LLAMA3_REGEX => Some("llama-bpe"),
                GPT2_REGEX => Some("gpt-2"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The `tokenizer.ggml.*` fields of a byte-level BPE `tokenizers` pipeline, as llama.cpp's
/// `convert_hf_to_gguf.py` writes them (`_set_vocab_gpt2`): ids `0..vocab_size` in order
/// (`[PAD{i}]` with type 5 for ids the tokenizer lacks), added special tokens as control (3),
/// other added tokens as user-defined (4), the rest normal (1); merges as `"a b"`.
/// `vocab_size` is the model's (its embedding rows), at least the tokenizer's.
pub fn vocab_for_gguf(tok: &Tokenizer, vocab_size: usize) -> Result<GgufVocab, TokenizerError> {
    let invalid = |msg: String| TokenizerError::Invalid {
        path: tok.source().to_path_buf(),
        msg,
    };
    let hf = tok.hf().ok_or_else(|| {
        invalid("a ChatGLM SentencePiece tokenizer cannot be written as a GGUF vocabulary".into())
    })?;
    let json: serde_json::Value = serde_json::from_str(
        &hf.to_string(false)
            .map_err(|e| TokenizerError::Run(e.to_string()))?,
    )
    .map_err(|e| TokenizerError::Run(e.to_string()))?;
    let model = json.get("model").cloned().unwrap_or_default();
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(invalid(format!(
            "GGUF export supports byte-level BPE tokenizers (tokenizer.ggml.model gpt2); this \
             tokenizer's model is {}",
            model.get("type").unwrap_or(&serde_json::Value::Null)
        )));
    }
    let pre = pre_tokenizer_name(&json).ok_or_else(|| {
        invalid(format!(
            "GGUF export: pre-tokenizer {} is not one llama.cpp knows by name here (smollm, \
             qwen2, llama-bpe, gpt-2)",
            json.get("pre_tokenizer")
                .unwrap_or(&serde_json::Value::Null)
        ))
    })?;
    let vocab = hf.get_vocab(true);
    let n = vocab_size.max(vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0));
    let mut tokens: Vec<Option<String>> = vec![None; n];
    for (t, &i) in &vocab {
        tokens[i as usize] = Some(t.clone());
    }
    let added = hf.get_added_tokens_decoder();
    let mut token_types = Vec::with_capacity(n);
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let ty = match (&t, added.get(&(i as u32))) {
                (None, _) => 5,
                (Some(_), Some(a)) if a.special => 3,
                (Some(_), Some(_)) => 4,
                (Some(_), None) => 1,
            };
            token_types.push(ty);
            t.unwrap_or_else(|| format!("[PAD{i}]"))
        })
        .collect();
    let merges = model
        .get("merges")
        .and_then(|m| m.as_array())
        .map(|a| {
            a.iter()
                .enumerate()
                .map(|(i, m)| match m {
                    serde_json::Value::String(s) => Ok(s.clone()),
                    serde_json::Value::Array(p) if p.len() == 2 => Ok(format!(
                        "{} {}",
                        p[0].as_str().unwrap_or_default(),
                        p[1].as_str().unwrap_or_default()
                    )),
                    other => Err(invalid(format!(
                        "model.merges[{i}] = {other} is not a pair"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(GgufVocab {
        model: "gpt2".into(),
        pre: pre.into(),
        tokens,
        token_types,
        merges,
        bos: tok.bos_id(),
        eos: tok.eos_id(),
        pad: tok.pad_id(),
        extra_stop: vec![],
    })
}
