//! `llmtune data inspect`: what the model will see.
//!
//! [`inspect`] prepares the data exactly as training would (cache included) and reports the
//! counts (kept, dropped and why, truncated), token-length percentiles of sources and
//! targets before and after truncation, the dev split sizes, and the first example decoded
//! with its label mask: tokens the loss ignores are shown inside `⟦…⟧`. For preference
//! data it also lists the pairs whose chosen and rejected answers are the same text: they are
//! kept (as the reference keeps them) but carry no preference.

use std::fmt;

use llmtune_tokenize::Tokenizer;

use crate::args::{DataArgs, EncodeMode, Stage};
use crate::encode::{EncodeStats, Example, IGNORE_INDEX};
use crate::error::Result;
use crate::formats::{load_raw, DatasetSummary, Response};
use crate::{prepare, CacheStatus};

/// How many record indices of identical pairs the report prints per dataset.
pub const IDENTICAL_SHOWN: usize = 10;

/// Nearest-rank percentiles of a set of lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    /// How many values.
    pub count: usize,
    /// Median.
    pub p50: u32,
    /// 90th percentile.
    pub p90: u32,
    /// 99th percentile.
    pub p99: u32,
    /// Maximum.
    pub max: u32,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// Percentiles of `values` (nearest rank: the smallest value with at least p% of the
    /// values at or below it); `None` when empty.
    pub fn of(values: &[u32]) -> Option<Percentiles> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_unstable();
        let n = v.len();
        let rank = |p: f64| v[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Percentiles {
            count: n,
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: v[n - 1],
            mean: v.iter().map(|&x| x as f64).sum::<f64>() / n as f64,
        })
    }
}

/// The inspection result; `Display` prints it for the terminal.
#[derive(Debug, Clone)]
pub struct InspectReport {
    /// The stage.
    pub stage: Stage,
    /// The encoding.
    pub mode: EncodeMode,
    /// The template name.
    pub template: &'static str,
    /// The arguments used.
    pub max_source_length: usize,
    /// The arguments used.
    pub max_target_length: usize,
    /// Per-dataset counts.
    pub datasets: Vec<DatasetSummary>,
    /// Encoding counts.
    pub stats: EncodeStats,
    /// Prompt lengths before truncation.
    pub source_full: Option<Percentiles>,
    /// Prompt lengths as encoded.
    pub source: Option<Percentiles>,
    /// Target lengths before truncation.
    pub target_full: Option<Percentiles>,
    /// Target lengths as encoded.
    pub target: Option<Percentiles>,
    /// (train, dev) sizes when `dev_ratio > 0`.
    pub dev_split: Option<(usize, usize)>,
    /// `dev_ratio` and `seed`.
    pub dev_ratio: f64,
    /// The split seed.
    pub seed: u64,
    /// What the cache did.
    pub cache: CacheStatus,
    /// The first example as (heading, text) blocks.
    pub first: Vec<(String, String)>,
    /// Preference data: per dataset (in order), the 0-based record indices (within the
    /// record's file, as error messages count) of pairs whose chosen and rejected answers
    /// are the same text. Empty for other stages.
    pub identical_pairs: Vec<(String, Vec<usize>)>,
}

impl InspectReport {
    /// Number of pairs with chosen == rejected over all datasets.
    pub fn identical_pair_count(&self) -> usize {
        self.identical_pairs.iter().map(|(_, v)| v.len()).sum()
    }
}

/// Per dataset, the record indices of the pairs whose chosen and rejected texts are equal.
fn identical_pairs(args: &DataArgs, stage: Stage) -> Result<Vec<(String, Vec<usize>)>> {
    if !stage.is_pairwise() {
        return Ok(Vec::new());
    }
    let raw = load_raw(args, stage)?;
    let mut out: Vec<(String, Vec<usize>)> = raw
        .datasets
        .iter()
        .map(|d| (d.name.clone(), Vec::new()))
        .collect();
    for s in &raw.samples {
        if let Response::Pair { chosen, rejected } = &s.response {
            if chosen == rejected {
                out[s.dataset].1.push(s.record);
            }
        }
    }
    Ok(out)
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    Ok(tok.decode(ids, false)?)
}

