//! Random weights made on the device, for benchmarks and device checks of full-size
//! models (T5-XXL is 4.8 B parameters: drawing them one by one on the host, as
//! [`crate::tiny`] does for its files, would take longer than the benchmark).
//!
//! Every tensor a model asks for is drawn by the device's own generator
//! (`Tensor::randn` in f32, then cast to the compute dtype) from the scale
//! [`crate::tiny`] uses for a tensor of that name and shape: norm scales near 1, small
//! biases, `N(0, 1/fan_in)` weights, so activations stay of order one through the
//! depth of the real models. The tensors are kept ([`RandomWeights::tensors`]), so
//! the same weights can build the model a second time elsewhere: on the CPU in f32,
//! as the reference a device result is checked against.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

/// The tensors a [`random_var_builder`] made, by name.
#[derive(Clone, Default)]
pub struct RandomWeights(Arc<Mutex<HashMap<String, Tensor>>>);

impl RandomWeights {
    /// Every tensor made so far (shared storage, not copies).
    #[must_use]
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Parameters made so far.
    #[must_use]
    pub fn params(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Tensor::elem_count)
            .sum()
    }

    /// A `VarBuilder` over the same tensors on `device` in `dtype` (converted as they
    /// are read).
    #[must_use]
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors(), dtype, device)
    }
}

/// A tensor a recording backend made before, asked for again: the same shape or an
/// error naming it, in the dtype and on the device asked for.
pub(crate) fn made_before(
    t: &Tensor,
    name: &str,
    s: &Shape,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    if t.dims() != s.dims() {
        candle_core::bail!(
            "tensor `{name}` asked for as {:?} and as {:?}",
            t.dims(),
            s.dims()
        );
    }
    t.to_dtype(dtype)?.to_device(dev)
}

struct Backend {
    made: RandomWeights,
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut made = self.made.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = made.get(name) {
            return made_before(t, name, &s, dtype, dev);
        }
        let (mean, std) = crate::tiny::value_scale(name, s.dims());
        let t = Tensor::randn(mean as f32, std as f32, s, dev)?.to_dtype(dtype)?;
        made.insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tensor `{name}` asked for without a shape cannot be made up")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// A `VarBuilder` that makes up every tensor asked for on `device` in `dtype`, and
/// the handle to what it made.
#[must_use]
pub fn random_var_builder(dtype: DType, device: &Device) -> (VarBuilder<'static>, RandomWeights) {
    let made = RandomWeights::default();
    let vb = VarBuilder::from_backend(
        Box::new(Backend { made: made.clone() }),
        dtype,
        device.clone(),
    );
    (vb, made)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Linear;
    use candle_core::Module;

    /// Weights are drawn at the named scale, kept, and rebuild the same layer in
    /// another dtype with the same values.
    #[test]
    fn weights_follow_the_scale_and_rebuild_elsewhere() -> candle_core::Result<()> {
        let (vb, made) = random_var_builder(DType::BF16, &Device::Cpu);
        let lin = Linear::new(1024, 64, vb.pp("proj"))?;
        assert_eq!(made.params(), 1024 * 64 + 64);
        let w = lin.weight().to_dtype(DType::F32)?;
        assert_eq!(lin.weight().dtype(), DType::BF16);
        // N(0, 1/1024): the empirical variance of 65536 draws is within a few percent
        let var = w.sqr()?.mean_all()?.to_scalar::<f32>()? * 1024.0;
        assert!((var - 1.0).abs() < 0.05, "{var}");
        let norm = vb.get(512, "norm.weight")?.to_dtype(DType::F32)?;
        let mean = norm.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        // the same tensors, read as f32 on the CPU
        let again = Linear::new(
            1024,
            64,
            made.var_builder(DType::F32, &Device::Cpu).pp("proj"),
        )?;
        assert_eq!(again.weight().dtype(), DType::F32);
        let diff = (again.weight() - &w)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let x = Tensor::ones((2, 1024), DType::F32, &Device::Cpu)?;
        assert_eq!(again.forward(&x)?.dims(), &[2, 64]);
        // a second request with another shape is refused, naming the tensor
        let err = vb.get((3, 3), "norm.weight").unwrap_err().to_string();
        assert!(err.contains("norm.weight"), "{err}");
        Ok(())
    }
}
