//! Producing tokens: the sampler and batched generation with a KV cache.
//!
//! Used by predict, PPO rollouts, chat and the API server. Prompts of different lengths are
//! left-padded into one batch; each row stops on any stop id or at `max_new_tokens`, and
//! finished rows leave the batch so they stop costing compute.
//!
//! Logit processing follows transformers' order: repetition penalty, then temperature,
//! top-k and top-p, then sampling from the softmax (or argmax when `do_sample` is false).

use candle_core::{DType, Tensor};
use llmtune_models::{CausalLm, DecodeEngine, KvCache, Llama, ModelError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Generation settings (the reference's defaults for chat/API: sampling, temperature 0.95,
/// top_p 0.7, top_k 50).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Sample (true) or take the argmax (false).
    pub do_sample: bool,
    /// Divides the logits before sampling (default 0.95). Ignored when greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (default 0.7; 1.0 disables).
    pub top_p: f64,
    /// Keep the k most likely tokens (default 50; 0 disables).
    pub top_k: usize,
    /// > 1 discourages tokens already present (default 1.0 = off).
    pub repetition_penalty: f64,
    /// New tokens at most per row.
    pub max_new_tokens: usize,
    /// Ids that end a row (the emitted stop id is kept in the output).
    pub stop_ids: Vec<u32>,
    /// RNG seed for sampling.
    pub seed: u64,
    /// Only ids below this are generated: the tokenizer's vocabulary size when the model's
    /// output layer is padded past it (ChatGLM2/3: 65024 logits, 64794 tokens). `None` = every
    /// logit.
    pub vocab_size: Option<usize>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            do_sample: true,
            temperature: 0.95,
            top_p: 0.7,
            top_k: 50,
            repetition_penalty: 1.0,
            max_new_tokens: 512,
            stop_ids: vec![],
            seed: 42,
            vocab_size: None,
        }
    }
}

/// Why a row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Emitted a stop id.
    Stop,
    /// Reached `max_new_tokens`.
    Length,
    /// Stopped by the caller ([`generate_cancellable`]).
    Cancelled,
}

/// The new tokens of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New token ids (including the stop id when `finish == Stop`).
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

impl Generated {
    /// The tokens without a trailing stop id.
    pub fn content_tokens(&self) -> &[u32] {
        match self.finish {
            FinishReason::Stop => &self.tokens[..self.tokens.len().saturating_sub(1)],
            FinishReason::Length | FinishReason::Cancelled => &self.tokens,
        }
    }
}

/// Picks tokens from logits.
pub struct Sampler {
    rng: StdRng,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Chooses the next token from `logits` (one row, f32), given the tokens seen so far
    /// (prompt + generated; used by the repetition penalty). Only ids below
    /// `cfg.vocab_size` (when set) can be chosen.
    pub fn pick(&mut self, logits: &mut [f32], seen: &[u32], cfg: &GenerationConfig) -> u32 {
        let logits = match cfg.vocab_size {
            Some(v) if v.max(1) < logits.len() => &mut logits[..v.max(1)],
            _ => logits,
        };
        if cfg.repetition_penalty != 1.0 {
            let p = cfg.repetition_penalty as f32;
            let mut done = std::collections::HashSet::new();
            for &t in seen {
                if (t as usize) < logits.len() && done.insert(t) {
                    let l = &mut logits[t as usize];
                    *l = if *l < 0.0 { *l * p } else { *l / p };
                }
            }
        }
        if !cfg.do_sample {
            return argmax(logits);
        }
        let temp = cfg.temperature.max(1e-5) as f32;
        if (cfg.top_k == 0 || cfg.top_k >= logits.len()) && cfg.top_p >= 1.0 {
            // Plain sampling from the whole softmax (PPO's rollouts): no sort needed.
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) / temp;
            let probs: Vec<f64> = logits
                .iter()
                .map(|&l| ((l / temp - max) as f64).exp())
                .collect();
            let z: f64 = probs.iter().sum();
            let r: f64 = self.rng.random::<f64>() * z;
            let mut cum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if r < cum {
                    return i as u32;
                }
            }
            return probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32;
        }
        // Candidates sorted by logit, descending.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = if cfg.top_k == 0 {
            logits.len()
        } else {
            cfg.top_k.min(logits.len())
        };
        if k < logits.len() {
            idx.select_nth_unstable_by(k - 1, |&a, &b| {
                logits[b as usize].total_cmp(&logits[a as usize])
            });
            idx.truncate(k);
        }
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let max = logits[idx[0] as usize] / temp;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] / temp) - max) as f64).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if cfg.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (j, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= cfg.top_p {
                    keep = j + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        let r: f64 = self.rng.random();
        let mut cum = 0.0;
        for (j, p) in probs.iter().enumerate() {
            cum += p;
            if r < cum {
                return idx[j];
            }
        }
        idx[probs.len() - 1]
    }
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates continuations for a batch of prompts (token ids, no padding).
///
/// `on_token(row, token)` is called for every new token as soon as it is chosen (streaming).
/// Rows are independent: a row's output does not depend on the other rows except through the
/// shared RNG stream when sampling.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &GenerationConfig,
    on_token: impl FnMut(usize, u32),
) -> Result<Vec<Generated>, ModelError> {
    let never = std::sync::atomic::AtomicBool::new(false);
    generate_cancellable(model, prompts, pad_id, cfg, on_token, &never)
}

