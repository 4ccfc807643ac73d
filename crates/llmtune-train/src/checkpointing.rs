//! Gradient checkpointing (`--gradient_checkpointing`): activations are kept only at layer
//! boundaries and each decoder layer is recomputed during the backward pass.
//!
//! candle has no hook to re-run part of a graph inside `backward`, so the recomputation is
//! driven from here, one segment at a time:
//!
//! 1. a forward pass that keeps only each layer's (detached) input;
//! 2. the head (final norm + `head`, e.g. lm head and loss) on the last layer's output as a
//!    fresh variable: one backward gives the head's gradients and `dL/dx_L`;
//! 3. for each layer from the last: rerun it on its saved input (a fresh variable), back-propagate
//!    `sum(y * dL/dy)`, which gives the layer's parameter gradients and `dL/dx_i` for the layer
//!    below.
//!
//! Peak memory is one layer's activations plus the `L` layer inputs, instead of every layer's
//! activations. LoRA dropout masks come from a counter-based stream; each layer's recomputation
//! replays the stream position of its first pass, so both passes draw the same masks.

use candle_core::{Tensor, Var};
use llmtune_adapters::Lora;
use llmtune_models::CausalLm;

use crate::error::{other, Error, Result};
use crate::optim::Gradients;

/// Sums the gradients of `vars` found in successive backward passes.
struct PartialGrads<'a> {
    vars: &'a [(String, Var)],
    sums: Vec<Option<Tensor>>,
}

impl<'a> PartialGrads<'a> {
    fn new(vars: &'a [(String, Var)]) -> Self {
        Self {
            vars,
            sums: vec![None; vars.len()],
        }
    }

    fn add(&mut self, store: &candle_core::backprop::GradStore) -> Result<()> {
        for ((_, var), sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = store.get(var.as_tensor()) {
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g.detach(),
                });
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Gradients> {
        let missing: Vec<String> = self
            .vars
            .iter()
            .zip(&self.sums)
            .filter(|(_, s)| s.is_none())
            .map(|((n, _), _)| n.clone())
            .collect();
        if !missing.is_empty() {
            return Err(Error::MissingGradients { names: missing });
        }
        let mut out = Gradients::new();
        for ((name, _), sum) in self.vars.iter().zip(self.sums) {
            if let Some(s) = sum {
                out.insert(name.clone(), s);
            }
        }
        Ok(out)
    }
}

/// Gradients of `head(final_hidden)` (a scalar) with respect to `vars`, recomputing each
/// layer in the backward pass. Returns the head's value (detached) and the gradients.
///
/// `lora`, when given, is the adapter set whose dropout stream is replayed per layer.
pub fn checkpointed_grads(
    model: &CausalLm,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    lora: Option<&Lora>,
    vars: &[(String, Var)],
    head: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Gradients)> {
    checkpointed(model, input_ids, attention_mask, lora, vars, false, head)
}

/// [`checkpointed_grads`] whose head reads the value hidden states
/// ([`CausalLm::forward_with_value`]: before the final norm for ChatGLM2/3), for value heads.
pub fn checkpointed_value_grads(
    model: &CausalLm,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    lora: Option<&Lora>,
    vars: &[(String, Var)],
    head: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Gradients)> {
    checkpointed(model, input_ids, attention_mask, lora, vars, true, head)
}

fn checkpointed(
    model: &CausalLm,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    lora: Option<&Lora>,
    vars: &[(String, Var)],
    value: bool,
    head: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Gradients)> {
    let ctx = model
        .layer_context(input_ids, attention_mask)
        .map_err(other)?;
    let n = model.num_layers();
    let mut inputs: Vec<Option<Tensor>> = Vec::with_capacity(n);
    let mut streams = Vec::with_capacity(n);
    let mut x = model.embed(input_ids).map_err(other)?.detach();
    for i in 0..n {
        streams.push(lora.map(|l| l.dropout_state()));
        inputs.push(Some(x.clone()));
        x = model.layer_forward(&ctx, i, &x).map_err(other)?.detach();
    }
    let end_stream = lora.map(|l| l.dropout_state());
    let mut acc = PartialGrads::new(vars);

    // The head: final norm (or the value hidden states), then the caller's scalar.
    let top = Var::from_tensor(&x)?;
    drop(x);
    let hidden = if value {
        model.value_from_top(top.as_tensor())
    } else {
        model.final_norm(top.as_tensor())
    }
    .map_err(other)?;
    let out = head(&hidden)?;
    drop(hidden);
    let store = out.backward()?;
    acc.add(&store)?;
    let mut grad = store.get(top.as_tensor()).cloned().ok_or_else(|| {
        other("gradient checkpointing: the head does not depend on the hidden states")
    })?;
    drop(store);

    // The layers, last first.
    for i in (0..n).rev() {
        if let (Some(l), Some((seed, calls))) = (lora, streams[i]) {
            l.set_dropout_state(seed, calls);
        }
        let input = inputs[i].take().expect("each layer input is used once");
        let xi = Var::from_tensor(&input)?;
        drop(input);
        let y = model
            .layer_forward(&ctx, i, xi.as_tensor())
            .map_err(other)?;
        let surrogate = (y * &grad)?.sum_all()?;
        let store = surrogate.backward()?;
        acc.add(&store)?;
        grad = store.get(xi.as_tensor()).cloned().ok_or_else(|| {
            other(format!(
                "gradient checkpointing: layer {i} lost its input gradient"
            ))
        })?;
    }
    // The embedding, when it is trained (full fine-tuning).
    if model.embed_is_variable() {
        let e = model.embed(input_ids).map_err(other)?;
        let store = (e * &grad)?.sum_all()?.backward()?;
        acc.add(&store)?;
    }
    if let (Some(l), Some((seed, calls))) = (lora, end_stream) {
        l.set_dropout_state(seed, calls);
    }
    Ok((out.detach(), acc.finish()?))
}
