//! A batch-1 decode engine for Llama-family models with quantized linear layers (a GGUF
//! loaded by [`crate::load_for_inference`]): one token's forward in plain Rust over slices,
//! as llama.cpp's CPU backend runs it.
//!
//! Per token: embedding row, then per layer RMSNorm, the q/k/v products, RoPE, attention
//! over this engine's own key/value buffers, `o_proj` and the residual, RMSNorm, gate/up,
//! SwiGLU, `down_proj` and the residual; the final norm and the LM head. The products
//! quantize their input row once (8-bit blocks, as [`QMatrix::matmul`] does) and split
//! their output rows, in 16-row tiles, over a persistent [`Team`] of worker threads (as many
//! as rayon's pool) that waits between steps by spinning briefly, then yielding, then
//! parking; attention is split over heads. Every buffer is allocated when the engine is
//! built (the key/value buffers grow geometrically if a sequence outgrows them), so a token
//! allocates nothing.
//!
//! The arithmetic is that of [`Llama::forward`] on the same weights: the same quantized
//! kernels on the same quantized activations, and the very row kernels of `rms_norm`,
//! `masked_softmax`, `swiglu` and `rope` ([`llmtune_ops::rows`]). Only the attention's two
//! small products (`q k^T` and `p v`) add up in another order than candle's gemm, so logits
//! agree to float rounding (amplified at most by an activation that lands on the other side
//! of an 8-bit rounding boundary), not bit for bit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use llmtune_ops::quant::{quantize_row_q8, BlockQ8, QMatrix, QK, TILE};
use llmtune_ops::rows;
use llmtune_ops::team::Team;

use crate::kv_cache::KvCache;
use crate::llama::{Linear, Llama};
use crate::{ModelError, Result};

/// A quantized linear layer: the matrix and its bias.
struct QLinear {
    w: Arc<QMatrix>,
    bias: Option<Vec<f32>>,
}

impl QLinear {
    fn from(lin: &Linear) -> Option<Self> {
        if lin.adapter.is_some() {
            return None;
        }
        let w = lin.quant.clone()?;
        let bias = match &lin.bias {
            Some(b) => Some(b.to_dtype(DType::F32).ok()?.to_vec1::<f32>().ok()?),
            None => None,
        };
        Some(Self { w, bias })
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    q: QLinear,
    k: QLinear,
    v: QLinear,
    o: QLinear,
    mlp_norm: Vec<f32>,
    gate: QLinear,
    up: QLinear,
    down: QLinear,
}

/// The LM head: a quantized matrix or an f32 `[vocab, hidden]` weight.
enum Head {
    Quant(QLinear),
    F32 { w: Tensor, bias: Option<Vec<f32>> },
}

/// One product of a step: `out[rows] = W x` (plus bias) for the input quantized in `x`.
struct Product<'a> {
    w: &'a QMatrix,
    bias: Option<&'a [f32]>,
    x: &'a [BlockQ8],
    out: *mut f32,
}

/// The products of one step as one row space split into chunks that members take from a
/// shared counter (a member that is late because its core was taken loses its chunks to the
/// others instead of stalling the step).
struct Step<'a> {
    products: &'a [Product<'a>],
    /// First chunk of each product, and the total after the last (at most 3 products: no
    /// allocation per step).
    starts: [usize; 4],
    chunk_rows: usize,
    next: AtomicUsize,
}

// SAFETY: members write disjoint output rows (each chunk is taken once).
unsafe impl Sync for Step<'_> {}

