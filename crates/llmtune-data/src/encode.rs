//! Per-stage encoding (SPEC §4).
//!
//! * **SFT training** ([`EncodeMode::Supervised`]): `input = source + specials + target +
//!   eos`, with the prompt (`source + specials`) at most `max_source_length` tokens and the
//!   target cut to `max_target_length - 1`; `labels` are -100 over the prompt, then target +
//!   eos.
//! * **SFT predict and PPO queries** ([`EncodeMode::Prompt`]): `input = source + specials`;
//!   the labels are the response ids cut to `max_target_length - 2` (the reference's
//!   budget), without eos.
//! * **RM pairs** ([`EncodeMode::Pairwise`]): chosen and rejected are each
//!   `source + specials + response[..max_target_length - 1] + eos`.
//!
//! The source is rendered by the template from history + query (query = prompt column +
//! query column), with `source_prefix` as the system text. Over-long prompts keep the
//! **tail** of the history (oldest rounds dropped first; the current question is never
//! dropped; if it alone is too long it loses tokens from its front) — unlike the reference,
//! which keeps the head and so loses the question. See [`crate::template`].
//!
//! A sample whose template scaffolding alone exceeds `max_source_length` is dropped and
//! counted in [`EncodeStats::dropped_over_length`]. ChatGLM-6B examples carry the index of
//! `<sop>` for the model's 2-D positions and prefix attention.
//!
//! Encoding runs on `num_workers` threads; the output order is the input order.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::args::EncodeMode;
use crate::error::Result;
use crate::formats::{RawSample, Response};
use crate::template::ResolvedTemplate;

/// The label value the loss ignores.
pub const IGNORE_INDEX: i64 = -100;

/// An SFT training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisedExample {
    /// `source + specials + target + eos`.
    pub input_ids: Vec<u32>,
    /// -100 over the prompt, then target + eos; as long as `input_ids`.
    pub labels: Vec<i64>,
    /// Length of `source + specials`.
    pub prompt_len: usize,
    /// ChatGLM-6B: index of `<sop>`.
    pub sop_index: Option<usize>,
}

/// A generation prompt (SFT predict, PPO query) with its reference answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptExample {
    /// `source + specials`.
    pub input_ids: Vec<u32>,
    /// The response ids, cut to `max_target_length - 2`, no eos.
    pub target_ids: Vec<u32>,
    /// ChatGLM-6B: index of `<sop>`.
    pub sop_index: Option<usize>,
}

/// A preference pair sharing one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairExample {
    /// `source + specials + chosen + eos`.
    pub chosen_ids: Vec<u32>,
    /// `source + specials + rejected + eos`.
    pub rejected_ids: Vec<u32>,
    /// Length of `source + specials`.
    pub prompt_len: usize,
    /// ChatGLM-6B: index of `<sop>`.
    pub sop_index: Option<usize>,
}

/// One encoded example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// SFT training.
    Supervised(SupervisedExample),
    /// SFT predict / PPO.
    Prompt(PromptExample),
    /// RM.
    Pair(PairExample),
}

impl Example {
    /// The encoding this example has.
    pub fn mode(&self) -> EncodeMode {
        match self {
            Example::Supervised(_) => EncodeMode::Supervised,
            Example::Prompt(_) => EncodeMode::Prompt,
            Example::Pair(_) => EncodeMode::Pairwise,
        }
    }

    /// ChatGLM-6B: the index of `<sop>` (before padding).
    pub fn sop_index(&self) -> Option<usize> {
        match self {
            Example::Supervised(e) => e.sop_index,
            Example::Prompt(e) => e.sop_index,
            Example::Pair(e) => e.sop_index,
        }
    }

    /// The longest input row of the example (chosen or rejected for a pair).
    pub fn max_len(&self) -> usize {
        match self {
            Example::Supervised(e) => e.input_ids.len(),
            Example::Prompt(e) => e.input_ids.len(),
            Example::Pair(e) => e.chosen_ids.len().max(e.rejected_ids.len()),
        }
    }
}

