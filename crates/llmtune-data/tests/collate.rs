//! Batching: left padding, masks, positions, label padding, RM row order, and the
//! ChatGLM collator parity against the fixtures (`LLMTUNE_FIXTURES`).

mod common;

use llmtune_data::{
    chatglm_v1_attention_mask, chatglm_v1_position_ids, collate, CollateArgs, EncodeMode, Example,
    PairExample, PromptExample, SupervisedExample, IGNORE_INDEX,
};

fn sft(input: &[u32], prompt_len: usize, sop: Option<usize>) -> Example {
    let labels = input
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if i < prompt_len {
                IGNORE_INDEX
            } else {
                x as i64
            }
        })
        .collect();
    Example::Supervised(SupervisedExample {
        input_ids: input.to_vec(),
        labels,
        prompt_len,
        sop_index: sop,
    })
}

#[test]
fn supervised_batch_is_left_padded() {
    let a = sft(&[10, 11, 12, 13, 14], 3, None);
    let b = sft(&[20, 21, 22], 2, None);
    let batch = collate(&[&a, &b], &CollateArgs::from_ids(0, true, false)).unwrap();
    assert_eq!((batch.rows, batch.seq_len, batch.label_len), (2, 5, 5));
    assert_eq!(batch.input_ids, vec![10, 11, 12, 13, 14, 0, 0, 20, 21, 22]);
    assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 1, 0, 0, 1, 1, 1]);
    assert_eq!(batch.position_ids, vec![0, 1, 2, 3, 4, 0, 0, 0, 1, 2]);
    assert_eq!(
        batch.labels.as_deref().unwrap(),
        &[-100, -100, -100, 13, 14, -100, -100, -100, -100, 22]
    );
    assert_eq!(batch.pad_lens, vec![0, 2]);
    assert_eq!(batch.sop_positions, None);
    assert_eq!(batch.mode, EncodeMode::Supervised);

    // ignore_pad_token_for_loss = false: padding labels are the pad id; real -100s stay.
    let batch = collate(&[&a, &b], &CollateArgs::from_ids(7, false, false)).unwrap();
    assert_eq!(batch.input_ids[5..7], [7, 7]);
    assert_eq!(
        batch.labels.as_deref().unwrap(),
        &[-100, -100, -100, 13, 14, 7, 7, -100, -100, 22]
    );
}

#[test]
fn a_real_label_equal_to_the_pad_id_is_kept() {
    // pad id 5 also appears as a target token (pad = eos models): it must stay a label.
    let a = sft(&[1, 2, 5], 2, None);
    let b = sft(&[1, 2, 3, 5], 2, None);
    let batch = collate(&[&a, &b], &CollateArgs::from_ids(5, true, false)).unwrap();
    assert_eq!(
        batch.labels.unwrap(),
        vec![-100, -100, -100, 5, -100, -100, 3, 5]
    );
}

#[test]
fn prompt_batch_labels_padded_with_pad_id_when_predicting() {
    let a = Example::Prompt(PromptExample {
        input_ids: vec![1, 2, 3],
        target_ids: vec![7],
        sop_index: None,
    });
    let b = Example::Prompt(PromptExample {
        input_ids: vec![4],
        target_ids: vec![8, 9, 10],
        sop_index: None,
    });
    let batch = collate(&[&a, &b], &CollateArgs::from_ids(0, true, true)).unwrap();
    assert_eq!(batch.input_ids, vec![1, 2, 3, 0, 0, 4]);
    assert_eq!(batch.position_ids, vec![0, 1, 2, 0, 0, 0]);
    assert_eq!(batch.label_len, 3);
    assert_eq!(batch.labels.unwrap(), vec![0, 0, 7, 8, 9, 10]);
}

#[test]
fn rm_batch_is_chosen_rows_then_rejected_rows() {
    let p = |c: &[u32], r: &[u32]| {
        Example::Pair(PairExample {
            chosen_ids: c.to_vec(),
            rejected_ids: r.to_vec(),
            prompt_len: 1,
            sop_index: None,
        })
    };
    let a = p(&[1, 11, 12], &[1, 13]);
    let b = p(&[2, 21], &[2, 22, 23, 24]);
    let batch = collate(&[&a, &b], &CollateArgs::from_ids(0, true, false)).unwrap();
    assert_eq!((batch.rows, batch.seq_len), (4, 4));
    assert_eq!(
        batch.input_ids,
        vec![0, 1, 11, 12, 0, 0, 2, 21, 0, 0, 1, 13, 2, 22, 23, 24]
    );
    assert_eq!(batch.attention_mask[..8], [0, 1, 1, 1, 0, 0, 1, 1]);
    assert!(batch.labels.is_none());
}

