//! ChatGLM v1/v2/v3 tokenizer parity with the Python reference (THUDM `tokenization_chatglm.py`
//! under transformers 4.33 + sentencepiece 0.2.3): every field of every case of
//! `$LLMTUNE_FIXTURES/chatglm_tokenizer/tokenizer_cases.json` must match exactly. The model
//! files are read from `$LLMTUNE_SHARED/<path recorded in the JSON>` and checked against the
//! recorded sha256.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llmtune_tokenize::chatglm::{process_response, ChatMessage};
use llmtune_tokenize::{ChatGlmTokenizer, ChatGlmVersion, StreamDecoder, Tokenizer};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn env_dir(name: &str) -> Option<PathBuf> {
    match std::env::var_os(name) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: {name} not set");
            None
        }
    }
}

fn ids(v: &Value, what: &str) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: not an array"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("{what}: not an id")) as u32)
        .collect()
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: not an array"))
        .iter()
        .map(|x| {
            x.as_str()
                .unwrap_or_else(|| panic!("{what}: not a string"))
                .to_string()
        })
        .collect()
}

fn text<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: not a string"))
}

const VERSIONS: [(&str, ChatGlmVersion); 3] = [
    ("v1", ChatGlmVersion::V1),
    ("v2", ChatGlmVersion::V2),
    ("v3", ChatGlmVersion::V3),
];

/// Loads each version's tokenizer from the recorded model file, checking its sha256, and
/// checks the recorded vocabulary size and special ids.
fn load(shared: &Path, cases: &Value) -> BTreeMap<&'static str, Tokenizer> {
    let mut out = BTreeMap::new();
    for (key, version) in VERSIONS {
        let info = &cases["tokenizers"][key];
        let model = shared.join(text(&info["model_file"], "model_file"));
        if let Some(want) = info.get("model_file_sha256").and_then(|v| v.as_str()) {
            let bytes =
                std::fs::read(&model).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
            let got: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(got, want, "{key}: sha256 of {}", model.display());
        }
        let config = match info.get("tokenizer_config").and_then(|v| v.as_str()) {
            Some(p) => {
                serde_json::from_str(&std::fs::read_to_string(shared.join(p)).unwrap()).unwrap()
            }
            None => Value::Object(Default::default()),
        };
        let glm = ChatGlmTokenizer::from_model_file(&model, version, &config).unwrap();
        assert_eq!(glm.model_sha256().len(), 64);
        let tok = Tokenizer::from_chatglm(glm);
        assert_eq!(
            tok.vocab_size() as u64,
            info["vocab_size"].as_u64().unwrap(),
            "{key}: vocab_size"
        );
        let opt = |v: &Value| v.as_u64().map(|x| x as u32);
        assert_eq!(tok.pad_id(), opt(&info["pad_token_id"]), "{key}: pad id");
        assert_eq!(tok.eos_id(), opt(&info["eos_token_id"]), "{key}: eos id");
        assert_eq!(tok.bos_id(), opt(&info["bos_token_id"]), "{key}: bos id");
        let glm = tok.chatglm().unwrap();
        let mut want_all = ids(&info["all_special_ids"], "all_special_ids");
        want_all.sort_unstable();
        assert_eq!(
            glm.all_special_ids(),
            &want_all[..],
            "{key}: all_special_ids"
        );
        for (name, id) in info["special_ids"].as_object().unwrap() {
            // "<unk>/pad" style keys name one id twice ("</s>" is a token itself).
            let name = match tok.token_to_id(name) {
                Some(_) => name.as_str(),
                None => name.rsplit_once('/').map(|(a, _)| a).unwrap_or(name),
            };
            let id = id.as_u64().unwrap() as u32;
            assert_eq!(
                tok.token_to_id(name),
                Some(id),
                "{key}: token_to_id({name})"
            );
            assert_eq!(
                tok.id_to_token(id).as_deref(),
                Some(name),
                "{key}: id_to_token({id})"
            );
        }
        out.insert(key, tok);
    }
    out
}

fn fixture() -> Option<(PathBuf, Value)> {
    let fixtures = env_dir("LLMTUNE_FIXTURES")?;
    let shared = env_dir("LLMTUNE_SHARED")?;
    let path = fixtures.join("chatglm_tokenizer/tokenizer_cases.json");
    if !path.exists() {
        eprintln!("skipped: {} not found", path.display());
        return None;
    }
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    Some((shared, cases))
}