/// [`generate`] that stops before the next token once `cancel` is set (Ctrl-C in a chat, a
/// client that went away); unfinished rows end with [`FinishReason::Cancelled`].
pub fn generate_cancellable(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &GenerationConfig,
    mut on_token: impl FnMut(usize, u32),
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<Vec<Generated>, ModelError> {
    // One non-empty prompt on a model the engine runs; the rest (and the empty cases, which
    // it answers) is the general path's.
    if let ([prompt], CausalLm::Llama(llama)) = (prompts, model) {
        if cfg.max_new_tokens > 0
            && !prompt.is_empty()
            && engine_enabled()
            && DecodeEngine::supports(llama)
        {
            let g = generate_on_engine(model, llama, prompt, cfg, &mut on_token, cancel)?;
            return Ok(vec![g]);
        }
    }
    generate_batched(model, prompts, pad_id, cfg, on_token, cancel)
}

/// [`generate_cancellable`] on the general (batched tensor) path only, even for one prompt
/// on a model the decode engine could run: the reference the engine is checked against.
pub fn generate_batched(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &GenerationConfig,
    mut on_token: impl FnMut(usize, u32),
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<Vec<Generated>, ModelError> {
    let n = prompts.len();
    let mut out: Vec<Generated> = (0..n)
        .map(|_| Generated {
            tokens: vec![],
            finish: FinishReason::Length,
        })
        .collect();
    if n == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(ModelError::Input(format!("prompt {i} is empty")));
    }
    let device = model.device().clone();
    let max_len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(n * max_len);
    let mut mask: Vec<Vec<u32>> = Vec::with_capacity(n);
    for p in prompts {
        let pad = max_len - p.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(p);
        let mut m = vec![0u32; pad];
        m.extend(std::iter::repeat_n(1u32, p.len()));
        mask.push(m);
    }
    let mut seen: Vec<Vec<u32>> = prompts.to_vec();
    let mut sampler = Sampler::new(cfg.seed);
    let mut cache = model.new_cache();
    // `active[j]` = original row index of batch row j.
    let mut active: Vec<usize> = (0..n).collect();
    let mut input = Tensor::from_vec(ids, (n, max_len), &device)?;
    for step in 0..cfg.max_new_tokens {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            for &row in &active {
                out[row].finish = FinishReason::Cancelled;
            }
            break;
        }
        let mask_t = Tensor::from_vec(
            mask.iter().flatten().copied().collect::<Vec<u32>>(),
            (active.len(), mask[0].len()),
            &device,
        )?;
        let logits = model.forward_last(&input, Some(&mask_t), Some(&mut cache))?;
        let mut logits: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (j, &row) in active.iter().enumerate() {
            if let Some(v) = cfg.vocab_size {
                logits[j].truncate(v.max(1));
            }
            let tok = sampler.pick(&mut logits[j], &seen[row], cfg);
            on_token(row, tok);
            out[row].tokens.push(tok);
            seen[row].push(tok);
            if cfg.stop_ids.contains(&tok) {
                out[row].finish = FinishReason::Stop;
            } else if step + 1 < cfg.max_new_tokens {
                keep.push(j);
                next.push(tok);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            let idx = Tensor::new(
                keep.iter()
                    .map(|&j| j as u32)
                    .collect::<Vec<_>>()
                    .as_slice(),
                &device,
            )?;
            cache.select_rows(&idx)?;
            active = keep.iter().map(|&j| active[j]).collect();
            mask = keep.iter().map(|&j| mask[j].clone()).collect();
        }
        for m in mask.iter_mut() {
            m.push(1);
        }
        input = Tensor::from_vec(next, (active.len(), 1), &device)?;
    }
    Ok(out)
}

/// Whether one-row generation on a quantized Llama model may use the
/// [`DecodeEngine`] (`LLMTUNE_DECODE_ENGINE=0` turns it off, for comparisons).
fn engine_enabled() -> bool {
    std::env::var("LLMTUNE_DECODE_ENGINE").map_or(true, |v| v != "0")
}

/// [`generate_cancellable`] for one prompt on the batch-1 [`DecodeEngine`]: the prompt is
/// prefilled on the tensor path (batched products) exactly as the general path does, its
/// keys and values are copied into the engine, and every later token runs on the engine.
/// The sampling, stop and cancel logic are the general path's for one row.
fn generate_on_engine(
    model: &CausalLm,
    llama: &Llama,
    prompt: &[u32],
    cfg: &GenerationConfig,
    on_token: &mut impl FnMut(usize, u32),
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<Generated, ModelError> {
    let mut out = Generated {
        tokens: vec![],
        finish: FinishReason::Length,
    };
    let mut engine = match DecodeEngine::new(llama, prompt.len() + cfg.max_new_tokens)? {
        Some(e) => e,
        None => {
            return Err(ModelError::Model(
                "the decode engine cannot run this model".into(),
            ))
        }
    };
    let mut seen = prompt.to_vec();
    seen.reserve(cfg.max_new_tokens);
    let mut sampler = Sampler::new(cfg.seed);
    let mut logits: Vec<f32> = Vec::new();
    let mut last = 0u32;
    for step in 0..cfg.max_new_tokens {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            out.finish = FinishReason::Cancelled;
            break;
        }
        if step == 0 {
            let device = model.device();
            let t = prompt.len();
            let input = Tensor::from_vec(prompt.to_vec(), (1, t), device)?;
            let mask = Tensor::from_vec(vec![1u32; t], (1, t), device)?;
            let mut cache = model.new_cache();
            let l = model.forward_last(&input, Some(&mask), Some(&mut cache))?;
            logits = l.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            engine.load_cache(&cache)?;
        } else {
            let l = engine.step(last)?;
            logits.clear();
            logits.extend_from_slice(l);
        }
        if let Some(v) = cfg.vocab_size {
            logits.truncate(v.max(1));
        }
        let tok = sampler.pick(&mut logits, &seen, cfg);
        on_token(0, tok);
        out.tokens.push(tok);
        seen.push(tok);
        if cfg.stop_ids.contains(&tok) {
            out.finish = FinishReason::Stop;
            break;
        }
        last = tok;
    }
    Ok(out)
}

/// A running decode batch that sequences join and leave between steps: continuous batching
/// for the API server.
///
/// One batched KV cache holds every row, left-padded to a common length: a sequence is
/// prefilled alone ([`DecodeBatch::prefill`]), then [`DecodeBatch::join`] pads either its
/// cache or the batch's on the left so their lengths match and appends its rows; padding is
/// masked out (attention mask 0, positions counted from each row's first real token), so a
/// row decodes exactly what it would alone. [`DecodeBatch::retain`] drops finished rows and
/// trims padding columns no remaining row needs. The caller keeps its per-row bookkeeping
/// in a vector in the same row order (joins append at the end).
pub struct DecodeBatch {
    cache: llmtune_models::KvCache,
    /// `[rows][cache positions]`, 1 = a real token.
    mask: Vec<Vec<u32>>,
}

impl DecodeBatch {
    pub fn new(model: &CausalLm) -> Self {
        Self {
            cache: model.new_cache(),
            mask: Vec::new(),
        }
    }

    /// Number of rows decoding.
    pub fn len(&self) -> usize {
        self.mask.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mask.is_empty()
    }

    /// Cache positions per row (real tokens plus left padding).
    pub fn positions(&self) -> usize {
        self.mask.first().map(|m| m.len()).unwrap_or(0)
    }

    /// Runs `prompt` alone: returns the logits of its last position (f32, `[vocab]`) and its
    /// one-row cache, to hand to [`DecodeBatch::join`] after sampling the first token.
    pub fn prefill(model: &CausalLm, prompt: &[u32]) -> Result<(Vec<f32>, KvCache), ModelError> {
        let mut p = Self::prefill_many(model, &[prompt])?;
        Ok((p.logits.remove(0), p.cache))
    }

    /// Runs several prompts as one left-padded batch (one forward instead of one per prompt):
    /// the last-position logits of each and their cache, to hand to
    /// [`DecodeBatch::join_rows`].
    pub fn prefill_many(model: &CausalLm, prompts: &[&[u32]]) -> Result<Prefilled, ModelError> {
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(ModelError::Input(format!("prompt {i} is empty")));
        }
        if prompts.is_empty() {
            return Err(ModelError::Input("no prompts to prefill".into()));
        }
        let k = prompts.len();
        let len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(k * len);
        let mut mask = Vec::with_capacity(k);
        for p in prompts {
            let pad = len - p.len();
            ids.extend(std::iter::repeat_n(0u32, pad));
            ids.extend_from_slice(p);
            let mut m = vec![0u32; pad];
            m.extend(std::iter::repeat_n(1u32, p.len()));
            mask.push(m);
        }
        let device = model.device();
        let mut cache = model.new_cache();
        let input = Tensor::from_vec(ids, (k, len), device)?;
        let mask_t = if mask.iter().all(|m| m[0] == 1) {
            None
        } else {
            Some(Tensor::from_vec(
                mask.iter().flatten().copied().collect::<Vec<u32>>(),
                (k, len),
                device,
            )?)
        };
        let logits = model.forward_last(&input, mask_t.as_ref(), Some(&mut cache))?;
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(Prefilled {
            logits,
            cache,
            mask,
        })
    }

    /// Appends `copies` rows that continue the one-row prefilled cache `group` (the `n`
    /// choices of a request share one prefill).
    pub fn join(&mut self, group: &KvCache, copies: usize) -> Result<(), ModelError> {
        let p = Prefilled {
            logits: vec![],
            cache: group.clone(),
            mask: vec![vec![1u32; group.len()]],
        };
        self.join_rows(&p, &vec![0; copies])
    }

    /// Appends rows continuing the prefilled prompts `rows` (indices into `p`'s prompts; an
    /// index may repeat: the `n` choices of a request share one prefill).
    pub fn join_rows(&mut self, p: &Prefilled, rows: &[usize]) -> Result<(), ModelError> {
        if rows.is_empty() {
            return Ok(());
        }
        if let Some(r) = rows.iter().find(|&&r| r >= p.mask.len()) {
            return Err(ModelError::Input(format!(
                "join_rows: row {r} of {} prefilled",
                p.mask.len()
            )));
        }
        let mut g = p.cache.clone();
        let mut gmask: Vec<Vec<u32>> = rows.iter().map(|&r| p.mask[r].clone()).collect();
        if rows.len() != p.mask.len() || rows.iter().enumerate().any(|(i, &r)| i != r) {
            let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let idx = Tensor::new(idx.as_slice(), group_device(&g)?)?;
            g.select_rows(&idx)?;
        }
        // Padding no joining row needs.
        let lead = gmask
            .iter()
            .map(|m| m.iter().take_while(|&&x| x == 0).count())
            .min()
            .unwrap_or(0);
        if lead > 0 {
            g.trim_left(lead)?;
            for m in gmask.iter_mut() {
                m.drain(..lead);
            }
        }
        let (have, add) = (self.positions(), g.len());
        if self.is_empty() {
            self.cache = g;
        } else {
            if add < have {
                g.pad_left(have - add)?;
                for m in gmask.iter_mut() {
                    m.splice(0..0, std::iter::repeat_n(0u32, have - add));
                }
            } else if add > have {
                self.cache.pad_left(add - have)?;
                for m in self.mask.iter_mut() {
                    m.splice(0..0, std::iter::repeat_n(0u32, add - have));
                }
            }
            self.cache.append_rows(&g)?;
        }
        self.mask.extend(gmask);
        Ok(())
    }

    /// One decode step: feeds `inputs[row]` (each row's last chosen token) and returns the
    /// next-token logits per row (f32).
    pub fn step(&mut self, model: &CausalLm, inputs: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        if inputs.len() != self.len() {
            return Err(ModelError::Input(format!(
                "step: {} inputs for {} rows",
                inputs.len(),
                self.len()
            )));
        }
        if inputs.is_empty() {
            return Ok(vec![]);
        }
        for m in self.mask.iter_mut() {
            m.push(1);
        }
        let device = model.device();
        let mask = Tensor::from_vec(
            self.mask.iter().flatten().copied().collect::<Vec<u32>>(),
            (self.len(), self.positions()),
            device,
        )?;
        let input = Tensor::from_slice(inputs, (inputs.len(), 1), device)?;
        let logits = model.forward_last(&input, Some(&mask), Some(&mut self.cache));
        if logits.is_err() {
            for m in self.mask.iter_mut() {
                m.pop();
            }
        }
        Ok(logits?.to_dtype(DType::F32)?.to_vec2()?)
    }

    /// Keeps the rows whose `keep` flag is set (in order) and drops the left padding that no
    /// kept row needs any more.
    pub fn retain(&mut self, keep: &[bool]) -> Result<(), ModelError> {
        if keep.len() != self.len() {
            return Err(ModelError::Input(format!(
                "retain: {} flags for {} rows",
                keep.len(),
                self.len()
            )));
        }
        let rows: Vec<u32> = (0..keep.len() as u32)
            .filter(|&j| keep[j as usize])
            .collect();
        if rows.is_empty() {
            self.cache.clear();
            self.mask.clear();
            return Ok(());
        }
        if rows.len() != keep.len() {
            let idx = Tensor::new(rows.as_slice(), group_device(&self.cache)?)?;
            self.cache.select_rows(&idx)?;
            let mut j = 0;
            self.mask.retain(|_| {
                j += 1;
                keep[j - 1]
            });
        }
        let pad = self
            .mask
            .iter()
            .map(|m| m.iter().take_while(|&&x| x == 0).count())
            .min()
            .unwrap_or(0);
        if pad > 0 {
            self.cache.trim_left(pad)?;
            for m in self.mask.iter_mut() {
                m.drain(..pad);
            }
        }
        Ok(())
    }
}