#[test]
fn collate_errors() {
    let args = CollateArgs::from_ids(0, true, false);
    assert_eq!(
        collate(&[], &args).unwrap_err().to_string(),
        "collate: empty batch"
    );
    let a = sft(&[1, 2], 1, None);
    let b = Example::Prompt(PromptExample {
        input_ids: vec![1],
        target_ids: vec![],
        sop_index: None,
    });
    assert_eq!(
        collate(&[&a, &b], &args).unwrap_err().to_string(),
        "collate: a batch mixes Supervised and Prompt examples"
    );
    let c = sft(&[1, 2], 1, Some(1));
    assert!(collate(&[&a, &c], &args)
        .unwrap_err()
        .to_string()
        .contains("<sop>"));
    let batch = collate(&[&a], &args).unwrap();
    assert!(chatglm_v1_position_ids(&batch).is_err());
}

// ---- parity with the reference collator (fixtures) ----

struct Cases {
    json: serde_json::Value,
    st: Vec<u8>,
}

fn load_cases(model: &str) -> Option<Cases> {
    let dir = common::fixtures()?.join(model);
    let json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let st = std::fs::read(dir.join("cases.safetensors")).unwrap();
    Some(Cases { json, st })
}

impl Cases {
    fn tensor(&self, key: &str) -> (Vec<usize>, Vec<i64>) {
        let st = safetensors::SafeTensors::deserialize(&self.st).unwrap();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{key}");
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }

    fn id(&self, name: &str) -> u32 {
        self.json["special_ids"][name].as_u64().unwrap() as u32
    }

    /// The batch rows rebuilt with our encoding rule from source and target ids.
    fn rows(&self, v1: bool) -> Vec<Example> {
        let rows = self.json["cases"]["batch"]["rows"].as_array().unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        rows.iter()
            .map(|r| {
                let source = ids(&r["source_ids"]);
                let target = ids(&r["target_ids"]);
                let mut input = Vec::new();
                let (sop, eos);
                if v1 {
                    input.extend(&source);
                    input.extend([self.id("gmask"), self.id("bos")]);
                    sop = Some(input.len() - 1);
                    eos = self.id("eos");
                } else {
                    input.extend([self.id("[gMASK]"), self.id("sop")]);
                    input.extend(&source);
                    sop = None;
                    eos = self.id("</s>/eos");
                }
                let prompt_len = input.len();
                input.extend(&target);
                input.push(eos);
                assert_eq!(
                    input,
                    ids(&r["input_ids"]),
                    "our SFT row equals the reference row"
                );
                let ex = sft(&input, prompt_len, sop);
                let want: Vec<i64> = r["labels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect();
                let Example::Supervised(s) = &ex else {
                    unreachable!()
                };
                assert_eq!(s.labels, want, "our labels equal the reference labels");
                ex
            })
            .collect()
    }
}

#[test]
fn chatglm1_collator_matches_reference() {
    let Some(c) = load_cases("chatglm1") else {
        return;
    };
    let rows = c.rows(true);
    let refs: Vec<&Example> = rows.iter().collect();
    let batch = collate(&refs, &CollateArgs::from_ids(c.id("pad"), true, false)).unwrap();
    let (shape, ids) = c.tensor("batch.input_ids");
    assert_eq!(shape, vec![batch.rows, batch.seq_len]);
    assert_eq!(
        batch
            .input_ids
            .iter()
            .map(|&x| x as i64)
            .collect::<Vec<_>>(),
        ids
    );
    assert_eq!(batch.labels.clone().unwrap(), c.tensor("batch.labels").1);
    let (pshape, pos) = c.tensor("batch.position_ids");
    assert_eq!(pshape, vec![batch.rows, 2, batch.seq_len]);
    let ours: Vec<i64> = chatglm_v1_position_ids(&batch)
        .unwrap()
        .iter()
        .map(|&x| x as i64)
        .collect();
    assert_eq!(ours, pos);
    let (mshape, mask) = c.tensor("batch.attention_mask");
    assert_eq!(mshape, vec![batch.rows, 1, batch.seq_len, batch.seq_len]);
    let ours: Vec<i64> = chatglm_v1_attention_mask(&batch)
        .unwrap()
        .iter()
        .map(|&x| x as i64)
        .collect();
    assert_eq!(ours, mask);
}

#[test]
fn chatglm2_collator_matches_reference() {
    let Some(c) = load_cases("chatglm2") else {
        return;
    };
    let rows = c.rows(false);
    let refs: Vec<&Example> = rows.iter().collect();
    let batch = collate(
        &refs,
        &CollateArgs::from_ids(c.id("<unk>/pad"), true, false),
    )
    .unwrap();
    assert_eq!(
        batch
            .input_ids
            .iter()
            .map(|&x| x as i64)
            .collect::<Vec<_>>(),
        c.tensor("batch.input_ids").1
    );
    assert_eq!(batch.labels.clone().unwrap(), c.tensor("batch.labels").1);
    assert_eq!(
        batch
            .attention_mask
            .iter()
            .map(|&x| x as i64)
            .collect::<Vec<_>>(),
        c.tensor("batch.attention_mask").1
    );
    assert_eq!(
        batch
            .position_ids
            .iter()
            .map(|&x| x as i64)
            .collect::<Vec<_>>(),
        c.tensor("batch.position_ids").1
    );
}
