//! Fresh, seeded weights for a model trained from scratch (a Redux adapter without
//! given weights): every tensor the model asks for is drawn from its `Init` hint
//! (PyTorch's defaults, see [`crate::layers`]) with SplitMix64 seeded by the tensor's
//! name, and made a trainable f32 variable. The same seed gives the same weights on
//! every machine and version, whatever the order the model asks in.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::init::{FanInOut, Init, NormalOrUniform};
use tensorbake_kit::rng::SplitMix64;

use crate::loader::VarSet;

/// Draws `shape` values for `name` from `init`.
fn draw(seed: u64, name: &str, init: Init, shape: &Shape) -> Vec<f32> {
    let n = shape.elem_count();
    let mut rng = SplitMix64::for_name(seed, name);
    let uniform = |rng: &mut SplitMix64, lo: f64, up: f64| lo + (up - lo) * (1.0 - rng.unit());
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * rng.normal()) as f32)
            .collect(),
        Init::Uniform { lo, up } => (0..n).map(|_| uniform(&mut rng, lo, up) as f32).collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn => FanInOut::FanIn.for_shape(shape),
                FanInOut::FanOut => FanInOut::FanOut.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => (0..n).map(|_| (std * rng.normal()) as f32).collect(),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..n)
                        .map(|_| uniform(&mut rng, -bound, bound) as f32)
                        .collect()
                }
            }
        }
    }
}

struct Fresh {
    seed: u64,
    vars: VarSet,
}

impl candle_nn::var_builder::SimpleBackend for Fresh {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: Init,
        _dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let var = self.vars.get_or_insert(name, || {
            Tensor::from_vec(draw(self.seed, name, init, &s), s.dims(), dev)
        })?;
        if var.dims() != s.dims() {
            candle_core::bail!(
                "tensor `{name}` asked for as {:?} and as {:?}",
                var.dims(),
                s.dims()
            );
        }
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tensor `{name}` asked for without a shape cannot be made up")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// A `VarBuilder` whose every tensor is fresh (seeded) and trainable, collected in
/// `vars`; `dtype` is the compute dtype the model is told (variables are f32).
#[must_use]
pub fn fresh_var_builder(
    seed: u64,
    vars: &VarSet,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(Fresh {
            seed,
            vars: vars.clone(),
        }),
        dtype,
        device.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Linear;
    use candle_core::Module;

    #[test]
    fn fresh_weights_are_seeded_trainable_and_torch_scaled() -> candle_core::Result<()> {
        let vars = VarSet::new();
        let vb = fresh_var_builder(5, &vars, DType::F32, &Device::Cpu);
        let lin = Linear::new(256, 64, vb.pp("up"))?;
        assert_eq!(vars.len(), 2);
        assert!(lin.weight().is_variable());
        let w: Vec<f32> = lin.weight().flatten_all()?.to_vec1()?;
        let bound = 1.0 / 16.0;
        assert!(w.iter().all(|v| v.abs() <= bound));
        let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        // U(-b, b) has variance b^2 / 3
        assert!((var - bound * bound / 3.0).abs() < 2e-4, "{var}");
        // same seed, same weights, whatever else was built first
        let vars2 = VarSet::new();
        let vb2 = fresh_var_builder(5, &vars2, DType::F32, &Device::Cpu);
        let _other = Linear::new(3, 3, vb2.pp("down"))?;
        let lin2 = Linear::new(256, 64, vb2.pp("up"))?;
        let diff = (lin.weight() - lin2.weight())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let x = Tensor::ones((1, 256), DType::F32, &Device::Cpu)?;
        assert_eq!(lin.forward(&x)?.dims(), &[1, 64]);
        Ok(())
    }
}
