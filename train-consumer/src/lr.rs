//! The learning rate at each optimizer step: linear warm-up from 0, then constant,
//! cosine to `min_lr`, or piecewise constant (`lr_milestones`).

use crate::config::{LrSchedule, TrainConfig};

/// A learning-rate schedule, a pure function of the step.
#[derive(Debug, Clone, PartialEq)]
pub struct Lr {
    peak: f64,
    schedule: LrSchedule,
    milestones: Vec<(u64, f64)>,
    min_lr: f64,
    warmup: u64,
    steps: u64,
}

impl Lr {
    /// The schedule a config describes.
    #[must_use]
    pub fn new(cfg: &TrainConfig) -> Self {
        Self {
            peak: cfg.lr,
            schedule: cfg.lr_schedule,
            milestones: cfg.lr_milestones.clone(),
            min_lr: cfg.min_lr,
            warmup: cfg.warmup,
            steps: cfg.steps,
        }
    }

    /// The learning rate of optimizer step `step` (1-based: the first update is step 1).
    #[must_use]
    pub fn at(&self, step: u64) -> f64 {
        let base = match self.schedule {
            LrSchedule::Constant => self.peak,
            LrSchedule::Steps => self
                .milestones
                .iter()
                .rev()
                .find(|(s, _)| step > *s)
                .map_or(self.peak, |&(_, lr)| lr),
            LrSchedule::Cosine => {
                let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
                let t = (step.saturating_sub(self.warmup) as f64 / span).clamp(0.0, 1.0);
                self.min_lr
                    + 0.5 * (self.peak - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        };
        if self.warmup > 0 && step < self.warmup {
            base * step as f64 / self.warmup as f64
        } else {
            base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> TrainConfig {
        TrainConfig::parse(
            &format!(
                "store = \"s\"\nmode = \"pixart_redux_adapter\"\npixart = \"p\"\nout = \"o\"\nsteps = 100\nlr = 2e-5\n{extra}"
            ),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn schedules() {
        let c = Lr::new(&cfg(""));
        assert_eq!((c.at(1), c.at(100)), (2e-5, 2e-5));
        // the seed's adapter run: 2e-5 for 35k steps, then 1e-5 (here: 35 of 100)
        let s = Lr::new(&cfg(
            "lr_schedule = \"steps\"\nlr_milestones = [[35, 1e-5]]\n",
        ));
        assert_eq!((s.at(35), s.at(36), s.at(100)), (2e-5, 1e-5, 1e-5));
        let w = Lr::new(&cfg("warmup = 10\n"));
        assert!((w.at(5) - 1e-5).abs() < 1e-18);
        assert_eq!(w.at(10), 2e-5);
        let k = Lr::new(&cfg("lr_schedule = \"cosine\"\nmin_lr = 1e-6\n"));
        assert!((k.at(0) - 2e-5).abs() < 1e-15);
        assert!((k.at(50) - (1e-6 + 0.5 * 1.9e-5)).abs() < 1e-15);
        assert!((k.at(100) - 1e-6).abs() < 1e-15);
    }
}
