//! Helpers shared by the model parity tests: the fixtures, the error measure, and
//! running diffusers where a Python with it is at hand.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

/// Forward parity bound: max |ours - reference| / max |reference|.
pub const FWD_TOL: f32 = 1e-4;
/// Gradient parity bound, per tensor, the same measure.
pub const GRAD_TOL: f32 = 1e-3;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pixart")
}

pub fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden.safetensors"), &Device::Cpu).unwrap()
}

/// max |a - b| / max |b|.
pub fn rel(a: &Tensor, b: &Tensor) -> f32 {
    tensorbake_nn::testing::rel_err(a, b).unwrap()
}

/// A Python that can `import diffusers`: `$TENSORBAKE_PYTHON`, else the reference
/// environment; `Err` says why there is none.
pub fn diffusers_python() -> Result<String, String> {
    let py =
        std::env::var("TENSORBAKE_PYTHON").unwrap_or_else(|_| "/opt/refvenv/bin/python".into());
    match Command::new(&py).args(["-c", "import diffusers"]).output() {
        Ok(o) if o.status.success() => Ok(py),
        Ok(o) => Err(format!(
            "{py} cannot import diffusers: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Err(format!(
            "{py}: {e} (set TENSORBAKE_PYTHON to a Python with diffusers)"
        )),
    }
}

/// One model run through diffusers: the kind (`pixart`, `redux`), the saved model
/// directory, the named inputs.
pub type Job<'a> = (&'a str, &'a Path, HashMap<String, Tensor>);

/// Runs `fixtures/pixart/run_diffusers.py` on every job in one Python process, returns
/// each job's `out`.
pub fn run_diffusers(python: &str, jobs: &[Job<'_>]) -> Vec<Tensor> {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(python);
    cmd.arg(fixtures().join("run_diffusers.py"));
    let mut outs = Vec::new();
    for (i, (kind, dir, inputs)) in jobs.iter().enumerate() {
        let inp = tmp.path().join(format!("inputs{i}.safetensors"));
        let out = tmp.path().join(format!("out{i}.safetensors"));
        candle_core::safetensors::save(inputs, &inp).unwrap();
        cmd.arg(kind).arg(dir).arg(&inp).arg(&out);
        outs.push(out);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "diffusers failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    outs.iter()
        .map(|p| {
            candle_core::safetensors::load(p, &Device::Cpu)
                .unwrap()
                .remove("out")
                .unwrap()
        })
        .collect()
}
