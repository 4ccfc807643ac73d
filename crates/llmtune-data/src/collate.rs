//! Batching: left padding for every stage (as the reference's `DataCollatorForChatGLM`).
//!
//! A [`Batch`] is plain row-major vectors; the training crate turns them into tensors.
//!
//! * `input_ids` [rows, seq_len]: each row right-aligned, padded on the left with the
//!   tokenizer's pad id (eos when it has no pad).
//! * `attention_mask` [rows, seq_len]: 1 on real tokens, 0 on padding.
//! * `position_ids` [rows, seq_len]: `cumsum(mask) - 1` clamped at 0, i.e. 0 on padding and
//!   0, 1, 2, ... from the first real token on.
//! * `labels`: for SFT training [rows, seq_len], left-padded like the inputs; for prompt
//!   batches (predict, PPO) the target ids [rows, label_len], left-padded to the longest
//!   target; none for RM. Label padding is -100 when `ignore_pad_token_for_loss` and not
//!   `predict_with_generate`, else the pad id. Only padding is replaced: a real label equal
//!   to the pad id stays (the reference turned such labels into -100 too).
//! * RM batches hold the n chosen rows, then the n rejected rows.
//! * ChatGLM-6B batches carry the padded `<sop>` index of every row; see
//!   [`chatglm_v1_position_ids`] and [`chatglm_v1_attention_mask`] for what the model needs.

use llmtune_tokenize::Tokenizer;

use crate::args::EncodeMode;
use crate::encode::{Example, IGNORE_INDEX};
use crate::error::{DataError, Result};

/// Padding settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollateArgs {
    /// The id used to pad inputs.
    pub pad_id: u32,
    /// The value used to pad labels.
    pub label_pad_id: i64,
}

impl CollateArgs {
    /// From explicit ids: labels are padded with -100 when `ignore_pad_token_for_loss` and
    /// not `predict_with_generate`, else with `pad_id`.
    pub fn from_ids(
        pad_id: u32,
        ignore_pad_token_for_loss: bool,
        predict_with_generate: bool,
    ) -> Self {
        CollateArgs {
            pad_id,
            label_pad_id: if ignore_pad_token_for_loss && !predict_with_generate {
                IGNORE_INDEX
            } else {
                pad_id as i64
            },
        }
    }

    /// With the tokenizer's pad id (its eos when it defines no pad).
    pub fn new(
        tokenizer: &Tokenizer,
        ignore_pad_token_for_loss: bool,
        predict_with_generate: bool,
    ) -> Result<Self> {
        let pad = tokenizer.pad_id().ok_or_else(|| {
            DataError::Collate(format!(
                "the tokenizer ({}) has neither a pad nor an eos token to pad with",
                tokenizer.source().display()
            ))
        })?;
        Ok(Self::from_ids(
            pad,
            ignore_pad_token_for_loss,
            predict_with_generate,
        ))
    }
}

/// A padded batch, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// What the rows are.
    pub mode: EncodeMode,
    /// Number of rows (2n for an RM batch of n pairs).
    pub rows: usize,
    /// Padded length.
    pub seq_len: usize,
    /// [rows, seq_len].
    pub input_ids: Vec<u32>,
    /// [rows, seq_len]: 1 = token, 0 = padding.
    pub attention_mask: Vec<u32>,
    /// [rows, seq_len]: 0 on padding, 0.. from the first real token.
    pub position_ids: Vec<u32>,
    /// [rows, label_len], or `None` for RM.
    pub labels: Option<Vec<i64>>,
    /// Row length of `labels` (= `seq_len` for SFT training).
    pub label_len: usize,
    /// Number of left-padding tokens of each row.
    pub pad_lens: Vec<usize>,
    /// ChatGLM-6B: the index of `<sop>` in each padded row.
    pub sop_positions: Option<Vec<usize>>,
}

fn left_pad<T: Copy>(rows: &[&[T]], len: usize, pad: T) -> Vec<T> {
    let mut out = Vec::with_capacity(rows.len() * len);
    for r in rows {
        out.extend(std::iter::repeat_n(pad, len - r.len()));
        out.extend_from_slice(r);
    }
    out
}

