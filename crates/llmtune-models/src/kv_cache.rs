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

    pub fn clear(&mut self) {
        for l in self.layers.iter_mut() {
            *l = (None, None);
        }
        self.len = 0;
        self.rows.clear();
    }
}
