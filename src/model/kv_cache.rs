//! Per-sequence key/value cache, owned by the caller so a server can keep one per sequence and
//! batch sequences of different lengths.

use crate::model::config::ModelConfig;
use candle_core::{DType, Result, Tensor};

/// Keys and values of one layer for one sequence: (kv_heads, capacity, head_dim) buffers grown
/// by doubling, so appending a token is O(1) amortised instead of a full copy.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl LayerKv {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[1])
    }

    /// Appends (kv_heads, t, head_dim) keys and values; returns views of everything cached.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (heads, t, head_dim) = k.dims3()?;
        let needed = self.len + t;
        if needed > self.capacity() {
            let capacity = needed.next_power_of_two().max(16);
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let buffer = Tensor::zeros((heads, capacity, head_dim), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buffer.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                Ok(buffer)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => candle_core::bail!("kv cache buffers missing"),
        };
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = needed;
        Ok((kb.narrow(1, 0, self.len)?, vb.narrow(1, 0, self.len)?))
    }

    fn bytes(&self) -> usize {
        [&self.k, &self.v]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// The packed decode path's cache of one sequence, in host memory.
#[derive(Debug, Clone, Default)]
pub struct HostKv {
    pub layers: Vec<HostLayerKv>,
    /// Positions committed by completed steps (a failed step's rows are overwritten by the
    /// next).
    pub len: usize,
}

/// One layer's keys and values for the packed path. Keys are stored transposed per head,
/// (kv_heads, head_dim, capacity), so one query's scores over consecutive positions are
/// head_dim contiguous multiply-adds with no horizontal sums; values are rows,
/// (positions, kv_heads * head_dim), summed with the scores as weights.
#[derive(Debug, Clone, Default)]
pub struct HostLayerKv {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    pub capacity: usize,
}

impl HostKv {
    pub fn ensure_layers(&mut self, layers: usize) {
        self.layers.resize_with(layers, HostLayerKv::default);
    }

    fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| 4 * (l.keys.capacity() + l.values.capacity()))
            .sum()
    }
}

impl HostLayerKv {
    /// Writes position `at`'s key and value rows (kv_heads * head_dim each), dropping any
    /// rows past it, and grows the buffers by doubling.
    pub fn write(&mut self, at: usize, key: &[f32], value: &[f32], head_dim: usize) {
        let width = key.len();
        let heads = width / head_dim;
        if at >= self.capacity {
            let capacity = (at + 1).next_power_of_two().max(64);
            let mut keys = vec![0.0; heads * head_dim * capacity];
            for row in 0..heads * head_dim {
                keys[row * capacity..][..at]
                    .copy_from_slice(&self.keys[row * self.capacity..][..at]);
            }
            self.keys = keys;
            self.capacity = capacity;
        }
        for (row, &k) in key.iter().enumerate() {
            self.keys[row * self.capacity + at] = k;
        }
        self.values.truncate(at * width);
        self.values.extend_from_slice(value);
    }

    /// Head `head`'s transposed keys: head_dim rows of `capacity` positions.
    pub fn head_keys(&self, head: usize, head_dim: usize) -> &[f32] {
        &self.keys[head * head_dim * self.capacity..][..head_dim * self.capacity]
    }
}

/// The cache of one sequence across all layers: tensors for the generic path, host rows for
/// the packed CPU path; a sequence uses one of them.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    pub host: HostKv,
}

impl KvCache {
    pub fn new(config: &ModelConfig) -> Self {
        Self {
            layers: vec![LayerKv::default(); config.num_hidden_layers],
            host: HostKv::default(),
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len).max(self.host.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the buffers (capacity, not just the used part).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum::<usize>() + self.host.bytes()
    }

    /// Bytes one cached token costs, for admission control under a memory budget.
    pub fn bytes_per_token(config: &ModelConfig, dtype: DType) -> usize {
        2 * config.num_hidden_layers * config.kv_dim() * dtype.size_in_bytes()
    }

    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            *layer = LayerKv::default();
        }
        self.host = HostKv::default();
    }
}
