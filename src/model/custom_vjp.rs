//! Graph nodes with a hand-written backward around values computed without a graph.
//!
//! candle differentiates its own ops and custom ops. `record1/2/3` wrap an output computed
//! beforehand (by fused kernels, on any device) in a custom op whose forward hands that output
//! back and whose backward is the given vector-Jacobian product. The graph then keeps only the
//! node's inputs and output, not the kernels' intermediates, and the backward runs in a few
//! fused passes instead of one autograd node per elementary op.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// The VJP of a one-input node: (input, output cotangent) -> input cotangent.
type Vjp1 = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
/// The VJP of a two-input node.
type Vjp2 = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync>;
/// The VJP of a three-input node.
type Vjp3 = Box<
    dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync,
>;

/// `output` recorded as a function of `x` with backward `vjp` (no node when `x` tracks no graph).
pub fn record1(
    x: &Tensor,
    output: Tensor,
    vjp: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(Node1 {
        output: Precomputed(output),
        vjp: Box::new(vjp),
    })
}

/// `output` recorded as a function of `a` and `b` with backward `vjp`.
pub fn record2(
    a: &Tensor,
    b: &Tensor,
    output: Tensor,
    vjp: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op()) {
        return Ok(output);
    }
    a.apply_op2(
        b,
        Node2 {
            output: Precomputed(output),
            vjp: Box::new(vjp),
        },
    )
}

/// `output` recorded as a function of `a`, `b` and `c` with backward `vjp`.
pub fn record3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    output: Tensor,
    vjp: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(output);
    }
    a.apply_op3(
        b,
        c,
        Node3 {
            output: Precomputed(output),
            vjp: Box::new(vjp),
        },
    )
}

/// An output computed before its node exists; the node's forward copies it out.
struct Precomputed(Tensor);

impl Precomputed {
    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.0.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("precomputed output is not on the CPU");
        };
        let Some((from, to)) = layout.contiguous_offsets() else {
            candle_core::bail!("precomputed output is not contiguous");
        };
        let copy = match cpu {
            CpuStorage::F32(v) => CpuStorage::F32(v[from..to].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[from..to].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[from..to].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[from..to].to_vec()),
            other => candle_core::bail!(
                "no hand-written backward in {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((copy, self.0.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let (storage, layout) = self.0.storage_and_layout();
        let candle_core::Storage::Cuda(cuda) = &*storage else {
            candle_core::bail!("precomputed output is not on the GPU");
        };
        let shape = self.0.shape().clone();
        let mut copy = cuda.device().zeros_impl(&shape, self.0.dtype())?;
        cuda.copy_strided_src(&mut copy, 0, layout)?;
        Ok((copy, shape))
    }
}

struct Node1 {
    output: Precomputed,
    vjp: Vjp1,
}

impl CustomOp1 for Node1 {
    fn name(&self) -> &'static str {
        "hand-written-vjp"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.vjp)(&x.detach(), &grad.detach())?))
    }
}

struct Node2 {
    output: Precomputed,
    vjp: Vjp2,
}

impl CustomOp2 for Node2 {
    fn name(&self) -> &'static str {
        "hand-written-vjp"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (ga, gb) = (self.vjp)(&a.detach(), &b.detach(), &grad.detach())?;
        Ok((Some(ga), Some(gb)))
    }
}

struct Node3 {
    output: Precomputed,
    vjp: Vjp3,
}

impl CustomOp3 for Node3 {
    fn name(&self) -> &'static str {
        "hand-written-vjp"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ga, gb, gc) = (self.vjp)(&a.detach(), &b.detach(), &c.detach(), &grad.detach())?;
        Ok((Some(ga), Some(gb), Some(gc)))
    }
}