impl<'a> Step<'a> {
    fn new(products: &'a [Product<'a>], threads: usize) -> Self {
        let rows: usize = products.iter().map(|p| p.w.rows()).sum();
        // About 4 chunks per member, whole tiles.
        let chunk_rows = if threads <= 1 {
            usize::MAX / 2
        } else {
            (rows.div_ceil(4 * threads)).div_ceil(TILE).max(1) * TILE
        };
        assert!(
            products.len() <= 3,
            "decode engine: at most 3 products per step"
        );
        let mut starts = [0usize; 4];
        for (i, p) in products.iter().enumerate() {
            starts[i + 1] = starts[i] + p.w.rows().div_ceil(chunk_rows);
        }
        Self {
            products,
            starts,
            chunk_rows,
            next: AtomicUsize::new(0),
        }
    }

    fn run(&self, _member: usize) {
        let n = self.products.len();
        let total = self.starts[n];
        loop {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            if c >= total {
                return;
            }
            let pi = self.starts[..=n].partition_point(|&s| s <= c) - 1;
            let p = &self.products[pi];
            let r0 = (c - self.starts[pi]) * self.chunk_rows;
            let rows = r0..(r0 + self.chunk_rows).min(p.w.rows());
            // SAFETY: `out` has `p.w.rows()` elements and chunk `c` is taken once.
            let out = unsafe { std::slice::from_raw_parts_mut(p.out.add(rows.start), rows.len()) };
            p.w.matmul_rows(p.x, rows.clone(), out);
            if let Some(b) = p.bias {
                for (o, &bv) in out.iter_mut().zip(&b[rows]) {
                    *o += bv;
                }
            }
        }
    }
}

/// Key/value buffers of one layer: `[kv_heads][capacity][head_dim]` each.
struct KvBuf {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The scratch buffers of one token.
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    xq: Vec<BlockQ8>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Rotated query heads.
    qr: Vec<f32>,
    attn: Vec<f32>,
    attn_q: Vec<BlockQ8>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    act_q: Vec<BlockQ8>,
    /// Per head: scores and probabilities over the cached positions, and softmax scratch.
    scores: Vec<f32>,
    probs: Vec<f32>,
    zs: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    logits: Vec<f32>,
}

const ZERO_Q8: BlockQ8 = BlockQ8 {
    d: 0.0,
    s: 0.0,
    qs: [0; QK],
};

struct SendPtr(*mut f32);
// SAFETY: members write disjoint parts (see the users).
unsafe impl Sync for SendPtr {}

/// The batch-1 decode engine of one [`Llama`] model with quantized linear layers.
pub struct DecodeEngine<'m> {
    model: &'m Llama,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    head: Head,
    team: Team,
    /// Members used for the current token: all of the team's, or 1 (see [`Tuner`]).
    active: usize,
    tuner: Tuner,
    kv: Vec<KvBuf>,
    capacity: usize,
    len: usize,
    s: Scratch,
    hidden: usize,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
    eps: f64,
    inv_freq: Vec<f32>,
}

impl std::fmt::Debug for DecodeEngine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DecodeEngine({} layers, {} threads, {}/{} positions)",
            self.layers.len(),
            self.team.threads(),
            self.len,
            self.capacity
        )
    }
}

fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl<'m> DecodeEngine<'m> {
    /// Whether `model` can run on the engine: f32 on the CPU, every linear layer of every
    /// decoder layer quantized, no adapters, and an LM head that is quantized or a plain f32
    /// weight.
    pub fn supports(model: &Llama) -> bool {
        model.device().is_cpu()
            && model.dtype() == DType::F32
            && model.layers.iter().all(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
                .iter()
                .all(|x| x.quant.is_some() && x.adapter.is_none())
            })
            && model.lm_head.as_ref().is_none_or(|h| h.adapter.is_none())
            && model.cfg.hidden_size % QK == 0
            && model.cfg.intermediate_size % QK == 0
            && (model.cfg.num_attention_heads * model.cfg.head_dim) % QK == 0
    }

    /// An engine for `model` with room for `capacity` positions (grown when exceeded), with
    /// as many threads as rayon's pool. `None` when [`DecodeEngine::supports`] says no.
    pub fn new(model: &'m Llama, capacity: usize) -> Result<Option<Self>> {
        Self::with_threads(model, capacity, llmtune_ops::team::default_threads())
    }

    /// [`DecodeEngine::new`] with `threads` members in the team (the caller included).
    pub fn with_threads(model: &'m Llama, capacity: usize, threads: usize) -> Result<Option<Self>> {
        if !Self::supports(model) {
            return Ok(None);
        }
        let cfg = &model.cfg;
        let q = |l: &Linear| QLinear::from(l).expect("checked by supports");
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            layers.push(Layer {
                attn_norm: f32_vec(&l.input_layernorm.weight)?,
                q: q(&a.q_proj),
                k: q(&a.k_proj),
                v: q(&a.v_proj),
                o: q(&a.o_proj),
                mlp_norm: f32_vec(&l.post_attention_layernorm.weight)?,
                gate: q(&m.gate_proj),
                up: q(&m.up_proj),
                down: q(&m.down_proj),
            });
        }
        let head = match (&model.lm_head, &model.tied_head_quant) {
            (Some(h), _) if h.quant.is_some() => Head::Quant(q(h)),
            (Some(h), _) => Head::F32 {
                w: h.weight.to_dtype(DType::F32)?.contiguous()?,
                bias: h.bias.as_ref().map(f32_vec).transpose()?,
            },
            (None, Some(qm)) => Head::Quant(QLinear {
                w: qm.clone(),
                bias: None,
            }),
            (None, None) => Head::F32 {
                w: model.embed_tokens.to_dtype(DType::F32)?.contiguous()?,
                bias: None,
            },
        };
        let (hs, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        if nkv == 0 || nh % nkv != 0 || hd % 2 != 0 {
            return Err(ModelError::Model(format!(
                "decode engine: {nh} heads, {nkv} kv heads, head dim {hd}"
            )));
        }
        let (qd, kvd, ffn) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let capacity = capacity.max(1);
        let vocab = match &head {
            Head::Quant(q) => q.w.rows(),
            Head::F32 { w, .. } => w.dim(0)?,
        };
        let s = Scratch {
            x: vec![0.0; hs],
            xn: vec![0.0; hs],
            xq: vec![ZERO_Q8; hs / QK],
            q: vec![0.0; qd],
            k: vec![0.0; kvd],
            v: vec![0.0; kvd],
            qr: vec![0.0; qd],
            attn: vec![0.0; qd],
            attn_q: vec![ZERO_Q8; qd / QK],
            proj: vec![0.0; hs],
            gate: vec![0.0; ffn],
            up: vec![0.0; ffn],
            act: vec![0.0; ffn],
            act_q: vec![ZERO_Q8; ffn / QK],
            scores: vec![0.0; nh * capacity],
            probs: vec![0.0; nh * capacity],
            zs: vec![0.0; nh * capacity],
            cos: vec![0.0; hd / 2],
            sin: vec![0.0; hd / 2],
            logits: vec![0.0; vocab],
        };
        let kv = (0..layers.len())
            .map(|_| KvBuf {
                k: vec![0.0; nkv * capacity * hd],
                v: vec![0.0; nkv * capacity * hd],
            })
            .collect();
        Ok(Some(Self {
            model,
            layers,
            final_norm: f32_vec(&model.norm.weight)?,
            head,
            team: Team::new(threads),
            active: threads.max(1),
            tuner: Tuner::new(threads > 1 && adapt_enabled()),
            kv,
            capacity,
            len: 0,
            s,
            hidden: hs,
            n_head: nh,
            n_kv: nkv,
            head_dim: hd,
            eps: cfg.rms_norm_eps,
            inv_freq: cfg.inv_freq(),
        }))
    }

    /// Positions decoded so far (cached keys and values).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the key/value buffers hold before they grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Members of the worker team (the calling thread included).
    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    /// Whether tokens may run on the calling thread alone when that measures faster than the
    /// team (on by default with more than one thread, unless `LLMTUNE_DECODE_ADAPT=0`; see
    /// `Tuner`). Off: every token runs on the whole team.
    pub fn set_adaptive(&mut self, on: bool) {
        self.tuner = Tuner::new(on && self.team.threads() > 1);
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Grows the key/value buffers (and the per-position scratch) to hold `need` positions,
    /// at least doubling.
    fn reserve(&mut self, need: usize) {
        if need <= self.capacity {
            return;
        }
        let cap = need.max(2 * self.capacity);
        let (nkv, hd) = (self.n_kv, self.head_dim);
        for b in &mut self.kv {
            for buf in [&mut b.k, &mut b.v] {
                let mut nb = vec![0f32; nkv * cap * hd];
                for g in 0..nkv {
                    let n = self.len * hd;
                    nb[g * cap * hd..g * cap * hd + n]
                        .copy_from_slice(&buf[g * self.capacity * hd..g * self.capacity * hd + n]);
                }
                *buf = nb;
            }
        }
        let nh = self.n_head;
        self.s.scores = vec![0.0; nh * cap];
        self.s.probs = vec![0.0; nh * cap];
        self.s.zs = vec![0.0; nh * cap];
        self.capacity = cap;
    }

    /// Replaces this engine's positions with the keys and values of a one-row candle
    /// `cache` (a prompt prefilled by [`Llama::forward`]), so decoding continues from it.
    pub fn load_cache(&mut self, cache: &KvCache) -> Result<()> {
        let t = cache.len();
        if cache.rows() > 1 {
            return Err(ModelError::Input(format!(
                "decode engine: the cache holds {} rows, the engine decodes one",
                cache.rows()
            )));
        }
        self.len = 0;
        self.reserve(t);
        let (nkv, hd, cap) = (self.n_kv, self.head_dim, self.capacity);
        for (i, b) in self.kv.iter_mut().enumerate() {
            let (k, v) = cache.layer(i).ok_or_else(|| {
                ModelError::Input(format!("decode engine: the cache has no layer {i}"))
            })?;
            for (src, dst) in [(k, &mut b.k), (v, &mut b.v)] {
                let Some(src) = src else {
                    if t == 0 {
                        continue;
                    }
                    return Err(ModelError::Input(format!(
                        "decode engine: layer {i} of the cache is empty"
                    )));
                };
                if src.dims() != [1, nkv, t, hd] {
                    return Err(ModelError::Input(format!(
                        "decode engine: layer {i} cache {:?}, expected [1, {nkv}, {t}, {hd}]",
                        src.dims()
                    )));
                }
                let vals = f32_vec(src)?;
                for g in 0..nkv {
                    dst[g * cap * hd..g * cap * hd + t * hd]
                        .copy_from_slice(&vals[g * t * hd..(g + 1) * t * hd]);
                }
            }
        }
        self.len = t;
        Ok(())
    }

    /// Runs `token` at the next position and returns the next-token logits (f32,
    /// `[vocab]`). The position is the number of positions decoded so far (no padding).
    pub fn step(&mut self, token: u32) -> Result<&[f32]> {
        let vocab = self.model.cfg.vocab_size;
        if token as usize >= self.model.embed_tokens.dim(0)? {
            return Err(ModelError::Input(format!(
                "decode engine: token {token} is out of the vocabulary ({vocab})"
            )));
        }
        self.reserve(self.len + 1);
        let start = std::time::Instant::now();
        self.active = if self.tuner.team_now() {
            self.team.threads()
        } else {
            1
        };
        self.embed(token)?;
        let pos = self.len;
        // Angles in f32 as `Rotary::cos_sin`.
        for ((c, sn), &f) in self
            .s
            .cos
            .iter_mut()
            .zip(self.s.sin.iter_mut())
            .zip(&self.inv_freq)
        {
            let a = pos as f32 * f;
            *c = a.cos();
            *sn = a.sin();
        }
        for li in 0..self.layers.len() {
            self.layer(li, pos);
        }
        self.len += 1;
        self.head()?;
        self.tuner.record(start.elapsed().as_secs_f64());
        Ok(&self.s.logits)
    }

    /// `x = embed_tokens[token]`.
    fn embed(&mut self, token: u32) -> Result<()> {
        let e = &self.model.embed_tokens;
        let (storage, layout) = e.storage_and_layout();
        let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage else {
            return Err(ModelError::Model(
                "decode engine: the embeddings must be f32 on the CPU".into(),
            ));
        };
        let hs = self.hidden;
        let (r, c) = match layout.stride() {
            [r, c] => (*r, *c),
            _ => {
                return Err(ModelError::Model(
                    "decode engine: embeddings not 2-D".into(),
                ))
            }
        };
        let base = layout.start_offset() + token as usize * r;
        for (j, x) in self.s.x.iter_mut().enumerate() {
            *x = v[base + j * c];
        }
        debug_assert_eq!(self.s.x.len(), hs);
        Ok(())
    }

    /// Runs the products on the team.
    fn products(team: &Team, active: usize, products: &[Product<'_>]) {
        let step = Step::new(products, active);
        run_on(team, active, &|m| step.run(m));
    }

    fn layer(&mut self, li: usize, pos: usize) {
        let (nh, nkv, hd) = (self.n_head, self.n_kv, self.head_dim);
        let cap = self.capacity;
        let l = &self.layers[li];
        let s = &mut self.s;
        // Attention block.
        rows::rms_norm(&s.x, &l.attn_norm, self.eps, &mut s.xn);
        quantize_row_q8(&s.xn, &mut s.xq);
        let prods = [
            product(&l.q, &s.xq, &mut s.q),
            product(&l.k, &s.xq, &mut s.k),
            product(&l.v, &s.xq, &mut s.v),
        ];
        Self::products(&self.team, self.active, &prods);
        // RoPE (the tables were filled for `pos` by `step`).
        for h in 0..nh {
            let r = h * hd..(h + 1) * hd;
            rows::rope(&s.q[r.clone()], &s.cos, &s.sin, &mut s.qr[r]);
        }
        let kv = &mut self.kv[li];
        for g in 0..nkv {
            let at = (g * cap + pos) * hd;
            rows::rope(
                &s.k[g * hd..(g + 1) * hd],
                &s.cos,
                &s.sin,
                &mut kv.k[at..at + hd],
            );
            kv.v[at..at + hd].copy_from_slice(&s.v[g * hd..(g + 1) * hd]);
        }
        // Attention over positions 0..=pos, heads split over the team.
        let total = pos + 1;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let rep = nh / nkv;
        {
            let (qr, kvk, kvv) = (&s.qr, &kv.k, &kv.v);
            let attn = SendPtr(s.attn.as_mut_ptr());
            let scores = SendPtr(s.scores.as_mut_ptr());
            let probs = SendPtr(s.probs.as_mut_ptr());
            let zs = SendPtr(s.zs.as_mut_ptr());
            let threads = self.active;
            let work = |m: usize| {
                let (attn, scores, probs, zs) = (&attn, &scores, &probs, &zs);
                for h in llmtune_ops::team::split(nh, threads, m) {
                    let g = h / rep;
                    // SAFETY: head `h`'s slices are used by this member only.
                    let (sc, pr, z, out) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(scores.0.add(h * cap), total),
                            std::slice::from_raw_parts_mut(probs.0.add(h * cap), total),
                            std::slice::from_raw_parts_mut(zs.0.add(h * cap), total),
                            std::slice::from_raw_parts_mut(attn.0.add(h * hd), hd),
                        )
                    };
                    attend(
                        &qr[h * hd..(h + 1) * hd],
                        &kvk[g * cap * hd..(g * cap + total) * hd],
                        &kvv[g * cap * hd..(g * cap + total) * hd],
                        scale,
                        sc,
                        pr,
                        z,
                        out,
                    );
                }
            };
            run_on(&self.team, self.active, &work);
        }
        quantize_row_q8(&s.attn, &mut s.attn_q);
        Self::products(
            &self.team,
            self.active,
            &[product(&l.o, &s.attn_q, &mut s.proj)],
        );
        for (x, p) in s.x.iter_mut().zip(&s.proj) {
            *x += p;
        }
        // MLP block.
        rows::rms_norm(&s.x, &l.mlp_norm, self.eps, &mut s.xn);
        quantize_row_q8(&s.xn, &mut s.xq);
        let prods = [
            product(&l.gate, &s.xq, &mut s.gate),
            product(&l.up, &s.xq, &mut s.up),
        ];
        Self::products(&self.team, self.active, &prods);
        rows::swiglu(&s.gate, &s.up, &mut s.act);
        quantize_row_q8(&s.act, &mut s.act_q);
        Self::products(
            &self.team,
            self.active,
            &[product(&l.down, &s.act_q, &mut s.proj)],
        );
        for (x, p) in s.x.iter_mut().zip(&s.proj) {
            *x += p;
        }
    }

    fn head(&mut self) -> Result<()> {
        let s = &mut self.s;
        rows::rms_norm(&s.x, &self.final_norm, self.eps, &mut s.xn);
        match &self.head {
            Head::Quant(q) => {
                quantize_row_q8(&s.xn, &mut s.xq);
                Self::products(&self.team, self.active, &[product(q, &s.xq, &mut s.logits)]);
            }
            Head::F32 { w, bias } => {
                let (storage, layout) = w.storage_and_layout();
                let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage else {
                    return Err(ModelError::Model(
                        "decode engine: the LM head must be f32 on the CPU".into(),
                    ));
                };
                let hs = self.hidden;
                let wv = &v[layout.start_offset()..layout.start_offset() + s.logits.len() * hs];
                let xn = &s.xn;
                let n = s.logits.len();
                let out = SendPtr(s.logits.as_mut_ptr());
                let threads = self.active;
                run_on(&self.team, self.active, &|m| {
                    let out = &out;
                    for r in llmtune_ops::team::split(n, threads, m) {
                        let d = dot_f32(&wv[r * hs..(r + 1) * hs], xn);
                        // SAFETY: row `r` is written by this member only.
                        unsafe { *out.0.add(r) = d + bias.as_ref().map_or(0.0, |b| b[r]) };
                    }
                });
            }
        }
        Ok(())
    }
}

