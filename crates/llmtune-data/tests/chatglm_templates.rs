//! The ChatGLM templates with the real ChatGLM tokenizers give the reference's ids:
//! `chatglm` (v1) and `chatglm2` (v2 and v3 tokenizers) on every `pair_case` of
//! `$LLMTUNE_FIXTURES/chatglm_tokenizer/tokenizer_cases.json` (the reference's
//! `tokenizer.encode(prompt, answer)`), and `chatglm3` on every `v3_chat_case` (ChatGLM3's
//! `build_chat_input`). Model files come from `$LLMTUNE_SHARED`.

mod common;

use std::path::Path;

use llmtune_data::Template;
use llmtune_tokenize::{ChatGlmTokenizer, ChatGlmVersion, Tokenizer};
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn load(shared: &Path, cases: &Value, key: &str, version: ChatGlmVersion) -> Tokenizer {
    let info = &cases["tokenizers"][key];
    let model = shared.join(info["model_file"].as_str().unwrap());
    let config = match info.get("tokenizer_config").and_then(|v| v.as_str()) {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(shared.join(p)).unwrap()).unwrap(),
        None => Value::Object(Default::default()),
    };
    Tokenizer::from_chatglm(ChatGlmTokenizer::from_model_file(&model, version, &config).unwrap())
}

fn cases() -> Option<(std::path::PathBuf, Value)> {
    let fixtures = common::fixtures()?;
    let shared = common::shared()?;
    let path = fixtures.join("chatglm_tokenizer/tokenizer_cases.json");
    if !path.exists() {
        eprintln!("skipped: {} not found", path.display());
        return None;
    }
    Some((
        shared,
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap(),
    ))
}

#[test]
fn chatglm_and_chatglm2_templates_encode_pair_cases_like_the_reference() {
    let Some((shared, cases)) = cases() else {
        return;
    };
    let mut checked = 0;
    for (key, version, template) in [
        ("v1", ChatGlmVersion::V1, "chatglm"),
        ("v2", ChatGlmVersion::V2, "chatglm2"),
        ("v3", ChatGlmVersion::V3, "chatglm2"),
    ] {
        let tok = load(&shared, &cases, key, version);
        let tpl = Template::by_name(template).unwrap().resolve(&tok).unwrap();
        for c in cases["pair_cases"].as_array().unwrap() {
            let ctx = format!("{template} with the {key} tokenizer, pair case {}", c["id"]);
            let history: Vec<(String, String)> = c["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t[0].as_str().unwrap().to_string(),
                        t[1].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            let query = c["query"].as_str().unwrap();
            let prompt = Template::by_name(template)
                .unwrap()
                .render_text(None, &history, query);
            // chatglm2 renders its [gMASK] sop prefix as text; the rest is the prompt.
            let rendered = prompt.trim_start_matches("[gMASK]sop");
            assert_eq!(
                rendered,
                c["prompt"].as_str().unwrap(),
                "{ctx}: prompt text"
            );
            let p = tpl
                .encode_prompt(None, &history, query, 100_000)
                .unwrap()
                .unwrap();
            let want = &c[key];
            let mut got = p.input_ids.clone();
            got.extend(tpl.encode_target(c["answer"].as_str().unwrap()).unwrap());
            got.push(tpl.eos_id());
            assert_eq!(got, ids(&want["ids"]), "{ctx}: ids");
            let src = ids(&want["source_ids"]);
            match version {
                ChatGlmVersion::V1 => {
                    assert_eq!(&p.input_ids[..src.len()], &src[..], "{ctx}: source");
                    assert_eq!(p.sop_index, Some(src.len() + 1), "{ctx}: <sop> index");
                }
                _ => assert_eq!(&p.input_ids[2..], &src[..], "{ctx}: source"),
            }
            checked += 1;
        }
    }
    eprintln!("pair cases checked: {checked}");
}

#[test]
fn chatglm3_template_encodes_like_build_chat_input() {
    let Some((shared, cases)) = cases() else {
        return;
    };
    let tok = load(&shared, &cases, "v3", ChatGlmVersion::V3);
    let tpl = Template::by_name("chatglm3")
        .unwrap()
        .resolve(&tok)
        .unwrap();
    let list = cases["v3_chat_cases"].as_array().unwrap();
    assert!(!list.is_empty());
    for c in list {
        let ctx = format!("chatglm3 chat case {}", c["id"]);
        let mut system = None;
        let mut history = Vec::new();
        let mut pending_user: Option<String> = None;
        for m in c["history"].as_array().unwrap() {
            let content = m["content"].as_str().unwrap().to_string();
            match m["role"].as_str().unwrap() {
                "system" => system = Some(content),
                "user" => pending_user = Some(content),
                "assistant" => {
                    history.push((pending_user.take().expect("user before assistant"), content))
                }
                other => panic!("{ctx}: role {other} not covered by the template"),
            }
        }
        assert!(pending_user.is_none(), "{ctx}: unanswered user turn");
        let p = tpl
            .encode_prompt(
                system.as_deref(),
                &history,
                c["query"].as_str().unwrap(),
                100_000,
            )
            .unwrap()
            .unwrap();
        assert_eq!(p.input_ids, ids(&c["ids"]), "{ctx}: ids");
    }
    eprintln!("v3 chat cases checked: {}", list.len());
}
