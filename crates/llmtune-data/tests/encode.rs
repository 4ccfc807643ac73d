//! Per-stage encoding: label masks, specials, truncation. Most tests use a byte-level
//! tokenizer built on the fly (one token per UTF-8 byte), so every length is exact; the
//! last ones use the fixture tokenizer (`LLMTUNE_FIXTURES`).

mod common;

use common::{byte_tokenizer, bytes, fixture_tokenizer, sid};
use llmtune_data::{
    encode_samples, DataError, EncodeMode, EncodeOptions, Example, RawSample, Response, Template,
    IGNORE_INDEX,
};
use llmtune_tokenize::Tokenizer;

fn chatml_tok(dir: &std::path::Path) -> Tokenizer {
    byte_tokenizer(
        dir,
        &["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        Some("<|endoftext|>"),
        Some("<|im_end|>"),
        Some("<|endoftext|>"),
    )
}

fn glm_tok(dir: &std::path::Path) -> Tokenizer {
    byte_tokenizer(
        dir,
        &["[gMASK]", "<sop>", "<eop>"],
        Some("<sop>"),
        Some("<eop>"),
        None,
    )
}

fn sample(query: &str, response: &str, history: &[(&str, &str)]) -> RawSample {
    RawSample {
        query: query.into(),
        response: Response::Text(response.into()),
        history: history
            .iter()
            .map(|(q, a)| (q.to_string(), a.to_string()))
            .collect(),
        dataset: 0,
        file: 0,
        record: 0,
    }
}

fn opts(mode: EncodeMode, src: usize, tgt: usize) -> EncodeOptions<'static> {
    EncodeOptions {
        mode,
        max_source_length: src,
        max_target_length: tgt,
        system: None,
        num_workers: 1,
    }
}

fn supervised(e: &Example) -> &llmtune_data::SupervisedExample {
    match e {
        Example::Supervised(s) => s,
        other => panic!("expected a supervised example, got {other:?}"),
    }
}

#[test]
fn chatml_sft_ids_and_label_mask() {
    let dir = tempfile::tempdir().unwrap();
    let tok = chatml_tok(dir.path());
    let t = Template::by_name("chatml").unwrap().resolve(&tok).unwrap();
    let (s, e, eot) = (
        sid(&tok, "<|im_start|>"),
        sid(&tok, "<|im_end|>"),
        sid(&tok, "<|endoftext|>"),
    );
    assert_eq!(t.eos_id(), e);
    assert_eq!(t.stop_ids(), &[e, eot]);
    assert!(t.separator_ids().is_empty());

    let enc = encode_samples(
        &[sample("hi", "ok", &[])],
        &t,
        &opts(EncodeMode::Supervised, 512, 512),
    )
    .unwrap();
    let ex = supervised(&enc.examples[0]);
    let mut prompt = vec![s];
    prompt.extend(bytes("user\nhi"));
    prompt.push(e);
    prompt.extend(bytes("\n"));
    prompt.push(s);
    prompt.extend(bytes("assistant\n"));
    let mut input = prompt.clone();
    input.extend(bytes("ok"));
    input.push(e);
    assert_eq!(ex.input_ids, input);
    assert_eq!(ex.prompt_len, prompt.len());
    let mut labels = vec![IGNORE_INDEX; prompt.len()];
    labels.extend([b'o' as i64, b'k' as i64, e as i64]);
    assert_eq!(ex.labels, labels);
    assert_eq!(ex.sop_index, None);
}

