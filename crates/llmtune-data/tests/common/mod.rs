//! Test helpers: the fixture tokenizer (skipped when `LLMTUNE_FIXTURES` is unset), the
//! shared data folder (`LLMTUNE_SHARED`), and a byte-level tokenizer built on the fly
//! (one token per UTF-8 byte, so token counts are exact and known in advance).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use llmtune_tokenize::Tokenizer;

/// `$LLMTUNE_FIXTURES`, or prints the skip line and returns `None`.
pub fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

/// `$LLMTUNE_SHARED`, or prints the skip line and returns `None`.
pub fn shared() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_SHARED") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            eprintln!("skipped: LLMTUNE_SHARED not set");
            None
        }
    }
}

/// The fixture tokenizer (`$LLMTUNE_FIXTURES/tokenizer`) with its special tokens.
pub fn fixture_tokenizer() -> Option<Tokenizer> {
    let dir = fixtures()?.join("tokenizer");
    Some(Tokenizer::from_dir(&dir).expect("fixture tokenizer loads"))
}

/// The GPT-2 byte-to-char map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).unwrap();
    }
    map
}

/// Writes a byte-level tokenizer (ids 0..256 = bytes, no merges) with the given added
/// special tokens (ids 256, 257, ...) and a tokenizer_config.json naming bos/eos/pad, and
/// loads it with `Tokenizer::from_dir`.
pub fn byte_tokenizer(
    dir: &Path,
    specials: &[&str],
    bos: Option<&str>,
    eos: Option<&str>,
    pad: Option<&str>,
) -> Tokenizer {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), serde_json::json!(i));
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = serde_json::json!({"bos_token": bos, "eos_token": eos, "pad_token": pad});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    Tokenizer::from_dir(dir).expect("byte tokenizer loads")
}

/// The id of an added special token of [`byte_tokenizer`].
pub fn sid(tok: &Tokenizer, t: &str) -> u32 {
    tok.token_to_id(t).unwrap()
}

/// Byte ids of a text (what [`byte_tokenizer`] gives for text without specials).
pub fn bytes(s: &str) -> Vec<u32> {
    s.bytes().map(|b| b as u32).collect()
}

/// Writes `dataset_info.json` and data files into `dir`.
pub fn write_dataset(dir: &Path, info: &serde_json::Value, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("dataset_info.json"), info.to_string()).unwrap();
    for (name, content) in files {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(p, content).unwrap();
    }
}
