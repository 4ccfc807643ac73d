//! Tokenizer parity with the reference (`tokenizers` / transformers): ids exact on every
//! case of `$LLMTUNE_FIXTURES/tokenizer/tokenizer_cases.json`, decodes exact.

use std::path::PathBuf;

use llmtune_tokenize::Tokenizer;

fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

#[test]
fn every_case_encodes_and_decodes_like_the_reference() {
    let Some(dir) = fixtures() else { return };
    let dir = dir.join("tokenizer");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_cases.json")).unwrap())
            .unwrap();
    let specials = cases["special_tokens"].as_object().unwrap();
    for (name, id) in specials {
        assert_eq!(
            tok.token_to_id(name),
            Some(id.as_u64().unwrap() as u32),
            "special {name}"
        );
    }
    assert_eq!(
        tok.vocab_size() as u64,
        cases["vocab_size_with_specials"].as_u64().unwrap(),
        "vocab size with specials"
    );
    let list = cases["cases"].as_array().unwrap();
    assert!(!list.is_empty());
    for c in list {
        let id = &c["id"];
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got, want, "case {id}: ids of {text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            c["decoded"].as_str().unwrap(),
            "case {id}: decode"
        );
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            c["decoded_skip_special"].as_str().unwrap(),
            "case {id}: decode(skip_special_tokens)"
        );
    }
    eprintln!("{} tokenizer cases equal", list.len());
}

#[test]
fn special_tokens_come_from_the_model_folder() {
    let Some(dir) = fixtures() else { return };
    let tok = Tokenizer::from_dir(dir.join("llama")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("llama/generation_config.json")).unwrap(),
    )
    .unwrap();
    let eos: Vec<u32> = cfg["eos_token_id"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    for e in &eos {
        assert!(
            tok.stop_ids().contains(e),
            "stop ids {:?} lack {e}",
            tok.stop_ids()
        );
    }
    assert_eq!(tok.token_to_id("<|im_end|>"), tok.eos_id());
    assert_eq!(
        tok.pad_id(),
        Some(cfg["pad_token_id"].as_u64().unwrap() as u32)
    );
}

#[test]
fn a_missing_file_is_named_in_the_error() {
    let err = Tokenizer::from_file("/nonexistent/tokenizer.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
}

#[test]
fn a_corrupt_file_is_named_in_the_error() {
    let dir = std::env::temp_dir().join(format!("llmtune-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, "{\"model\": ").unwrap();
    let err = Tokenizer::from_file(&p).unwrap_err().to_string();
    assert!(
        err.contains("invalid tokenizer file") && err.contains("tokenizer.json"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The streaming decoder's pushes equal those of decoding the whole reply on every push
/// (what it did before it became incremental), and each push re-decodes only a few tokens.
#[test]
fn streaming_is_incremental_and_equals_full_redecoding() {
    use llmtune_tokenize::StreamDecoder;
    let Some(dir) = fixtures() else { return };
    let dir = dir.join("tokenizer");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_cases.json")).unwrap())
            .unwrap();
    // Every case's ids one after the other (a long reply), and each case alone; a text with
    // multi-byte characters split over tokens.
    let mut all: Vec<Vec<u32>> = vec![];
    for c in cases["cases"].as_array().unwrap() {
        all.push(
            c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect(),
        );
    }
    all.push(all.concat());
    all.push(
        tok.encode("emoji 🚀🦙 and 中文字符, ünïcödé — done.", false)
            .unwrap(),
    );
    for ids in &all {
        let mut dec = StreamDecoder::new();
        // The former algorithm: decode everything, emit what is new unless it ends in U+FFFD.
        let mut emitted = 0usize;
        let mut max_window = 0;
        for (i, &id) in ids.iter().enumerate() {
            let got = dec.push(&tok, id).unwrap();
            let full = tok.decode(&ids[..=i], true).unwrap();
            let want = if full.ends_with('\u{FFFD}') {
                String::new()
            } else {
                let w = full[emitted..].to_string();
                emitted = full.len();
                w
            };
            assert_eq!(got, want, "push {i} of {ids:?}");
            max_window = max_window.max(dec.window_len());
        }
        let rest = dec.finish(&tok).unwrap();
        let full = tok.decode(ids, true).unwrap();
        assert_eq!(rest, full[emitted.min(full.len())..], "finish");
        assert!(
            max_window <= 8,
            "window grew to {max_window} tokens of {}",
            ids.len()
        );
    }
}
