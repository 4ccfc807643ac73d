//! The `llmtune` binary end to end on the tiny fixture models (no network).

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llmtune"))
}

mod common;
use common::{example_data, fixtures, read_json, tmp};

fn run(cmd: &mut Command) -> (i32, String, String) {
    let o = cmd.output().expect("run llmtune");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn generate_greedy_equals_the_reference_generation() {
    let Some(fx) = fixtures() else { return };
    let dir = fx.join("qwen2");
    let cases = read_json(&dir.join("cases.json"));
    let g = &cases["generation"][0];
    // The fixture prompt is `<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n`: exactly our
    // chatml template around the question.
    let (code, out, err) = run(bin().args([
        "generate",
        "--model_name_or_path",
        dir.to_str().unwrap(),
        "--template",
        "chatml",
        "--do_sample",
        "false",
        "--max_new_tokens",
        "24",
        "--prompt",
        g["question"].as_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    let expected = g["generated_text"].as_str().unwrap();
    assert_eq!(
        out.trim_end_matches('\n'),
        expected.trim_end_matches("<|im_end|>"),
        "stderr: {err}"
    );
}

#[test]
fn bench_decode_reports_each_repetition_and_their_mean() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let args = |reps: &str| {
        vec![
            "bench".to_string(),
            "decode".into(),
            "--model_name_or_path".into(),
            model.to_str().unwrap().into(),
            "--new_tokens".into(),
            "4".into(),
            "--prompt_tokens".into(),
            "3".into(),
            "--batch".into(),
            "2".into(),
            "--repetitions".into(),
            reps.into(),
        ]
    };
    let (code, out, err) = run(bin().args(args("2")));
    assert_eq!(code, 0, "{err}");
    let field = |name: &str| -> Vec<f64> {
        let line = out.lines().find(|l| l.starts_with("model: ")).unwrap();
        let v = line.split(&format!(" {name}: ")).nth(1).unwrap();
        let v = v.split(' ').next().unwrap();
        v.split(',').map(|x| x.parse().unwrap()).collect()
    };
    let (each, secs) = (field("tokens_per_s_each"), field("decode_s"));
    assert_eq!((each.len(), secs.len()), (2, 2), "{out}");
    assert!(each.iter().all(|r| r.is_finite() && *r > 0.0), "{out}");
    assert!(secs.iter().all(|s| *s >= 0.0), "{out}");
    let last = out.lines().last().unwrap();
    let mean: f64 = last
        .strip_prefix("tokens_per_s: ")
        .unwrap()
        .parse()
        .unwrap();
    assert!((mean - (each[0] + each[1]) / 2.0).abs() < 0.01, "{out}");
    let (code, _, err) = run(bin().args(args("0")));
    assert_eq!(code, 1);
    assert!(err.contains("--repetitions must be at least 1"), "{err}");
}

#[test]
fn unknown_model_is_a_clear_error() {
    let (code, _, err) = run(bin().args([
        "generate",
        "--model_name_or_path",
        "/no/such/model",
        "--prompt",
        "hi",
    ]));
    assert_eq!(code, 1);
    assert!(
        err.contains("/no/such/model") && err.contains("smollm2-135m"),
        "{err}"
    );
}

#[test]
fn wrong_template_for_the_tokenizer_is_a_clear_error() {
    let Some(fx) = fixtures() else { return };
    let (code, _, err) = run(bin().args([
        "generate",
        "--model_name_or_path",
        fx.join("llama").to_str().unwrap(),
        "--template",
        "chatglm",
        "--prompt",
        "hi",
    ]));
    assert_eq!(code, 1);
    assert!(
        err.contains("template `chatglm` needs the token `[gMASK]`"),
        "{err}"
    );
}

#[test]
fn bad_flag_values_name_the_flag() {
    let (code, _, err) = run(bin().args(["generate", "--prompt", "hi", "--do_sample", "maybe"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("--do_sample") && err.contains("not a boolean"),
        "{err}"
    );
    let (code, _, err) =
        run(bin().args(["generate", "--prompt", "hi", "--max_new_tokens", "many"]));
    assert_eq!(code, 2);
    assert!(err.contains("--max_new_tokens"), "{err}");
}

#[test]
fn web_and_api_flags_are_checked() {
    let (code, _, err) = run(bin().args(["web", "--port", "http"]));
    assert_eq!(code, 2);
    assert!(err.contains("--port"), "{err}");
    let (code, _, err) = run(bin().args(["api", "--max_batch", "0"]));
    assert_eq!(code, 2);
    assert!(err.contains("--max_batch"), "{err}");
}

#[test]
fn eval_preds_scores_a_file() {
    let dir = tmp("evalpreds");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("generated_predictions.jsonl");
    std::fs::write(
        &f,
        "{\"label\": \"多喝水，注意休息。\", \"predict\": \"多喝水，注意休息。\"}\n{\"label\": \"建议复查血常规\", \"predict\": \"\"}\n",
    )
    .unwrap();
    let (code, out, err) = run(bin().args(["eval-preds", f.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bleu-4") || out.contains("BLEU"), "{out}");
    let v = read_json(&dir.join("eval_preds_results.json"));
    // One exact copy (100 on every score) and one empty prediction (0): means are 50.
    for k in [
        "predict_bleu-4",
        "predict_rouge-1",
        "predict_rouge-2",
        "predict_rouge-l",
    ] {
        assert_eq!(v[k].as_f64().unwrap(), 50.0, "{k} in {v}");
    }
    // A missing field is named with its line.
    std::fs::write(&f, "{\"label\": \"a\"}\n").unwrap();
    let (code, _, err) = run(bin().args(["eval-preds", f.to_str().unwrap()]));
    assert_eq!(code, 1);
    assert!(
        err.contains("generated_predictions.jsonl:1") && err.contains("predict"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn data_inspect_counts_the_example_data() {
    let Some(fx) = fixtures() else { return };
    let data = example_data();
    let (code, out, err) = run(bin().args([
        "data",
        "inspect",
        "--dataset",
        "example_sft",
        "--dataset_dir",
        data.to_str().unwrap(),
        "--model_name_or_path",
        fx.join("llama").to_str().unwrap(),
        "--template",
        "chatml",
        "--overwrite_cache",
    ]));
    assert_eq!(code, 0, "{err}");
    let n = read_json(&data.join("example_sft.json"))
        .as_array()
        .unwrap()
        .len();
    assert!(out.contains(&format!("{n} kept")), "{out}");
    assert!(out.contains("⟦"), "label mask shown: {out}");
}

#[test]
fn data_inspect_dumps_the_encoded_pairs() {
    // `--dump_jsonl`: every pair as TRL's prompt/chosen/rejected ids; the answers end with the
    // template's eos, and prompt + answer is what training sees.
    let Some(fx) = fixtures() else { return };
    let data = example_data();
    let dump = tmp("pairs").with_extension("jsonl");
    let (code, out, err) = run(bin().args([
        "data",
        "inspect",
        "--stage",
        "dpo",
        "--dataset",
        "example_rm",
        "--dataset_dir",
        data.to_str().unwrap(),
        "--model_name_or_path",
        fx.join("llama").to_str().unwrap(),
        "--template",
        "chatml",
        "--max_samples",
        "5",
        "--overwrite_cache",
        "--dump_jsonl",
        dump.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("5 encoded examples written to"), "{out}");
    let lines = common::jsonl(&dump);
    assert_eq!(lines.len(), 5);
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let mut eos = None;
    for l in &lines {
        let (p, c, r) = (
            ids(&l["prompt_ids"]),
            ids(&l["chosen_ids"]),
            ids(&l["rejected_ids"]),
        );
        assert!(!p.is_empty() && !c.is_empty() && !r.is_empty(), "{l}");
        assert_ne!(c, r, "{l}");
        // Both answers end with the same eos token.
        assert_eq!(c.last(), r.last(), "{l}");
        assert_eq!(*eos.get_or_insert(*c.last().unwrap()), *c.last().unwrap());
    }
    std::fs::remove_file(&dump).unwrap();
}
