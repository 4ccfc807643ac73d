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