/// Decodes a label row, wrapping spans the loss ignores in `⟦…⟧` (decoded from the
/// corresponding input ids).
pub fn render_label_mask(tok: &Tokenizer, input_ids: &[u32], labels: &[i64]) -> Result<String> {
    let mut out = String::new();
    let mut i = 0;
    while i < labels.len() {
        let masked = labels[i] == IGNORE_INDEX;
        let mut j = i;
        while j < labels.len() && (labels[j] == IGNORE_INDEX) == masked {
            j += 1;
        }
        if masked {
            let span = &input_ids[i.min(input_ids.len())..j.min(input_ids.len())];
            out.push('⟦');
            out.push_str(&decode(tok, span)?);
            out.push('⟧');
        } else {
            let ids: Vec<u32> = labels[i..j].iter().map(|&x| x.max(0) as u32).collect();
            out.push_str(&decode(tok, &ids)?);
        }
        i = j;
    }
    Ok(out)
}

fn show_ids<T: fmt::Display>(ids: &[T]) -> String {
    let parts: Vec<String> = ids.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

fn render_first(tok: &Tokenizer, e: &Example) -> Result<Vec<(String, String)>> {
    let mut v = Vec::new();
    match e {
        Example::Supervised(s) => {
            v.push(("input_ids".into(), show_ids(&s.input_ids)));
            v.push(("inputs".into(), decode(tok, &s.input_ids)?));
            v.push(("label_ids".into(), show_ids(&s.labels)));
            v.push((
                "labels (⟦masked⟧ = ignored by the loss)".into(),
                render_label_mask(tok, &s.input_ids, &s.labels)?,
            ));
        }
        Example::Prompt(p) => {
            v.push(("input_ids".into(), show_ids(&p.input_ids)));
            v.push(("inputs".into(), decode(tok, &p.input_ids)?));
            v.push(("label_ids".into(), show_ids(&p.target_ids)));
            v.push(("labels".into(), decode(tok, &p.target_ids)?));
        }
        Example::Pair(p) => {
            let mask = |row: &[u32]| -> Vec<i64> {
                row.iter()
                    .enumerate()
                    .map(|(i, &x)| {
                        if i < p.prompt_len {
                            IGNORE_INDEX
                        } else {
                            x as i64
                        }
                    })
                    .collect()
            };
            v.push(("chosen_ids".into(), show_ids(&p.chosen_ids)));
            v.push((
                "chosen (⟦prompt⟧ + response)".into(),
                render_label_mask(tok, &p.chosen_ids, &mask(&p.chosen_ids))?,
            ));
            v.push(("rejected_ids".into(), show_ids(&p.rejected_ids)));
            v.push((
                "rejected (⟦prompt⟧ + response)".into(),
                render_label_mask(tok, &p.rejected_ids, &mask(&p.rejected_ids))?,
            ));
        }
    }
    if let Some(s) = e.sop_index() {
        v.push(("<sop> index".into(), s.to_string()));
    }
    Ok(v)
}

/// Prepares the data of `args` for `stage` as training would and reports on it.
pub fn inspect(
    args: &DataArgs,
    tokenizer: &Tokenizer,
    stage: Stage,
    predict_with_generate: bool,
) -> Result<InspectReport> {
    Ok(inspect_examples(args, tokenizer, stage, predict_with_generate)?.0)
}

/// [`inspect`], also returning the encoded examples it reported on (prepared once).
pub fn inspect_examples(
    args: &DataArgs,
    tokenizer: &Tokenizer,
    stage: Stage,
    predict_with_generate: bool,
) -> Result<(InspectReport, Vec<Example>)> {
    let data = prepare(args, tokenizer, stage, predict_with_generate)?;
    let first = match data.examples.first() {
        Some(e) => render_first(tokenizer, e)?,
        None => Vec::new(),
    };
    let n = data.examples.len();
    let dev_split = if args.dev_ratio > 0.0 {
        let dev = (args.dev_ratio * n as f64).ceil() as usize;
        Some((n.saturating_sub(dev), dev))
    } else {
        None
    };
    let identical_pairs = identical_pairs(args, stage)?;
    let st = &data.stats;
    let report = InspectReport {
        stage,
        mode: data.mode,
        template: data.template.name,
        max_source_length: args.max_source_length,
        max_target_length: args.max_target_length,
        source_full: Percentiles::of(&st.source_lens_full),
        source: Percentiles::of(&st.source_lens),
        target_full: Percentiles::of(&st.target_lens_full),
        target: Percentiles::of(&st.target_lens),
        stats: data.stats,
        datasets: data.datasets,
        dev_split,
        dev_ratio: args.dev_ratio,
        seed: args.seed,
        cache: data.cache,
        first,
        identical_pairs,
    };
    Ok((report, data.examples))
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "template {}, stage {} ({:?}), max_source_length {}, max_target_length {}",
            self.template, self.stage, self.mode, self.max_source_length, self.max_target_length
        )?;
        writeln!(f, "datasets:")?;
        for d in &self.datasets {
            writeln!(f, "  {}: {} ({})", d.name, d.path.display(), d.sha1)?;
            write!(
                f,
                "    {} records, {} used, {} kept; dropped {} with an empty prompt, {} with an empty response",
                d.records, d.used, d.kept, d.dropped_empty_prompt, d.dropped_empty_response
            )?;
            if d.extra_responses_ignored > 0 {
                write!(
                    f,
                    "; {} rows with more than two responses (first two used)",
                    d.extra_responses_ignored
                )?;
            }
            writeln!(f)?;
        }
        let s = &self.stats;
        writeln!(
            f,
            "encoded: {} examples from {} samples; {} dropped as over length",
            s.kept, s.samples, s.dropped_over_length
        )?;
        writeln!(
            f,
            "truncated: {} prompts ({} oldest history rounds dropped; the query cut from the front in {}); {} targets",
            s.source_truncated, s.rounds_dropped, s.query_truncated, s.target_truncated
        )?;
        writeln!(
            f,
            "token lengths          count     p50     p90     p99     max     mean"
        )?;
        for (name, p) in [
            ("source (before cut)", &self.source_full),
            ("source", &self.source),
            ("target (before cut)", &self.target_full),
            ("target", &self.target),
        ] {
            if let Some(p) = p {
                writeln!(
                    f,
                    "  {name:<20} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8.1}",
                    p.count, p.p50, p.p90, p.p99, p.max, p.mean
                )?;
            }
        }
        if self.stage.is_pairwise() {
            let n = self.identical_pair_count();
            write!(f, "pairs with chosen == rejected: {n}")?;
            if n > 0 {
                write!(
                    f,
                    " (kept; they carry no preference: loss log 2, never counted as correct)"
                )?;
            }
            writeln!(f)?;
            for (name, records) in &self.identical_pairs {
                if records.is_empty() {
                    continue;
                }
                let shown: Vec<String> = records
                    .iter()
                    .take(IDENTICAL_SHOWN)
                    .map(|r| r.to_string())
                    .collect();
                writeln!(
                    f,
                    "  {name}: {} at records {}{}",
                    records.len(),
                    shown.join(", "),
                    if records.len() > IDENTICAL_SHOWN {
                        ", ..."
                    } else {
                        ""
                    }
                )?;
            }
        }
        if let Some((train, dev)) = self.dev_split {
            writeln!(
                f,
                "dev split (dev_ratio {}, seed {}): {train} train / {dev} dev",
                self.dev_ratio, self.seed
            )?;
        }
        match &self.cache {
            CacheStatus::Disabled => writeln!(f, "cache: disabled")?,
            CacheStatus::Hit(p) => writeln!(f, "cache: loaded {}", p.display())?,
            CacheStatus::Written(p) => writeln!(f, "cache: wrote {}", p.display())?,
            CacheStatus::WriteFailed(p, e) => {
                writeln!(f, "cache: could not write {} ({e})", p.display())?
            }
        }
        if !self.first.is_empty() {
            writeln!(f, "first example:")?;
            for (h, t) in &self.first {
                writeln!(f, "{h}:\n{t}")?;
            }
        }
        Ok(())
    }
}