/// Runs `f` on the first `active` members of `team` (just the caller when 1).
fn run_on(team: &Team, active: usize, f: &(dyn Fn(usize) + Sync)) {
    if active <= 1 {
        f(0)
    } else {
        team.run(f)
    }
}

/// Whether the engine may switch between the whole team and the calling thread alone
/// (`LLMTUNE_DECODE_ADAPT=0`: always the whole team).
fn adapt_enabled() -> bool {
    std::env::var("LLMTUNE_DECODE_ADAPT").map_or(true, |v| v != "0")
}

/// Picks, from measured token times, whether a token runs on the whole team or on the
/// calling thread alone. On cores shared with other busy processes a worker is often
/// descheduled in the middle of its share, and the step waits a whole scheduler time slice
/// for it: the team is then slower than one thread. Every `PERIOD` tokens the mode not in
/// use is tried for `PROBE` tokens (the first one not counted; the first probe after `FIRST` tokens), and kept when it was faster
/// than the running average of the mode in use.
#[derive(Debug)]
struct Tuner {
    enabled: bool,
    /// Mode in use: true = the whole team.
    team: bool,
    /// Running average token time of the mode in use (seconds; 0 = none yet).
    avg: f64,
    since_probe: u32,
    /// Tokens left in the current probe (0 = not probing), and the probe's times.
    probe_left: u32,
    probe_sum: f64,
    probe_n: u32,
}