/// Pads examples of one kind into a batch.
pub fn collate(examples: &[&Example], args: &CollateArgs) -> Result<Batch> {
    let first = examples
        .first()
        .ok_or_else(|| DataError::Collate("empty batch".into()))?;
    let mode = first.mode();
    if let Some(other) = examples.iter().find(|e| e.mode() != mode) {
        return Err(DataError::Collate(format!(
            "a batch mixes {:?} and {:?} examples",
            mode,
            other.mode()
        )));
    }
    let with_sop = examples.iter().filter(|e| e.sop_index().is_some()).count();
    if with_sop != 0 && with_sop != examples.len() {
        return Err(DataError::Collate(
            "some examples carry a <sop> index and some do not (different templates?)".into(),
        ));
    }

    // Input rows and their <sop> indices (unpadded).
    let mut rows: Vec<&[u32]> = Vec::new();
    let mut sops: Vec<Option<usize>> = Vec::new();
    match mode {
        EncodeMode::Pairwise => {
            for pass in 0..2 {
                for e in examples {
                    if let Example::Pair(p) = e {
                        rows.push(if pass == 0 {
                            &p.chosen_ids
                        } else {
                            &p.rejected_ids
                        });
                        sops.push(p.sop_index);
                    }
                }
            }
        }
        _ => {
            for e in examples {
                match e {
                    Example::Supervised(s) => rows.push(&s.input_ids),
                    Example::Prompt(p) => rows.push(&p.input_ids),
                    Example::Pair(_) => {}
                }
                sops.push(e.sop_index());
            }
        }
    }
    if let Some(i) = rows.iter().position(|r| r.is_empty()) {
        return Err(DataError::Collate(format!("row {i} is empty")));
    }
    let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let pad_lens: Vec<usize> = rows.iter().map(|r| seq_len - r.len()).collect();
    let input_ids = left_pad(&rows, seq_len, args.pad_id);
    let mut attention_mask = Vec::with_capacity(rows.len() * seq_len);
    let mut position_ids = Vec::with_capacity(rows.len() * seq_len);
    for &p in &pad_lens {
        attention_mask.extend(std::iter::repeat_n(0u32, p));
        attention_mask.extend(std::iter::repeat_n(1u32, seq_len - p));
        position_ids.extend(std::iter::repeat_n(0u32, p));
        position_ids.extend(0..(seq_len - p) as u32);
    }

    let (labels, label_len) = match mode {
        EncodeMode::Supervised => {
            let lrows: Vec<&[i64]> = examples
                .iter()
                .filter_map(|e| match e {
                    Example::Supervised(s) => Some(s.labels.as_slice()),
                    _ => None,
                })
                .collect();
            if let Some(i) = lrows
                .iter()
                .zip(&rows)
                .position(|(l, r)| l.len() != r.len())
            {
                return Err(DataError::Collate(format!(
                    "example {i}: {} labels for {} input ids",
                    lrows[i].len(),
                    rows[i].len()
                )));
            }
            (Some(left_pad(&lrows, seq_len, args.label_pad_id)), seq_len)
        }
        EncodeMode::Prompt => {
            let targets: Vec<Vec<i64>> = examples
                .iter()
                .filter_map(|e| match e {
                    Example::Prompt(p) => Some(p.target_ids.iter().map(|&x| x as i64).collect()),
                    _ => None,
                })
                .collect();
            let len = targets.iter().map(|t| t.len()).max().unwrap_or(0);
            let refs: Vec<&[i64]> = targets.iter().map(|t| t.as_slice()).collect();
            (Some(left_pad(&refs, len, args.label_pad_id)), len)
        }
        EncodeMode::Pairwise => (None, 0),
    };

    let sop_positions = if with_sop > 0 {
        let mut v = Vec::with_capacity(rows.len());
        for (i, s) in sops.iter().enumerate() {
            let s = s.unwrap_or(0);
            if s >= rows[i].len() {
                return Err(DataError::Collate(format!(
                    "row {i}: <sop> index {s} is past the row's end ({})",
                    rows[i].len()
                )));
            }
            v.push(s + pad_lens[i]);
        }
        Some(v)
    } else {
        None
    };

    Ok(Batch {
        mode,
        rows: rows.len(),
        seq_len,
        input_ids,
        attention_mask,
        position_ids,
        labels,
        label_len,
        pad_lens,
        sop_positions,
    })
}

fn sop_positions(batch: &Batch) -> Result<&[usize]> {
    batch.sop_positions.as_deref().ok_or_else(|| {
        DataError::Collate(
            "ChatGLM-6B positions need <sop> indices (use the chatglm template)".into(),
        )
    })
}

/// ChatGLM-6B's 2-D position ids, [rows, 2, seq_len], as the reference collator builds them:
/// positions are 0 on padding and count from the first real token; from `<sop>` on they
/// stay at the `[gMASK]` position (the token before `<sop>`, counted from the first real
/// token). Block positions are 0 before `<sop>` and 1, 2, ... from it.
pub fn chatglm_v1_position_ids(batch: &Batch) -> Result<Vec<u32>> {
    let sops = sop_positions(batch)?;
    let t = batch.seq_len;
    let mut out = Vec::with_capacity(batch.rows * 2 * t);
    for (r, &sop) in sops.iter().enumerate() {
        let pad = batch.pad_lens[r];
        let mask_pos = sop.saturating_sub(1).saturating_sub(pad) as u32;
        for j in 0..t {
            out.push(if j < pad {
                0
            } else if j >= sop {
                mask_pos
            } else {
                (j - pad) as u32
            });
        }
        for j in 0..t {
            out.push(if j < sop { 0 } else { (j - sop + 1) as u32 });
        }
    }
    Ok(out)
}

/// ChatGLM-6B's attention mask, [rows, 1, seq_len, seq_len] with ChatGLM's meaning
/// **1 = masked**: causal, except that every query sees all columns before `<sop>`
/// (bidirectional prefix), and no query sees the left padding.
pub fn chatglm_v1_attention_mask(batch: &Batch) -> Result<Vec<u8>> {
    let sops = sop_positions(batch)?;
    let t = batch.seq_len;
    let mut out = Vec::with_capacity(batch.rows * t * t);
    for (r, &sop) in sops.iter().enumerate() {
        let pad = batch.pad_lens[r];
        for q in 0..t {
            for c in 0..t {
                let attend = (c <= q || c < sop) && c >= pad;
                out.push(u8::from(!attend));
            }
        }
    }
    Ok(out)
}