#[test]
fn chatglm_v1_specials_between_source_and_target() {
    let dir = tempfile::tempdir().unwrap();
    let tok = glm_tok(dir.path());
    let tpl = Template::by_name("chatglm").unwrap();
    let t = tpl.resolve(&tok).unwrap();
    let (g, sop, eop) = (sid(&tok, "[gMASK]"), sid(&tok, "<sop>"), sid(&tok, "<eop>"));
    assert_eq!(t.separator_ids(), &[g, sop]);
    assert_eq!(t.stop_ids(), &[eop]);

    let hist = [("发烧", "多少度？")];
    let s = sample("38度", "多喝水", &hist);
    let enc = encode_samples(
        std::slice::from_ref(&s),
        &t,
        &opts(EncodeMode::Supervised, 512, 512),
    )
    .unwrap();
    let ex = supervised(&enc.examples[0]);
    let mut source = bytes(&tpl.render_text(None, &s.history, "38度"));
    source.extend([g, sop]);
    assert_eq!(&ex.input_ids[..source.len()], &source[..]);
    assert_eq!(ex.sop_index, Some(source.len() - 1));
    assert_eq!(ex.input_ids[source.len() - 1], sop);
    let mut target = bytes("多喝水");
    target.push(eop);
    assert_eq!(&ex.input_ids[source.len()..], &target[..]);
    assert!(ex.labels[..source.len()].iter().all(|&l| l == IGNORE_INDEX));
    let tail: Vec<i64> = target.iter().map(|&x| x as i64).collect();
    assert_eq!(&ex.labels[source.len()..], &tail[..]);

    // Prompt mode: source + specials, labels = target cut to max_target_length - 2.
    let enc = encode_samples(&[s], &t, &opts(EncodeMode::Prompt, 512, 5)).unwrap();
    match &enc.examples[0] {
        Example::Prompt(p) => {
            assert_eq!(p.input_ids, source);
            assert_eq!(p.target_ids, bytes("多喝水")[..3].to_vec());
            assert_eq!(p.sop_index, Some(source.len() - 1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(enc.stats.target_truncated, 1);
}

#[test]
fn long_history_keeps_the_newest_rounds_and_the_current_question() {
    let dir = tempfile::tempdir().unwrap();
    let tok = glm_tok(dir.path());
    let tpl = Template::by_name("chatglm").unwrap();
    let t = tpl.resolve(&tok).unwrap();
    let history: Vec<(String, String)> = (0..6)
        .map(|i| (format!("question number {i}"), format!("answer number {i}")))
        .collect();
    let h: Vec<(&str, &str)> = history
        .iter()
        .map(|(q, a)| (q.as_str(), a.as_str()))
        .collect();
    let query = "the current question";
    // Budget: exactly the prompt with the two newest rounds, plus the 2 specials.
    let two = tpl.render_text(None, &history[4..], query);
    let three = tpl.render_text(None, &history[3..], query);
    assert!(three.len() > two.len());
    let max_source = two.len() + 2;
    let s = sample(query, "ok", &h);
    let enc = encode_samples(&[s], &t, &opts(EncodeMode::Supervised, max_source, 16)).unwrap();
    let ex = supervised(&enc.examples[0]);
    assert_eq!(ex.prompt_len, max_source);
    let text = String::from_utf8(
        ex.input_ids[..ex.prompt_len - 2]
            .iter()
            .map(|&b| b as u8)
            .collect(),
    )
    .unwrap();
    // Rounds 4 and 5 are kept, renumbered from 1; the current question ends the source.
    assert_eq!(
        text,
        "[Round 1]\n\n问：question number 4\n\n答：answer number 4\n\n\
[Round 2]\n\n问：question number 5\n\n答：answer number 5\n\n\
[Round 3]\n\n问：the current question\n\n答："
    );
    assert_eq!(enc.stats.rounds_dropped, 4);
    assert_eq!(enc.stats.source_truncated, 1);
    assert_eq!(enc.stats.query_truncated, 0);
    assert_eq!(
        enc.stats.source_lens_full,
        vec![(tpl.render_text(None, &history, query).len() + 2) as u32]
    );
    assert_eq!(enc.stats.source_lens, vec![max_source as u32]);
}

#[test]
fn over_long_query_loses_its_front_and_keeps_the_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let tok = glm_tok(dir.path());
    let tpl = Template::by_name("chatglm").unwrap();
    let t = tpl.resolve(&tok).unwrap();
    let query: String = (0..100)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let scaffold = tpl.render_text(None, &[], "").len(); // "[Round 1]\n\n问：" + "\n\n答："
    let max_source = scaffold + 2 + 10;
    let s = sample(&query, "ok", &[("an old question", "an old answer")]);
    let enc = encode_samples(&[s], &t, &opts(EncodeMode::Supervised, max_source, 16)).unwrap();
    let ex = supervised(&enc.examples[0]);
    assert_eq!(ex.prompt_len, max_source);
    let text = String::from_utf8(
        ex.input_ids[..ex.prompt_len - 2]
            .iter()
            .map(|&b| b as u8)
            .collect(),
    )
    .unwrap();
    assert_eq!(text, format!("[Round 1]\n\n问：{}\n\n答：", &query[90..]));
    assert_eq!(enc.stats.rounds_dropped, 1);
    assert_eq!(enc.stats.query_truncated, 1);

    // No room for even one query token: the sample is dropped and counted.
    let s = sample(&query, "ok", &[]);
    let enc = encode_samples(&[s], &t, &opts(EncodeMode::Supervised, scaffold + 2, 16)).unwrap();
    assert!(enc.examples.is_empty());
    assert_eq!(enc.stats.dropped_over_length, 1);
}

#[test]
fn target_lengths_per_stage() {
    let dir = tempfile::tempdir().unwrap();
    let tok = chatml_tok(dir.path());
    let t = Template::by_name("chatml").unwrap().resolve(&tok).unwrap();
    let e = t.eos_id();
    let resp = "0123456789";
    // SFT: target cut to max_target_length - 1, then eos.
    let enc = encode_samples(
        &[sample("q", resp, &[])],
        &t,
        &opts(EncodeMode::Supervised, 64, 6),
    )
    .unwrap();
    let ex = supervised(&enc.examples[0]);
    let mut tail = bytes("01234");
    tail.push(e);
    assert_eq!(&ex.input_ids[ex.prompt_len..], &tail[..]);
    assert_eq!(ex.input_ids.len() - ex.prompt_len, 6);
    assert_eq!(enc.stats.target_lens_full, vec![10]);
    assert_eq!(enc.stats.target_lens, vec![5]);
    assert_eq!(enc.stats.target_truncated, 1);

    // Prompt (predict/PPO): labels cut to max_target_length - 2, no eos.
    let enc = encode_samples(
        &[sample("q", resp, &[])],
        &t,
        &opts(EncodeMode::Prompt, 64, 6),
    )
    .unwrap();
    match &enc.examples[0] {
        Example::Prompt(p) => assert_eq!(p.target_ids, bytes("0123")),
        other => panic!("{other:?}"),
    }

    // RM: chosen and rejected each = prompt + response[..max_target_length - 1] + eos.
    let pair = RawSample {
        response: Response::Pair {
            chosen: "good answer".into(),
            rejected: "bad".into(),
        },
        ..sample("q", "", &[])
    };
    let enc = encode_samples(&[pair], &t, &opts(EncodeMode::Pairwise, 64, 5)).unwrap();
    match &enc.examples[0] {
        Example::Pair(p) => {
            let prompt = &p.chosen_ids[..p.prompt_len];
            assert_eq!(&p.rejected_ids[..p.prompt_len], prompt);
            let mut c = bytes("good");
            c.push(e);
            let mut r = bytes("bad");
            r.push(e);
            assert_eq!(&p.chosen_ids[p.prompt_len..], &c[..]);
            assert_eq!(&p.rejected_ids[p.prompt_len..], &r[..]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(enc.stats.target_lens_full, vec![11, 3]);
    assert_eq!(enc.stats.target_truncated, 1);
}

#[test]
fn chatglm2_and_chatglm3_prefix_and_target_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer(
        dir.path(),
        &[
            "[gMASK]",
            "sop",
            "</s>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
        ],
        None,
        Some("</s>"),
        None,
    );
    let (g, sop, eos) = (sid(&tok, "[gMASK]"), sid(&tok, "sop"), sid(&tok, "</s>"));
    let (user, asst) = (sid(&tok, "<|user|>"), sid(&tok, "<|assistant|>"));

    let t2 = Template::by_name("chatglm2")
        .unwrap()
        .resolve(&tok)
        .unwrap();
    let enc = encode_samples(
        &[sample("q", "a", &[])],
        &t2,
        &opts(EncodeMode::Supervised, 64, 8),
    )
    .unwrap();
    let ex = supervised(&enc.examples[0]);
    let mut want = vec![g, sop];
    want.extend(bytes("[Round 1]\n\n问：q\n\n答："));
    let p = want.len();
    want.extend(bytes("a"));
    want.push(eos);
    assert_eq!(ex.input_ids, want);
    assert_eq!(ex.prompt_len, p);
    assert!(ex.labels[..p].iter().all(|&l| l == IGNORE_INDEX));

    let t3 = Template::by_name("chatglm3")
        .unwrap()
        .resolve(&tok)
        .unwrap();
    assert_eq!(t3.stop_ids(), &[eos, user, sid(&tok, "<|observation|>")]);
    let enc = encode_samples(
        &[sample("q", "a", &[("q0", "a0")])],
        &t3,
        &opts(EncodeMode::Supervised, 64, 8),
    )
    .unwrap();
    let ex = supervised(&enc.examples[0]);
    let mut want = vec![g, sop, user];
    want.extend(bytes("\nq0"));
    want.push(asst);
    want.extend(bytes("\na0"));
    want.push(user);
    want.extend(bytes("\nq"));
    want.push(asst);
    let p = want.len();
    want.extend(bytes("\na")); // the target starts with "\n"
    want.push(eos);
    assert_eq!(ex.input_ids, want);
    assert_eq!(ex.prompt_len, p);
}

#[test]
fn source_prefix_is_the_system_text() {
    let dir = tempfile::tempdir().unwrap();
    let tok = chatml_tok(dir.path());
    let t = Template::by_name("chatml").unwrap().resolve(&tok).unwrap();
    let mut o = opts(EncodeMode::Prompt, 128, 16);
    o.system = Some("You are a doctor.");
    let enc = encode_samples(&[sample("q", "a", &[])], &t, &o).unwrap();
    let Example::Prompt(p) = &enc.examples[0] else {
        panic!()
    };
    let (s, e) = (sid(&tok, "<|im_start|>"), sid(&tok, "<|im_end|>"));
    let mut want = vec![s];
    want.extend(bytes("system\nYou are a doctor."));
    want.push(e);
    want.extend(bytes("\n"));
    assert_eq!(&p.input_ids[..want.len()], &want[..]);
}

#[test]
fn encoding_order_is_kept_with_threads() {
    let dir = tempfile::tempdir().unwrap();
    let tok = chatml_tok(dir.path());
    let t = Template::by_name("chatml").unwrap().resolve(&tok).unwrap();
    let samples: Vec<RawSample> = (0..300)
        .map(|i| sample(&format!("question {i}"), &format!("answer {i}"), &[]))
        .collect();
    let one = encode_samples(&samples, &t, &opts(EncodeMode::Supervised, 64, 16)).unwrap();
    let mut o = opts(EncodeMode::Supervised, 64, 16);
    o.num_workers = 4;
    let four = encode_samples(&samples, &t, &o).unwrap();
    assert_eq!(one, four);
    assert_eq!(one.examples.len(), 300);
}

#[test]
fn missing_special_token_names_template_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let tok = chatml_tok(dir.path());
    let err = Template::by_name("chatglm")
        .unwrap()
        .resolve(&tok)
        .unwrap_err();
    assert!(
        matches!(err, DataError::MissingSpecialToken { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("template `chatglm` needs the token `[gMASK]`, which the tokenizer ("),
        "{msg}"
    );
    assert!(msg.contains("known: chatglm, chatglm2"), "{msg}");
    // A tokenizer without eos cannot serve templates that end targets with eos.
    let dir2 = tempfile::tempdir().unwrap();
    let bare = byte_tokenizer(dir2.path(), &[], None, None, None);
    let msg = Template::by_name("vanilla")
        .unwrap()
        .resolve(&bare)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("template `vanilla` needs the token `eos`"),
        "{msg}"
    );
}

#[test]
fn default_template_by_model_type() {
    let dir = tempfile::tempdir().unwrap();
    let tok = chatml_tok(dir.path());
    assert_eq!(
        Template::default_for_model_type("qwen2", &tok).name,
        "chatml"
    );
    assert_eq!(
        Template::default_for_model_type("llama", &tok).name,
        "chatml"
    );
    let dir = tempfile::tempdir().unwrap();
    let glm = glm_tok(dir.path());
    assert_eq!(
        Template::default_for_model_type("chatglm", &glm).name,
        "chatglm"
    );
    let dir = tempfile::tempdir().unwrap();
    let l3 = byte_tokenizer(
        dir.path(),
        &[
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        Some("<|begin_of_text|>"),
        Some("<|eot_id|>"),
        None,
    );
    assert_eq!(
        Template::default_for_model_type("llama", &l3).name,
        "llama3"
    );
    let dir = tempfile::tempdir().unwrap();
    let bare = byte_tokenizer(dir.path(), &[], None, None, None);
    assert_eq!(
        Template::default_for_model_type("gpt2", &bare).name,
        "vanilla"
    );
}

// ---- with the fixture tokenizer ----

#[test]
fn fixture_chatml_prompt_equals_encoding_of_the_chat_text() {
    let Some(tok) = fixture_tokenizer() else {
        return;
    };
    let tpl = Template::by_name("chatml").unwrap();
    let t = tpl.resolve(&tok).unwrap();
    let history = vec![(
        "医生您好，我咳嗽两周了，晚上更厉害。".to_string(),
        "有没有发热？做过胸片吗？".to_string(),
    )];
    let query = "没有发热，胸片正常。";
    let p = t
        .encode_prompt(None, &history, query, 1024)
        .unwrap()
        .unwrap();
    let text = tpl.render_text(None, &history, query);
    assert_eq!(p.input_ids, tok.encode(&text, false).unwrap());
    assert_eq!(p.rounds_dropped, 0);
    // The ids decode back to the chat text.
    assert_eq!(tok.decode(&p.input_ids, false).unwrap(), text);
    // The stop ids are <|im_end|> then <|endoftext|>, read from the vocabulary.
    assert_eq!(
        t.stop_ids(),
        &[
            tok.token_to_id("<|im_end|>").unwrap(),
            tok.token_to_id("<|endoftext|>").unwrap()
        ]
    );
}

#[test]
fn fixture_truncation_keeps_the_question() {
    let Some(tok) = fixture_tokenizer() else {
        return;
    };
    let tpl = Template::by_name("chatml").unwrap();
    let t = tpl.resolve(&tok).unwrap();
    let history: Vec<(String, String)> = (0..40)
        .map(|i| {
            (
                format!("第{i}次复诊，体温正常，咳嗽减轻。"),
                "继续观察，多喝水。".to_string(),
            )
        })
        .collect();
    let query = "现在可以停药了吗？";
    let p = t
        .encode_prompt(None, &history, query, 128)
        .unwrap()
        .unwrap();
    assert!(p.input_ids.len() <= 128);
    assert!(p.rounds_dropped > 0 && p.rounds_dropped < 40);
    let text = tok.decode(&p.input_ids, false).unwrap();
    assert!(
        text.ends_with("<|im_start|>user\n现在可以停药了吗？<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    // Exactly the newest rounds that fit: one more round would not fit.
    let kept = 40 - p.rounds_dropped;
    let more = tok
        .encode(
            &tpl.render_text(None, &history[40 - kept - 1..], query),
            false,
        )
        .unwrap();
    assert!(more.len() > 128);
    assert!(text.contains("第39次复诊"));
    assert!(!text.contains("第0次复诊"));
}

#[test]
fn kept_rounds_are_the_most_that_fit_for_every_budget() {
    let dir = tempfile::tempdir().unwrap();
    let tok = glm_tok(dir.path());
    let tpl = Template::by_name("chatglm").unwrap();
    let t = tpl.resolve(&tok).unwrap();
    // Rounds of very different lengths, so length estimates are often off.
    let history: Vec<(String, String)> = (0..23)
        .map(|i| {
            (
                "问".repeat(1 + (i * 7) % 31),
                "答".repeat(1 + (i * 13) % 17),
            )
        })
        .collect();
    let query = "现在呢？";
    let full = tpl.render_text(None, &history, query).len() + 2;
    for max_source in (20..full + 5).step_by(7) {
        let got = t.encode_prompt(None, &history, query, max_source).unwrap();
        // Brute force: the most newest rounds whose text (1 token per byte) fits.
        let fits =
            |k: usize| tpl.render_text(None, &history[23 - k..], query).len() + 2 <= max_source;
        let want_k = (0..=23).rev().find(|&k| fits(k));
        match (got, want_k) {
            (Some(p), Some(k)) => {
                assert_eq!(23 - p.rounds_dropped, k, "max_source {max_source}");
                assert_eq!(p.query_tokens_cut, 0);
                let mut want = bytes(&tpl.render_text(None, &history[23 - k..], query));
                want.extend(t.separator_ids());
                assert_eq!(p.input_ids, want);
            }
            (Some(p), None) => {
                assert_eq!(p.rounds_dropped, 23);
                assert!(p.query_tokens_cut > 0);
                assert_eq!(p.input_ids.len(), max_source);
            }
            (None, _) => assert!(max_source < tpl.render_text(None, &[], "").len() + 3),
        }
    }
}