impl Tuner {
    const PERIOD: u32 = 32;
    /// Tokens before the first probe.
    const FIRST: u32 = 6;
    const PROBE: u32 = 3;

    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            team: true,
            avg: 0.0,
            since_probe: Self::PERIOD - Self::FIRST,
            probe_left: 0,
            probe_sum: 0.0,
            probe_n: 0,
        }
    }

    /// The mode of the next token.
    fn team_now(&self) -> bool {
        if self.probe_left > 0 {
            !self.team
        } else {
            self.team
        }
    }

    fn record(&mut self, secs: f64) {
        if !self.enabled {
            return;
        }
        if self.probe_left > 0 {
            self.probe_left -= 1;
            // The first probe token pays for the switch (workers waking up).
            if self.probe_left < Self::PROBE - 1 {
                self.probe_sum += secs;
                self.probe_n += 1;
            }
            if self.probe_left == 0 {
                let probe = self.probe_sum / self.probe_n.max(1) as f64;
                if probe < 0.97 * self.avg {
                    self.team = !self.team;
                    self.avg = probe;
                }
            }
            return;
        }
        self.avg = if self.avg == 0.0 {
            secs
        } else {
            0.8 * self.avg + 0.2 * secs
        };
        self.since_probe += 1;
        if self.since_probe >= Self::PERIOD {
            self.since_probe = 0;
            self.probe_left = Self::PROBE;
            self.probe_sum = 0.0;
            self.probe_n = 0;
        }
    }
}

