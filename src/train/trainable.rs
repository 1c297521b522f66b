//! A model prepared for training: its dense parameters turned into variables, plus a second
//! view of the same storage that records no graph (for forward passes whose activations the
//! reversible and checkpoint strategies do not keep).

use crate::model::decoder::Model;
use anyhow::Result;
use candle_core::{DType, Tensor, TensorId, Var};
use std::collections::HashMap;

pub struct Trainable {
    /// Parameters are variables: forward passes through it build a graph.
    pub graph: Model,
    /// Same storage, detached: forward passes through it build nothing.
    pub frozen: Model,
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    /// Index into `vars` of each trainable tensor of `frozen` (the hand-written backward reads
    /// the frozen view and files its gradients by this).
    frozen_vars: HashMap<TensorId, usize>,
}

impl Trainable {
    /// Makes every dense parameter trainable (f32 master weights), except names for which
    /// `train` says no (they stay constant and get no gradient).
    pub fn new(mut model: Model, train: impl Fn(&str) -> bool) -> Result<Self> {
        model.densify()?;
        let mut names = Vec::new();
        let mut vars = Vec::new();
        for (name, t) in model.parameters_mut() {
            let master = t.to_dtype(if t.dtype() == DType::F64 {
                DType::F64
            } else {
                DType::F32
            })?;
            if train(&name) {
                let var = Var::from_tensor(&master)?;
                *t = var.as_tensor().clone();
                names.push(name);
                vars.push(var);
            } else {
                *t = master.detach();
            }
        }
        let var_index: HashMap<TensorId, usize> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_tensor().id(), i))
            .collect();
        let mut frozen = model.clone();
        let mut frozen_vars = HashMap::new();
        for ((_, t), (_, graph_t)) in frozen
            .parameters_mut()
            .into_iter()
            .zip(model.parameters_mut())
        {
            *t = t.detach();
            if let Some(&i) = var_index.get(&graph_t.id()) {
                frozen_vars.insert(t.id(), i);
            }
        }
        Ok(Self {
            graph: model,
            frozen,
            names,
            vars,
            frozen_vars,
        })
    }

    /// The variable index of a tensor of `frozen`, or None when it is not trained.
    pub fn var_of(&self, frozen_tensor: &Tensor) -> Option<usize> {
        self.frozen_vars.get(&frozen_tensor.id()).copied()
    }

    /// Total number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }
}