/// Prompts prefilled together by [`DecodeBatch::prefill_many`].
pub struct Prefilled {
    /// Next-token logits of each prompt (f32, `[vocab]`).
    pub logits: Vec<Vec<f32>>,
    cache: KvCache,
    mask: Vec<Vec<u32>>,
}

fn group_device(c: &KvCache) -> Result<&candle_core::Device, ModelError> {
    c.device()
        .ok_or_else(|| ModelError::Input("the cache holds no rows".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GenerationConfig {
        GenerationConfig {
            do_sample: true,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(0);
        let c = GenerationConfig {
            do_sample: false,
            ..cfg()
        };
        assert_eq!(s.pick(&mut [0.1, 3.0, -1.0, 2.9], &[], &c), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(7);
        let c = GenerationConfig { top_k: 1, ..cfg() };
        for _ in 0..20 {
            assert_eq!(s.pick(&mut [0.0, 1.0, 5.0, 4.9], &[], &c), 2);
        }
    }

    #[test]
    fn top_p_keeps_only_nucleus() {
        // probs ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.6 keeps only the first token.
        let mut s = Sampler::new(3);
        let c = GenerationConfig {
            top_p: 0.6,
            ..cfg()
        };
        for _ in 0..50 {
            assert_eq!(s.pick(&mut [3.0, 2.0, 1.0, 0.0], &[], &c), 0);
        }
        // top_p 0.85 keeps two tokens; both must appear, never the others.
        let c = GenerationConfig {
            top_p: 0.85,
            ..cfg()
        };
        let mut hits = [0; 4];
        for _ in 0..400 {
            hits[s.pick(&mut [3.0, 2.0, 1.0, 0.0], &[], &c) as usize] += 1;
        }
        assert!(hits[0] > 0 && hits[1] > 0, "{hits:?}");
        assert_eq!(hits[2] + hits[3], 0, "{hits:?}");
    }

    #[test]
    fn sampling_follows_distribution_and_seed() {
        let c = cfg();
        let draw = |seed| {
            let mut s = Sampler::new(seed);
            (0..2000)
                .map(|_| s.pick(&mut [0.0, (3.0f32).ln()], &[], &c))
                .collect::<Vec<_>>()
        };
        let a = draw(11);
        assert_eq!(a, draw(11), "same seed, same draws");
        assert_ne!(a, draw(12));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.04, "p(1) = {ones}");
    }

    #[test]
    fn full_softmax_sampling_applies_temperature() {
        // top_k 0, top_p 1 (no sort): temperature 2 on logits [0, 2 ln 2, 2 ln 3] gives
        // probabilities 1/6, 2/6, 3/6.
        let c = GenerationConfig {
            temperature: 2.0,
            ..cfg()
        };
        let mut s = Sampler::new(5);
        let mut hits = [0usize; 3];
        let l = [0.0f32, 2.0 * 2f32.ln(), 2.0 * 3f32.ln()];
        for _ in 0..6000 {
            hits[s.pick(&mut l.clone(), &[], &c) as usize] += 1;
        }
        for (h, p) in hits.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((*h as f64 / 6000.0 - p).abs() < 0.02, "{hits:?}");
        }
    }

    #[test]
    fn pick_never_returns_ids_past_vocab_size() {
        // ChatGLM2/3: 65024 logits, 64794 tokens; here 3 tokens, 5 logits, the padded ones
        // largest. Greedy, top-k/top-p and full-softmax sampling all stay below 3.
        let l = [0.0f32, 1.0, 0.5, 9.0, 8.0];
        for c in [
            GenerationConfig {
                do_sample: false,
                vocab_size: Some(3),
                ..cfg()
            },
            GenerationConfig {
                top_k: 2,
                top_p: 0.9,
                vocab_size: Some(3),
                ..cfg()
            },
            GenerationConfig {
                vocab_size: Some(3),
                ..cfg()
            },
        ] {
            let mut s = Sampler::new(1);
            for _ in 0..200 {
                assert!(s.pick(&mut l.clone(), &[], &c) < 3, "{c:?}");
            }
        }
        // Without the cap the padded logit wins.
        let c = GenerationConfig {
            do_sample: false,
            ..cfg()
        };
        assert_eq!(Sampler::new(1).pick(&mut l.clone(), &[], &c), 3);
    }

    #[test]
    fn repetition_penalty_as_transformers() {
        let mut s = Sampler::new(0);
        let c = GenerationConfig {
            do_sample: false,
            repetition_penalty: 2.0,
            ..cfg()
        };
        // token 0 (seen, positive) halves to 1.5 < 2.0; token 2 (seen, negative) doubles.
        let mut l = [3.0, 2.0, -1.0];
        assert_eq!(s.pick(&mut l, &[0, 2, 0], &c), 1);
        assert_eq!(l, [1.5, 2.0, -2.0]);
    }
}
