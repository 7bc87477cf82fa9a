//! Learning-rate schedules with the semantics of Hugging Face transformers'
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (half a cosine cycle). `step` counts optimiser steps from
//! 0: the first update uses `lr_at(0)`, which is 0 whenever there is a warmup.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for ScheduleKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" | "constant_with_warmup" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(Error::config(
                "lr_scheduler",
                format!("`{s}` is not one of constant, linear, cosine"),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub base_lr: f64,
}

impl Schedule {
    /// The multiplier of `base_lr` at optimiser step `step` (transformers' `lr_lambda`).
    pub fn factor(&self, step: usize) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                // num_cycles = 0.5: one half cosine from 1 down to 0 over the decay steps.
                (0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * progress).cos())).max(0.0)
            }
        }
    }

    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b} (diff {})", (a - b).abs());
    }

    #[test]
    fn matches_transformers_values() {
        // warmup 100, total 1000, base 3e-4 (the LLM-Adapters defaults). The non-round values
        // were printed by transformers 4.46.3's schedulers (`3e-4 * lr_lambdas[0](step)`).
        let lin = Schedule {
            kind: ScheduleKind::Linear,
            warmup_steps: 100,
            total_steps: 1000,
            base_lr: 3e-4,
        };
        close(lin.lr_at(0), 0.0);
        close(lin.lr_at(1), 3e-6);
        close(lin.lr_at(50), 1.5e-4);
        close(lin.lr_at(100), 3e-4);
        close(lin.lr_at(550), 1.5e-4); // (1000-550)/900 = 0.5
        close(lin.lr_at(999), 3.333333333333333e-7);
        close(lin.lr_at(1000), 0.0);
        close(lin.lr_at(1200), 0.0);

        let cos = Schedule {
            kind: ScheduleKind::Cosine,
            ..lin
        };
        close(cos.lr_at(10), 3e-5);
        close(cos.lr_at(100), 3e-4);
        close(cos.lr_at(325), 2.5606601717798207e-4); // progress 1/4
        close(cos.lr_at(550), 1.5e-4);
        close(cos.lr_at(1000), 0.0);
        // transformers does not clamp progress at 1, so past total_steps the cosine rises again.
        close(cos.lr_at(1450), 1.4999999999999996e-4);

        let con = Schedule {
            kind: ScheduleKind::Constant,
            ..lin
        };
        close(con.lr_at(25), 7.5e-5);
        close(con.lr_at(100), 3e-4);
        close(con.lr_at(5000), 3e-4);

        // No warmup: full rate at step 0; total == warmup must not divide by zero.
        let nw = Schedule {
            kind: ScheduleKind::Linear,
            warmup_steps: 0,
            total_steps: 4,
            base_lr: 1.0,
        };
        let v: Vec<f64> = (0..5).map(|s| nw.lr_at(s)).collect();
        assert_eq!(v, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        let deg = Schedule {
            kind: ScheduleKind::Cosine,
            warmup_steps: 3,
            total_steps: 3,
            base_lr: 1.0,
        };
        assert!(deg.lr_at(3).is_finite());
        assert_eq!(
            "cosine".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Cosine
        );
        assert!("step".parse::<ScheduleKind>().is_err());
    }
}