fn product<'a>(l: &'a QLinear, x: &'a [BlockQ8], out: &'a mut [f32]) -> Product<'a> {
    debug_assert_eq!(out.len(), l.w.rows());
    Product {
        w: &l.w,
        bias: l.bias.as_deref(),
        x,
        out: out.as_mut_ptr(),
    }
}

/// One head's attention: `out = softmax(scale * K q) V` over `K`, `V` `[t, d]`.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scores: &mut [f32],
    probs: &mut [f32],
    z: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    for (s, kr) in scores.iter_mut().zip(k.chunks_exact(d)) {
        *s = dot_f32(q, kr);
    }
    rows::softmax(scores, scale, z, probs);
    out.fill(0.0);
    for (&p, vr) in probs.iter().zip(v.chunks_exact(d)) {
        for (o, &x) in out.iter_mut().zip(vr) {
            *o += p * x;
        }
    }
}

/// `a . b` with 8 partial sums (vectorizes).
#[inline]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::Tuner;

    /// Feeds `n` tokens timed by `cost(team)`; returns the share of tokens run on the team.
    fn feed(t: &mut Tuner, n: usize, cost: impl Fn(bool) -> f64) -> f64 {
        let mut on_team = 0;
        for _ in 0..n {
            let team = t.team_now();
            on_team += team as usize;
            t.record(cost(team));
        }
        on_team as f64 / n as f64
    }

    #[test]
    fn tuner_follows_the_faster_mode() {
        let mut t = Tuner::new(true);
        // Quiet machine: the team is faster and stays in use (probes aside).
        assert!(feed(&mut t, 200, |team| if team { 7e-3 } else { 12e-3 }) > 0.85);
        assert!(t.team);
        // Shared cores: the team stalls; the tuner moves to one thread within a period.
        assert!(feed(&mut t, 200, |team| if team { 25e-3 } else { 14e-3 }) < 0.25);
        assert!(!t.team);
        // Quiet again: back to the team.
        feed(&mut t, 100, |team| if team { 7e-3 } else { 12e-3 });
        assert!(t.team);
        // Disabled: always the team.
        let mut off = Tuner::new(false);
        assert_eq!(
            feed(&mut off, 100, |team| if team { 1.0 } else { 0.1 }),
            1.0
        );
    }
}
