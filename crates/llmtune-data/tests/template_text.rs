//! Text-level template rendering (no tokenizer, no environment needed).

use llmtune_data::{DataError, Template};

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(q, a)| (q.to_string(), a.to_string()))
        .collect()
}

/// A COVID-doctor style sample with two earlier turns, rendered with the `chatglm`
/// template; the expected text is written out by hand from SPEC §4.
#[test]
fn chatglm_prompt_with_history_byte_for_byte() {
    let t = Template::by_name("chatglm").unwrap();
    let history = h(&[
        (
            "医生你好，我发烧三天了，最高38.9度。",
            "有咳嗽吗？做过核酸吗？",
        ),
        ("有干咳，核酸阴性。", "先查个血常规和胸片。"),
    ]);
    let got = t.render_text(None, &history, "血常规白细胞偏低，要紧吗？");
    let expected =
        "[Round 1]\n\n问：医生你好，我发烧三天了，最高38.9度。\n\n答：有咳嗽吗？做过核酸吗？\n\n\
[Round 2]\n\n问：有干咳，核酸阴性。\n\n答：先查个血常规和胸片。\n\n\
[Round 3]\n\n问：血常规白细胞偏低，要紧吗？\n\n答：";
    assert_eq!(got, expected);
    assert_eq!(got.as_bytes(), expected.as_bytes());
}

#[test]
fn chatglm_without_history_and_with_prefix() {
    let t = Template::by_name("chatglm").unwrap();
    assert_eq!(
        t.render_text(None, &[], "你好"),
        "[Round 1]\n\n问：你好\n\n答："
    );
    // source_prefix goes before the whole prompt, as the reference prepends it.
    assert_eq!(
        t.render_text(Some("你是一名医生。"), &h(&[("a", "b")]), "c"),
        "你是一名医生。[Round 1]\n\n问：a\n\n答：b\n\n[Round 2]\n\n问：c\n\n答："
    );
}

#[test]
fn chatglm2_prefix_tokens() {
    let t = Template::by_name("chatglm2").unwrap();
    assert_eq!(
        t.render_text(None, &h(&[("q1", "a1")]), "q"),
        "[gMASK]sop[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q\n\n答："
    );
}

#[test]
fn chatml_has_no_default_system() {
    let t = Template::by_name("chatml").unwrap();
    assert_eq!(
        t.render_text(None, &[], "What is a fever?"),
        "<|im_start|>user\nWhat is a fever?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.render_text(Some("Be brief."), &h(&[("hi", "hello")]), "bye"),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn chatglm3_role_tokens() {
    let t = Template::by_name("chatglm3").unwrap();
    assert_eq!(
        t.render_text(Some("你是医生"), &h(&[("q1", "a1")]), "q2"),
        "[gMASK]sop<|system|>\n你是医生<|user|>\nq1<|assistant|>\na1<|user|>\nq2<|assistant|>"
    );
}

#[test]
fn llama2_system_inside_first_user_message() {
    let t = Template::by_name("llama2").unwrap();
    assert_eq!(
        t.render_text(Some("S"), &h(&[("q1", "a1")]), "q2"),
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST]a1</s><s>[INST] q2 [/INST]"
    );
    assert_eq!(t.render_text(None, &[], "q"), "<s>[INST] q [/INST]");
}

#[test]
fn llama3_headers() {
    let t = Template::by_name("llama3").unwrap();
    assert_eq!(
        t.render_text(Some("S"), &[], "q"),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn alpaca_default_system_and_vanilla_ignores_history() {
    let t = Template::by_name("alpaca").unwrap();
    assert_eq!(
        t.render_text(None, &[], "Define fever."),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nDefine fever.\n\n### Response:\n"
    );
    let v = Template::by_name("vanilla").unwrap();
    assert_eq!(
        v.render_text(None, &h(&[("old", "turn")]), "just this"),
        "just this"
    );
}

#[test]
fn unknown_template_lists_known_names() {
    let err = Template::by_name("chatgml").unwrap_err();
    assert!(matches!(err, DataError::UnknownTemplate { .. }));
    let msg = err.to_string();
    assert_eq!(
        msg,
        "unknown template `chatgml`; known templates: chatglm, chatglm2, chatglm3, chatml, llama2, llama3, alpaca, vanilla"
    );
}

#[test]
fn registry_names_are_unique() {
    let names = Template::names();
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len());
    for n in names {
        assert_eq!(Template::by_name(n).unwrap().name, n);
    }
}