/// Counts and token lengths of an encoding run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EncodeStats {
    /// Samples given to the encoder.
    pub samples: usize,
    /// Examples produced.
    pub kept: usize,
    /// Samples dropped because the template around one query token exceeds
    /// `max_source_length`.
    pub dropped_over_length: usize,
    /// Samples whose prompt was cut (history rounds dropped or query cut).
    pub source_truncated: usize,
    /// History rounds dropped in all.
    pub rounds_dropped: usize,
    /// Samples whose current query lost tokens from its front.
    pub query_truncated: usize,
    /// Samples whose target (chosen or rejected for RM) was cut.
    pub target_truncated: usize,
    /// Per kept example: prompt length (specials included) before truncation.
    pub source_lens_full: Vec<u32>,
    /// Per kept example: prompt length as encoded.
    pub source_lens: Vec<u32>,
    /// Per kept example (two per RM pair: chosen, rejected): target length before cutting.
    pub target_lens_full: Vec<u32>,
    /// The same after cutting (eos not counted).
    pub target_lens: Vec<u32>,
}

/// How to encode.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions<'s> {
    /// Which of the three encodings.
    pub mode: EncodeMode,
    /// Prompt budget, specials included.
    pub max_source_length: usize,
    /// Target budget, eos included.
    pub max_target_length: usize,
    /// `source_prefix`: the system text (the template default when `None`).
    pub system: Option<&'s str>,
    /// Threads.
    pub num_workers: usize,
}

/// Encoded examples with their statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoded {
    /// Examples in input order (dropped samples left out).
    pub examples: Vec<Example>,
    /// Counts.
    pub stats: EncodeStats,
}

struct Kept {
    example: Example,
    source_full: u32,
    source: u32,
    targets: Vec<(u32, u32)>,
    rounds_dropped: usize,
    query_cut: bool,
    target_cut: bool,
}

fn cut(ids: &mut Vec<u32>, limit: usize) -> bool {
    if ids.len() > limit {
        ids.truncate(limit);
        true
    } else {
        false
    }
}

fn encode_one(
    s: &RawSample,
    tpl: &ResolvedTemplate<'_>,
    o: &EncodeOptions<'_>,
) -> Result<Option<Kept>> {
    let Some(p) = tpl.encode_prompt(o.system, &s.history, &s.query, o.max_source_length)? else {
        return Ok(None);
    };
    let prompt_len = p.input_ids.len();
    let eos = tpl.eos_id();
    let mut targets = Vec::new();
    let mut target_cut = false;
    let example = match (o.mode, &s.response) {
        (crate::args::EncodeMode::Supervised, resp) => {
            let text = match resp {
                Response::Text(t) => t.as_str(),
                Response::Pair { chosen, .. } => chosen.as_str(),
            };
            let mut t = tpl.encode_target(text)?;
            let full = t.len() as u32;
            target_cut |= cut(&mut t, o.max_target_length.saturating_sub(1));
            targets.push((full, t.len() as u32));
            let mut input_ids = p.input_ids;
            input_ids.reserve(t.len() + 1);
            let mut labels = vec![IGNORE_INDEX; prompt_len];
            labels.reserve(t.len() + 1);
            for &id in &t {
                input_ids.push(id);
                labels.push(id as i64);
            }
            input_ids.push(eos);
            labels.push(eos as i64);
            Example::Supervised(SupervisedExample {
                input_ids,
                labels,
                prompt_len,
                sop_index: p.sop_index,
            })
        }
        (crate::args::EncodeMode::Prompt, resp) => {
            let text = match resp {
                Response::Text(t) => t.as_str(),
                Response::Pair { chosen, .. } => chosen.as_str(),
            };
            let mut t = tpl.tokenizer().encode(text, false)?;
            let full = t.len() as u32;
            target_cut |= cut(&mut t, o.max_target_length.saturating_sub(2));
            targets.push((full, t.len() as u32));
            Example::Prompt(PromptExample {
                input_ids: p.input_ids,
                target_ids: t,
                sop_index: p.sop_index,
            })
        }
        (crate::args::EncodeMode::Pairwise, resp) => {
            let (chosen, rejected) = match resp {
                Response::Pair { chosen, rejected } => (chosen.as_str(), rejected.as_str()),
                Response::Text(t) => (t.as_str(), ""),
            };
            let mut rows = Vec::with_capacity(2);
            for text in [chosen, rejected] {
                let mut t = tpl.encode_target(text)?;
                let full = t.len() as u32;
                target_cut |= cut(&mut t, o.max_target_length.saturating_sub(1));
                targets.push((full, t.len() as u32));
                let mut row = Vec::with_capacity(prompt_len + t.len() + 1);
                row.extend_from_slice(&p.input_ids);
                row.extend(t);
                row.push(eos);
                rows.push(row);
            }
            let rejected_ids = rows.pop().unwrap_or_default();
            let chosen_ids = rows.pop().unwrap_or_default();
            Example::Pair(PairExample {
                chosen_ids,
                rejected_ids,
                prompt_len,
                sop_index: p.sop_index,
            })
        }
    };
    Ok(Some(Kept {
        example,
        source_full: p.full_len as u32,
        source: prompt_len as u32,
        targets,
        rounds_dropped: p.rounds_dropped,
        query_cut: p.query_tokens_cut > 0,
        target_cut,
    }))
}