#[test]
fn every_case_matches_the_reference_for_v1_v2_v3() {
    let Some((shared, cases)) = fixture() else {
        return;
    };
    let toks = load(&shared, &cases);
    let list = cases["cases"].as_array().unwrap();
    assert!(!list.is_empty());
    let mut passed: BTreeMap<&str, usize> = BTreeMap::new();
    for c in list {
        let id = &c["id"];
        let s = text(&c["text"], "text");
        for (key, version) in VERSIONS {
            let want = &c[key];
            let tok = &toks[key];
            let glm = tok.chatglm().unwrap();
            let ctx = format!("{key} case {id} ({}) {s:?}", c["kind"]);
            assert_eq!(
                glm.tokenize(s).unwrap(),
                strings(&want["tokens"], "tokens"),
                "{ctx}: tokens"
            );
            let no_special = ids(&want["ids_no_special"], "ids_no_special");
            assert_eq!(
                tok.encode(s, false).unwrap(),
                no_special,
                "{ctx}: ids_no_special"
            );
            let full = ids(&want["ids"], "ids");
            assert_eq!(tok.encode(s, true).unwrap(), full, "{ctx}: ids");
            assert_eq!(
                tok.decode(&full, false).unwrap(),
                text(&want["decoded"], "decoded"),
                "{ctx}: decoded"
            );
            assert_eq!(
                tok.decode(&full, true).unwrap(),
                text(&want["decoded_skip_special"], "decoded_skip_special"),
                "{ctx}: decoded_skip_special"
            );
            let dns = text(&want["decoded_no_special"], "decoded_no_special");
            assert_eq!(
                tok.decode(&no_special, false).unwrap(),
                dns,
                "{ctx}: decoded_no_special"
            );
            assert_eq!(
                process_response(version, dns),
                text(&want["process_response"], "process_response"),
                "{ctx}: process_response"
            );
            *passed.entry(key).or_default() += 1;
        }
    }
    eprintln!("cases passed per version: {passed:?} of {}", list.len());
    for (key, _) in VERSIONS {
        assert_eq!(passed[key], list.len());
    }
}

#[test]
fn every_pair_case_matches_the_reference() {
    let Some((shared, cases)) = fixture() else {
        return;
    };
    let toks = load(&shared, &cases);
    let list = cases["pair_cases"].as_array().unwrap();
    assert!(!list.is_empty());
    let mut passed: BTreeMap<&str, usize> = BTreeMap::new();
    for c in list {
        let id = &c["id"];
        let prompt = text(&c["prompt"], "prompt");
        let answer = text(&c["answer"], "answer");
        for (key, _) in VERSIONS {
            let want = &c[key];
            let tok = &toks[key];
            let glm = tok.chatglm().unwrap();
            let ctx = format!("{key} pair case {id}");
            let src = ids(&want["source_ids"], "source_ids");
            let tgt = ids(&want["target_ids"], "target_ids");
            assert_eq!(tok.encode(prompt, false).unwrap(), src, "{ctx}: source_ids");
            assert_eq!(tok.encode(answer, false).unwrap(), tgt, "{ctx}: target_ids");
            let full = ids(&want["ids"], "ids");
            assert_eq!(glm.encode_pair(prompt, answer).unwrap(), full, "{ctx}: ids");
            assert_eq!(
                glm.build_inputs_with_special_tokens(src, Some(tgt)),
                full,
                "{ctx}: build_inputs_with_special_tokens"
            );
            assert_eq!(
                tok.decode(&full, false).unwrap(),
                text(&want["decoded"], "decoded"),
                "{ctx}: decoded"
            );
            assert_eq!(
                tok.decode(&full, true).unwrap(),
                text(&want["decoded_skip_special"], "decoded_skip_special"),
                "{ctx}: decoded_skip_special"
            );
            *passed.entry(key).or_default() += 1;
        }
    }
    eprintln!(
        "pair cases passed per version: {passed:?} of {}",
        list.len()
    );
}

#[test]
fn every_v3_chat_case_matches_the_reference() {
    let Some((shared, cases)) = fixture() else {
        return;
    };
    let toks = load(&shared, &cases);
    let tok = &toks["v3"];
    let glm = tok.chatglm().unwrap();
    let list = cases["v3_chat_cases"].as_array().unwrap();
    assert!(!list.is_empty());
    for c in list {
        let id = &c["id"];
        let history: Vec<ChatMessage> = c["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage {
                role: text(&m["role"], "role").to_string(),
                content: text(&m["content"], "content").to_string(),
                metadata: m
                    .get("metadata")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string(),
            })
            .collect();
        let (got, pos) = glm
            .build_chat_input(text(&c["query"], "query"), &history, "user")
            .unwrap();
        let want = ids(&c["ids"], "ids");
        assert_eq!(got, want, "v3 chat case {id}: ids");
        assert_eq!(
            pos,
            ids(&c["position_ids"], "position_ids"),
            "v3 chat case {id}: position_ids"
        );
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            text(&c["decoded"], "decoded"),
            "v3 chat case {id}: decoded"
        );
    }
    eprintln!("v3 chat cases passed: {} of {}", list.len(), list.len());
}

