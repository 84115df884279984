//! Gradient checkpointing (per-block recomputation) for the transformers' training
//! paths: a block runs as one custom op whose forward keeps only its inputs and its
//! output; its backward recomputes the block with the graph on and returns the inputs'
//! gradients, while the gradients of the block's trainable parameters go to a side
//! store ([`SideGrads`]) that the step merges after the backward ([`gather`]).
//!
//! The activations held between forward and backward are then the blocks' inputs and
//! outputs only, plus one block's full activations at a time during the backward.
//! PixArt's blocks ([`crate::pixart_task`]) and Flux's double and single blocks
//! ([`crate::flux_task`]) use it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, TensorId, Var};
use tensorbake_nn::loader::VarSet;

/// Applies a block parameter's gradient as soon as the backward has it (an optimizer
/// update during the backward); returns whether it took the gradient.
pub type ApplyFn = Arc<dyn Fn(&Var, &Tensor) -> Result<bool> + Send + Sync>;

/// Gradients of block parameters computed inside recomputing backwards, by variable;
/// or, with [`SideGrads::applying`], handed to an optimizer there and then.
#[derive(Default, Clone)]
pub struct SideGrads {
    grads: Arc<Mutex<HashMap<TensorId, Tensor>>>,
    apply: Option<ApplyFn>,
}

impl std::fmt::Debug for SideGrads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideGrads")
            .field("applying", &self.apply.is_some())
            .finish_non_exhaustive()
    }
}

impl SideGrads {
    /// Gradients go to `apply` as each block's backward computes them; those it takes
    /// are not kept (so [`gather`] gives `None` for them).
    #[must_use]
    pub fn applying(apply: ApplyFn) -> Self {
        Self {
            grads: Arc::default(),
            apply: Some(apply),
        }
    }

    fn add(&self, var: &Var, g: &Tensor) -> Result<()> {
        if let Some(apply) = &self.apply
            && apply(var, g)?
        {
            return Ok(());
        }
        let id = var.as_tensor().id();
        let mut m = self
            .grads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sum = match m.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g.clone(),
        };
        m.insert(id, sum);
        Ok(())
    }

    fn take(&self, id: TensorId) -> Option<Tensor> {
        self.grads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id)
    }
}

/// The gradient of each of `vars` (in order): what the backward put in `grads` plus
/// what recomputed blocks put in `side`.
///
/// # Errors
/// candle errors adding the two.
pub fn gather(
    vars: &[(String, Var)],
    grads: &GradStore,
    side: &SideGrads,
) -> Result<Vec<Option<Tensor>>> {
    vars.iter()
        .map(|(_, v)| {
            let main = grads.get(v.as_tensor()).cloned();
            let extra = side.take(v.as_tensor().id());
            Ok(match (main, extra) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            })
        })
        .collect()
}

/// A block's computation on its differentiable inputs (two or three tensors; what it
/// reads besides, such as RoPE tables or a mask, it captures).
pub type BlockFn = Arc<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

/// One block as a recomputed custom op.
struct Recomputed {
    name: &'static str,
    f: BlockFn,
    /// The output computed in the forward, handed out once (then dropped: the op keeps
    /// only what its backward needs, not a second copy of the output).
    out: Mutex<Option<Tensor>>,
    vars: VarSet,
    side: SideGrads,
}

impl Recomputed {
    fn copy_out(&self) -> Result<(candle_core::Storage, Shape)> {
        use candle_core::backend::BackendStorage;
        let out = self
            .out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .ok_or_else(|| candle_core::Error::Msg("recompute: the output was taken".into()))?;
        let (storage, layout) = out.storage_and_layout();
        let copied = match &*storage {
            candle_core::Storage::Cpu(s) => candle_core::Storage::Cpu(s.try_clone(layout)?),
            #[cfg(feature = "cuda")]
            candle_core::Storage::Cuda(s) => candle_core::Storage::Cuda(s.try_clone(layout)?),
            #[allow(unreachable_patterns)]
            _ => candle_core::bail!("gradient checkpointing: unsupported device"),
        };
        Ok((copied, out.shape().clone()))
    }

    fn cpu_out(&self) -> Result<(CpuStorage, Shape)> {
        match self.copy_out()? {
            (candle_core::Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("gradient checkpointing: output not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_out(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.copy_out()? {
            (candle_core::Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("gradient checkpointing: output not on the GPU"),
        }
    }

    /// Recomputes with the graph on (fresh leaves for the inputs that need gradients),
    /// sends the parameters' gradients to the side store and returns the inputs'.
    fn backward(&self, inputs: &[&Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut leaves = Vec::with_capacity(inputs.len());
        let mut vars = Vec::with_capacity(inputs.len());
        for t in inputs {
            if t.track_op() {
                let v = Var::from_tensor(&t.detach())?;
                leaves.push(v.as_tensor().clone());
                vars.push(Some(v));
            } else {
                leaves.push(t.detach());
                vars.push(None);
            }
        }
        let out = (self.f)(&leaves)?;
        let grads = (out * grad.detach())?.sum_all()?.backward()?;
        for (_, var) in self.vars.vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                self.side.add(&var, g)?;
            }
        }
        Ok(vars
            .into_iter()
            .map(|v| v.and_then(|v| grads.get(v.as_tensor()).cloned()))
            .collect())
    }
}

impl CustomOp2 for Recomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_out()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_out()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.backward(&[a, b], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for Recomputed {
    fn name(&self) -> &'static str {
        self.name
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
        self.cpu_out()
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
        self.cuda_out()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.backward(&[a, b, c], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

/// Runs `f` on `inputs` (two or three tensors) so that only the inputs and the output
/// stay alive until the backward, which recomputes it; the gradients of the trainable
/// parameters `f` reads (`trains`: it reads some) land in `grads.1`. Gives the same
/// output and gradients as calling `f` directly.
///
/// # Errors
/// candle errors; not two or three inputs.
pub fn recompute(
    name: &'static str,
    f: BlockFn,
    inputs: &[&Tensor],
    trains: bool,
    grads: &(VarSet, SideGrads),
) -> Result<Tensor> {
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let out = f(&detached)?.detach().contiguous()?;
    let op = Recomputed {
        name,
        f,
        out: Mutex::new(Some(out)),
        vars: grads.0.clone(),
        side: grads.1.clone(),
    };
    // A block whose parameters train must be in the graph even when no input needs a
    // gradient (the blocks before it frozen): a leaf input makes the op recorded.
    let first = if trains && !inputs.iter().any(|t| t.track_op()) {
        Var::from_tensor(inputs[0])?.as_tensor().clone()
    } else {
        inputs[0].clone()
    };
    match inputs {
        [_, b] => first.apply_op2(b, op),
        [_, b, c] => first.apply_op3(b, c, op),
        _ => candle_core::bail!("recompute: {} inputs (two or three)", inputs.len()),
    }
}