/// Samples per work unit handed to a thread.
const BLOCK: usize = 32;

/// Encodes samples in order on `opts.num_workers` threads.
pub fn encode_samples(
    samples: &[RawSample],
    tpl: &ResolvedTemplate<'_>,
    opts: &EncodeOptions<'_>,
) -> Result<Encoded> {
    let blocks = samples.len().div_ceil(BLOCK);
    let workers = opts.num_workers.clamp(1, blocks.max(1));
    let next = AtomicUsize::new(0);
    let run = || -> Result<Vec<(usize, Vec<Option<Kept>>)>> {
        let mut done = Vec::new();
        loop {
            let b = next.fetch_add(1, Ordering::Relaxed);
            if b >= blocks {
                return Ok(done);
            }
            let chunk = &samples[b * BLOCK..((b + 1) * BLOCK).min(samples.len())];
            let mut out = Vec::with_capacity(chunk.len());
            for s in chunk {
                out.push(encode_one(s, tpl, opts)?);
            }
            done.push((b, out));
        }
    };
    let mut parts: Vec<(usize, Vec<Option<Kept>>)> = if workers == 1 {
        run()?
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers).map(|_| scope.spawn(run)).collect();
            let mut all = Vec::new();
            for h in handles {
                match h.join() {
                    Ok(r) => all.extend(r?),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            Ok::<_, crate::error::DataError>(all)
        })?
    };
    parts.sort_by_key(|(b, _)| *b);

    let mut enc = Encoded::default();
    enc.stats.samples = samples.len();
    enc.examples.reserve(samples.len());
    for (_, block) in parts {
        for k in block {
            let Some(k) = k else {
                enc.stats.dropped_over_length += 1;
                continue;
            };
            let st = &mut enc.stats;
            st.kept += 1;
            st.source_lens_full.push(k.source_full);
            st.source_lens.push(k.source);
            for (full, kept) in k.targets {
                st.target_lens_full.push(full);
                st.target_lens.push(kept);
            }
            if k.rounds_dropped > 0 || k.query_cut {
                st.source_truncated += 1;
            }
            st.rounds_dropped += k.rounds_dropped;
            st.query_truncated += usize::from(k.query_cut);
            st.target_truncated += usize::from(k.target_cut);
            enc.examples.push(k.example);
        }
    }
    Ok(enc)
}