/// The folder loader picks the right version: v1 by `ice_text.model`, v3 over v2 by its name.
#[test]
fn from_dir_detects_the_version() {
    let Some(shared) = env_dir("LLMTUNE_SHARED") else {
        return;
    };
    let base = shared.join("reference/chatglm");
    if !base.exists() {
        eprintln!("skipped: {} not found", base.display());
        return;
    }
    for (dir, want) in [
        ("v1", ChatGlmVersion::V1),
        ("v2", ChatGlmVersion::V2),
        ("v2/chatglm3-6b", ChatGlmVersion::V3),
    ] {
        let tok = Tokenizer::from_dir(base.join(dir)).unwrap();
        assert_eq!(tok.chatglm().map(|t| t.version()), Some(want), "{dir}");
        assert!(tok.hf().is_none());
    }
    let v3 = Tokenizer::from_dir(base.join("v2/chatglm3-6b")).unwrap();
    let user = v3.token_to_id("<|user|>").unwrap();
    let obs = v3.token_to_id("<|observation|>").unwrap();
    assert_eq!(v3.stop_ids(), &[2, user, obs]);
}

#[test]
fn a_missing_model_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("llmtune-glm-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = ChatGlmTokenizer::from_dir(&dir, ChatGlmVersion::V2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.model"), "{err}");
    std::fs::write(dir.join("ice_text.model"), b"not a model").unwrap();
    let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("ice_text.model"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn process_response_rules() {
    // v1: strip, the training-time placeholder, ASCII punctuation next to CJK → full-width.
    assert_eq!(
        process_response(ChatGlmVersion::V1, "  你好,世界!ok, fine: [[训练时间]]?\n"),
        "你好，世界！ok, fine: 2023年？"
    );
    assert_eq!(
        process_response(ChatGlmVersion::V1, "a,b 中:x"),
        "a,b 中：x"
    );
    // v2/v3 only strip and replace the placeholder.
    assert_eq!(
        process_response(ChatGlmVersion::V2, " 你好,世界 [[训练时间]] "),
        "你好,世界 2023年"
    );
    assert_eq!(process_response(ChatGlmVersion::V3, "\t你好!\n"), "你好!");
}

/// Cases found by comparing with Python sentencepiece 0.2.3 on random text (not in the
/// fixture): whitespace-only text gives no v1 pieces; v1 normalizes with the model's own
/// charsmap, which keeps `～` (U+FF5E) as it is where Unicode NFKC gives `~`.
#[test]
fn v1_whitespace_only_and_charsmap_edge_cases() {
    let Some(shared) = env_dir("LLMTUNE_SHARED") else {
        return;
    };
    let dir = shared.join("reference/chatglm/v1");
    if !dir.join("ice_text.model").exists() {
        eprintln!("skipped: {} not found", dir.display());
        return;
    }
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let glm = tok.chatglm().unwrap();
    for s in [" ", "\u{3000}", "\r", " \u{3000} "] {
        assert_eq!(tok.encode(s, false).unwrap(), Vec::<u32>::new(), "{s:?}");
    }
    assert_eq!(glm.tokenize("～").unwrap(), vec!["▁", "～"]);
    assert_eq!(tok.encode("～", false).unwrap(), vec![5, 67043]);
    assert_eq!(glm.tokenize("~").unwrap(), vec!["▁~"]);
}

/// Streaming one token at a time gives the full decode for every case and version: byte
/// pieces of an emoji are held until complete, and v1's held-back trailing spaces let its
/// `clean_up_tokenization` (`"scan ,"` -> `"scan,"`) apply before the text goes out.
#[test]
fn streaming_equals_the_full_decode() {
    let Some((shared, cases)) = fixture() else {
        return;
    };
    let toks = load(&shared, &cases);
    for (key, _) in VERSIONS {
        let tok = &toks[key];
        for c in cases["cases"].as_array().unwrap() {
            let ids = ids(&c[key]["ids"], "ids");
            let mut dec = StreamDecoder::new();
            let mut out = String::new();
            for &id in &ids {
                let piece = dec.push(tok, id).unwrap();
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "{key} case {}: {piece:?}",
                    c["id"]
                );
                out.push_str(&piece);
            }
            out.push_str(&dec.finish(tok).unwrap());
            assert_eq!(
                out,
                text(&c[key]["decoded_skip_special"], "decoded_skip_special"),
                "{key} case {}: streamed text",
                c["id"]
            );
        }
    }
}

/// v1 streaming across every clean-up pattern, incl. space runs before punctuation.
#[test]
fn v1_streaming_survives_clean_up() {
    let Some(shared) = env_dir("LLMTUNE_SHARED") else {
        return;
    };
    let dir = shared.join("reference/chatglm/v1");
    if !dir.join("ice_text.model").exists() {
        eprintln!("skipped: {} not found", dir.display());
        return;
    }
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert!(tok.cleans_up_spaces());
    let text = "I 'm sure it 's a ' b , we 've they 're don n't . Hi ! Why ? x    , y  .";
    let ids = tok.encode(text, false).unwrap();
    let want = tok.decode(&ids, true).unwrap();
    assert!(want.contains("I'm") && want.contains("x   , y"), "{want:?}");
    let mut dec = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&dec.push(&tok, id).unwrap());
    }
    out.push_str(&dec.finish(&tok).unwrap());
    assert_eq!(out, want);
}
