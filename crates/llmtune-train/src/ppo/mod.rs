//! PPO (SPEC §9): TRL 0.4.x's classic `PPOTrainer`, as the reference runs it.
//!
//! * [`core`]: the math: KL-penalised rewards, GAE, advantage whitening, the clipped policy
//!   and value losses with TRL's statistics, the adaptive KL controller.
//! * This module: how query + response rows are laid out for the model, the policy forward
//!   (log-probabilities of the response tokens and the critic's values), and the reward
//!   model's score.
//!
//! # Layout
//! A batch of `(query, response)` pairs is one `[b, q + r]` block: each query left-padded to
//! the longest query `q`, each response right-padded to the longest response `r`. Response
//! token `t` of every row sits at column `q + t` and is predicted by column `q + t - 1`, so the
//! response slice of the logits and hidden states is the same narrow `[q - 1, q - 1 + r)` for
//! every row (TRL's `logits[:, :-1]` against `input_ids[:, 1:]`, restricted to the response).
//! Position ids follow the mask (`cumsum - 1`), so padding does not shift a row. Logits are
//! computed for that slice only.

pub mod core;

use candle_core::{DType, Device, Tensor};
use llmtune_adapters::value_head::{gather_last, ValueHead};
use llmtune_adapters::Lora;
use llmtune_models::CausalLm;

pub use self::core::{
    compute_advantages, compute_rewards, entropy_from_logits, masked_mean, masked_var,
    masked_whiten, ppo_loss, KlController, MiniBatch, PpoHyper, PpoLoss, PpoStats, Rewards, Rows,
};
use crate::error::{other, Error, Result};

/// Query + response rows laid out as the module docs describe.
#[derive(Debug, Clone)]
pub struct SeqBatch {
    /// `[b, q + r]` (u32).
    pub input_ids: Tensor,
    /// `[b, q + r]` (u32), 1 = real token.
    pub attention_mask: Tensor,
    /// Longest query.
    pub q_width: usize,
    /// Longest response.
    pub r_width: usize,
    /// Tokens of each response.
    pub response_lens: Vec<usize>,
    /// `[b, r]` (u32): the response tokens, 0 past each row's length.
    pub targets: Tensor,
}

impl SeqBatch {
    /// Lays out `queries[i] ++ responses[i]` (no padding in the inputs); every query and
    /// response must be non-empty.
    pub fn new(
        queries: &[Vec<u32>],
        responses: &[Vec<u32>],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        if queries.len() != responses.len() || queries.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "PPO batch: {} queries and {} responses",
                queries.len(),
                responses.len()
            )));
        }
        if let Some(i) = queries.iter().position(Vec::is_empty) {
            return Err(Error::InvalidArgument(format!(
                "PPO batch: query {i} is empty"
            )));
        }
        if let Some(i) = responses.iter().position(Vec::is_empty) {
            return Err(Error::InvalidArgument(format!(
                "PPO batch: response {i} is empty"
            )));
        }
        let b = queries.len();
        let q = queries.iter().map(Vec::len).max().unwrap_or(0);
        let r = responses.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * (q + r));
        let mut mask = Vec::with_capacity(b * (q + r));
        let mut targets = Vec::with_capacity(b * r);
        for (qi, ri) in queries.iter().zip(responses) {
            ids.extend(std::iter::repeat_n(pad_id, q - qi.len()));
            mask.extend(std::iter::repeat_n(0u32, q - qi.len()));
            ids.extend_from_slice(qi);
            mask.extend(std::iter::repeat_n(1u32, qi.len()));
            ids.extend_from_slice(ri);
            mask.extend(std::iter::repeat_n(1u32, ri.len()));
            ids.extend(std::iter::repeat_n(pad_id, r - ri.len()));
            mask.extend(std::iter::repeat_n(0u32, r - ri.len()));
            targets.extend_from_slice(ri);
            targets.extend(std::iter::repeat_n(0u32, r - ri.len()));
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, q + r), device)?,
            attention_mask: Tensor::from_vec(mask, (b, q + r), device)?,
            q_width: q,
            r_width: r,
            response_lens: responses.iter().map(Vec::len).collect(),
            targets: Tensor::from_vec(targets, (b, r), device)?,
        })
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.response_lens.len()
    }

    /// Column of each row's last token (the last response token).
    pub fn last_index(&self) -> Vec<usize> {
        self.response_lens
            .iter()
            .map(|&l| self.q_width + l - 1)
            .collect()
    }

    /// Total real tokens (queries + responses).
    pub fn tokens(&self) -> Result<u64> {
        Ok(self
            .attention_mask
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()? as u64)
    }
}

/// What [`policy_forward`] returns, on the response slice.
#[derive(Debug, Clone)]
pub struct PolicyOutput {
    /// `[b, r]`: log-probability of each response token.
    pub logprobs: Tensor,
    /// `[b, r]`: the critic's value at the position that predicts each token (when a head was
    /// given).
    pub values: Option<Tensor>,
    /// `[b, r, vocab]`: the logits that score each token.
    pub logits: Tensor,
}

/// One forward pass of the model as it is switched now (adapters as they are): the
/// log-probabilities of the response tokens, their logits and, with `head`, the values.
/// Differentiable in whatever is trainable.
pub fn policy_forward(
    model: &CausalLm,
    head: Option<&ValueHead>,
    batch: &SeqBatch,
) -> Result<PolicyOutput> {
    let (hidden, value_hidden) = model
        .forward_with_value(&batch.input_ids, Some(&batch.attention_mask))
        .map_err(other)?;
    let slice = hidden.narrow(1, batch.q_width - 1, batch.r_width)?;
    let logits = model.logits(&slice).map_err(other)?;
    let logprobs = llmtune_ops::gather_logprobs(&logits, &batch.targets)?;
    let values = match head {
        Some(h) => {
            let v = value_hidden.narrow(1, batch.q_width - 1, batch.r_width)?;
            Some(h.forward(&v).map_err(other)?)
        }
        None => None,
    };
    Ok(PolicyOutput {
        logprobs,
        values,
        logits,
    })
}

/// The reward model's scores: with adapter `reward_adapter` swapped in, the reward head's value
/// at the last token of each query + response; the switches are restored afterwards (also on
/// error).
pub fn reward_scores(
    model: &CausalLm,
    lora: &Lora,
    reward_adapter: &str,
    reward_head: &ValueHead,
    batch: &SeqBatch,
) -> Result<Vec<f64>> {
    let _swap = lora.activated(reward_adapter).map_err(other)?;
    let (_, hidden) = model
        .forward_with_value(&batch.input_ids, Some(&batch.attention_mask))
        .map_err(other)?;
    let hidden = hidden.detach();
    let values = reward_head.forward(&hidden).map_err(other)?;
    let scores = gather_last(&values, &batch.last_index()).map_err(other)?;
    Ok(scores.to_dtype(DType::F64)?.to_vec1()?)
}
