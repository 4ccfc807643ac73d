//! Key/value cache for incremental decoding.

use candle_core::Tensor;

use crate::Result;

/// Per-layer keys and values `[b, kv_heads, t, head_dim]`, grown as tokens are decoded.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<(Option<Tensor>, Option<Tensor>)>,
    len: usize,
    /// Per-row values a model needs beside the keys and values to place later tokens
    /// (ChatGLM-6B: each row's padding, `<sop>` and mask-token indices), kept in step with
    /// the rows by [`KvCache::select_rows`]. Empty for models that need none.
    pub(crate) rows: Vec<[usize; 3]>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![(None, None); n_layers],
            len: 0,
            rows: Vec::new(),
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layer `i`'s keys and values (`None` while empty), or `None` past the last layer.
    pub fn layer(&self, i: usize) -> Option<(Option<&Tensor>, Option<&Tensor>)> {
        self.layers.get(i).map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut (Option<Tensor>, Option<Tensor>) {
        &mut self.layers[i]
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Keeps only the batch rows in `rows` (finished rows leave the batch).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        if !self.rows.is_empty() {
            let keep: Vec<u32> = rows.to_dtype(candle_core::DType::U32)?.to_vec1()?;
            let old = std::mem::take(&mut self.rows);
            for &r in &keep {
                let row = old.get(r as usize).copied().ok_or_else(|| {
                    crate::ModelError::Input(format!(
                        "select_rows: row {r} is out of range (the cache holds {} rows)",
                        old.len()
                    ))
                })?;
                self.rows.push(row);
            }
        }
        for (k, v) in self.layers.iter_mut() {
            if let Some(t) = k.as_mut() {
                *t = t.index_select(rows, 0)?;
            }
            if let Some(t) = v.as_mut() {
                *t = t.index_select(rows, 0)?;
            }
        }
        Ok(())
    }

    /// Number of batch rows cached (0 while empty).
    pub fn rows(&self) -> usize {
        self.layers
            .iter()
            .find_map(|(k, _)| k.as_ref())
            .and_then(|k| k.dim(0).ok())
            .unwrap_or(0)
    }

    /// The device of the cached tensors (`None` while empty).
    pub fn device(&self) -> Option<&candle_core::Device> {
        self.layers
            .iter()
            .find_map(|(k, _)| k.as_ref())
            .map(|k| k.device())
    }

    /// Prepends `n` zero positions to every row (left padding for continuous batching; the
    /// caller masks them out with a 0 in the attention mask).
    pub fn pad_left(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut() {
            for t in [k, v].into_iter().flatten() {
                let (b, h, _, d) = t.dims4()?;
                let z = Tensor::zeros((b, h, n, d), t.dtype(), t.device())?;
                *t = Tensor::cat(&[&z, &*t], 2)?;
            }
        }
        // ChatGLM-6B row layouts are indices into the padded row: they move right.
        for r in self.rows.iter_mut() {
            for x in r.iter_mut() {
                *x += n;
            }
        }
        self.len += n;
        Ok(())
    }

    /// Drops the first `n` positions of every row (padding no row attends to any more).
    pub fn trim_left(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let keep = self.len.checked_sub(n).ok_or_else(|| {
            crate::ModelError::Input(format!("trim_left({n}) on a cache of {}", self.len))
        })?;
        for (k, v) in self.layers.iter_mut() {
            for t in [k, v].into_iter().flatten() {
                *t = t.narrow(2, n, keep)?.contiguous()?;
            }
        }
        for r in self.rows.iter_mut() {
            for x in r.iter_mut() {
                *x = x.saturating_sub(n);
            }
        }
        self.len = keep;
        Ok(())
    }

    /// Appends the rows of `other` after this cache's rows; both must hold the same number
    /// of positions (pad the shorter one with [`KvCache::pad_left`] first). An empty cache
    /// becomes a copy of `other`.
    pub fn append_rows(&mut self, other: &KvCache) -> Result<()> {
        if self.rows() == 0 {
            *self = other.clone();
            return Ok(());
        }
        if other.len != self.len || other.layers.len() != self.layers.len() {
            return Err(crate::ModelError::Input(format!(
                "append_rows: cache of {} positions onto one of {}",
                other.len, self.len
            )));
        }
        for ((k, v), (ok, ov)) in self.layers.iter_mut().zip(other.layers.iter()) {
            for (t, o) in [(k, ok), (v, ov)] {
                if let (Some(t), Some(o)) = (t.as_mut(), o.as_ref()) {
                    *t = Tensor::cat(&[&*t, o], 0)?;
                }
            }
        }
        self.rows.extend_from_slice(&other.rows);
        Ok(())
    }

    pub fn clear(&mut self) {
        for l in self.layers.iter_mut() {
            *l = (None, None);
        }
        self.len = 0;
        self.rows.clear();
    }
}
