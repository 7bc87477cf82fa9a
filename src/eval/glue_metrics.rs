//! GLUE metrics with the semantics of the references the GLUE benchmark and the Hugging Face
//! `evaluate` `glue` metric use: scikit-learn's `matthews_corrcoef`, `accuracy_score` and
//! `f1_score` (binary, positive class 1, `zero_division` giving 0), SciPy's `pearsonr` and
//! `spearmanr` (average ranks for ties). Computed in f64.

use std::collections::BTreeMap;

use crate::data::glue::{GlueLabel, GlueTask};
use crate::error::{Error, Result};

/// Matthews correlation coefficient in scikit-learn's multiclass form: with `C` the
/// confusion matrix, `t` its row sums (true counts), `p` its column sums, `s` the number of
/// samples and `c` the trace,
/// `(c·s − t·p) / sqrt((s² − p·p)(s² − t·t))`, and 0 when the denominator is 0 (one class
/// only in the labels or in the predictions).
///
/// Panics if the slices differ in length.
pub fn matthews_corrcoef(labels: &[usize], preds: &[usize]) -> f64 {
    assert_eq!(
        labels.len(),
        preds.len(),
        "labels and predictions differ in length"
    );
    // Per class: (label count, prediction count).
    let mut counts: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
    let mut correct = 0f64;
    for (&l, &q) in labels.iter().zip(preds) {
        counts.entry(l).or_default().0 += 1.0;
        counts.entry(q).or_default().1 += 1.0;
        correct += f64::from(u8::from(l == q));
    }
    let s = labels.len() as f64;
    let (mut tp, mut pp, mut tt) = (0.0, 0.0, 0.0);
    for (t, p) in counts.values() {
        tp += t * p;
        pp += p * p;
        tt += t * t;
    }
    let cov_tp = correct * s - tp;
    let cov_pp = s * s - pp;
    let cov_tt = s * s - tt;
    if cov_pp * cov_tt == 0.0 {
        return 0.0;
    }
    cov_tp / (cov_tt * cov_pp).sqrt()
}

/// Fraction of predictions equal to their label (NaN for no samples).
///
/// Panics if the slices differ in length.
pub fn accuracy(labels: &[usize], preds: &[usize]) -> f64 {
    assert_eq!(
        labels.len(),
        preds.len(),
        "labels and predictions differ in length"
    );
    let hits = labels.iter().zip(preds).filter(|(l, p)| l == p).count();
    hits as f64 / labels.len() as f64
}

/// F1 of class 1: `2·P·R / (P + R)` with precision `P = tp / (tp + fp)` and recall
/// `R = tp / (tp + fn)`, each 0 when its denominator is, and 0 when `P + R` is.
///
/// Panics if the slices differ in length.
pub fn f1_binary(labels: &[usize], preds: &[usize]) -> f64 {
    assert_eq!(
        labels.len(),
        preds.len(),
        "labels and predictions differ in length"
    );
    let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
    for (&l, &p) in labels.iter().zip(preds) {
        match (l == 1, p == 1) {
            (true, true) => tp += 1,
            (false, true) => fp += 1,
            (true, false) => fn_ += 1,
            (false, false) => {}
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (precision, recall) = (ratio(tp, tp + fp), ratio(tp, tp + fn_));
    if precision + recall == 0.0 {
        return 0.0;
    }
    2.0 * precision * recall / (precision + recall)
}

/// Pearson correlation; NaN when either input is constant (as SciPy returns, with a warning)
/// or holds a NaN.
///
/// Panics if the slices differ in length.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "inputs differ in length");
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    // Clipped like SciPy: rounding can push |r| a hair past 1.
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// Spearman rank correlation: Pearson correlation of the ranks, tied values sharing the
/// average of their ranks. NaN as [`pearson`], and when an input holds a NaN.
///
/// Panics if the slices differ in length.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "inputs differ in length");
    if x.iter().chain(y).any(|v| v.is_nan()) {
        return f64::NAN;
    }
    pearson(&average_ranks(x), &average_ranks(y))
}

/// 1-based ranks, ties averaged (`scipy.stats.rankdata(method="average")`).
fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && v[order[end]] == v[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; their mean is (start + 1 + end) / 2.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// The task's GLUE metrics: `matthews_correlation` (CoLA); `accuracy` (SST-2, QNLI, RTE,
/// MNLI); `accuracy` and `f1` (MRPC, QQP); `pearson` and `spearmanr` (STS-B).
///
/// Errors when the inputs are empty or differ in length, or when a label or prediction is
/// not of the task's kind (a class id below the task's number of labels; an STS-B score).
pub fn glue_metrics(
    task: GlueTask,
    labels: &[GlueLabel],
    preds: &[GlueLabel],
) -> Result<BTreeMap<String, f64>> {
    if labels.len() != preds.len() {
        return Err(Error::msg(format!(
            "{task} metrics: {} labels but {} predictions",
            labels.len(),
            preds.len()
        )));
    }
    if labels.is_empty() {
        return Err(Error::msg(format!("{task} metrics: no examples")));
    }
    let mut out = BTreeMap::new();
    if task.is_regression() {
        let scores = |v: &[GlueLabel], what: &str| -> Result<Vec<f64>> {
            v.iter()
                .enumerate()
                .map(|(i, l)| match l {
                    GlueLabel::Score(s) => Ok(f64::from(*s)),
                    GlueLabel::Class(_) => Err(kind_error(task, what, i, l)),
                })
                .collect()
        };
        let (y, p) = (scores(labels, "label")?, scores(preds, "prediction")?);
        out.insert("pearson".into(), pearson(&p, &y));
        out.insert("spearmanr".into(), spearman(&p, &y));
        return Ok(out);
    }
    let classes = |v: &[GlueLabel], what: &str| -> Result<Vec<usize>> {
        v.iter()
            .enumerate()
            .map(|(i, l)| match l {
                GlueLabel::Class(c) if *c < task.num_labels() => Ok(*c),
                _ => Err(kind_error(task, what, i, l)),
            })
            .collect()
    };
    let (y, p) = (classes(labels, "label")?, classes(preds, "prediction")?);
    match task {
        GlueTask::Cola => {
            out.insert("matthews_correlation".into(), matthews_corrcoef(&y, &p));
        }
        GlueTask::Mrpc | GlueTask::Qqp => {
            out.insert("accuracy".into(), accuracy(&y, &p));
            out.insert("f1".into(), f1_binary(&y, &p));
        }
        _ => {
            out.insert("accuracy".into(), accuracy(&y, &p));
        }
    }
    Ok(out)
}

fn kind_error(task: GlueTask, what: &str, index: usize, got: &GlueLabel) -> Error {
    let expected = if task.is_regression() {
        "a score".to_string()
    } else {
        format!("a class id below {}", task.num_labels())
    };
    Error::msg(format!(
        "{task} metrics: {what} {index} is {got:?}, expected {expected}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!(
            (a - b).abs() < 1e-12,
            "{a} != {b} (diff {:e})",
            (a - b).abs()
        );
    }

    #[test]
    fn mcc_matches_the_binary_formula_and_sklearn() {
        // tp = 2, fn = 1, tn = 2, fp = 1: (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))
        // = (4 − 1) / sqrt(3·3·3·3) = 1/3. Multiclass form: c = 4, s = 6, t = p = [3, 3]:
        // (24 − 18) / sqrt((36 − 18)(36 − 18)) = 6 / 18.
        close(
            matthews_corrcoef(&[1, 1, 1, 0, 0, 0], &[1, 1, 0, 0, 0, 1]),
            1.0 / 3.0,
        );
        // scikit-learn's docstring example, y_true = [+1, +1, +1, -1], y_pred = [+1, -1, +1,
        // +1] -> -0.33 (with -1 as class 0): tp = 2, fn = 1, fp = 1, tn = 0 -> -1 / sqrt(9).
        close(matthews_corrcoef(&[1, 1, 1, 0], &[1, 0, 1, 1]), -1.0 / 3.0);
        close(matthews_corrcoef(&[0, 1, 1, 0], &[0, 1, 1, 0]), 1.0);
        close(matthews_corrcoef(&[0, 1, 1, 0], &[1, 0, 0, 1]), -1.0);
    }

    #[test]
    fn mcc_multiclass() {
        // labels 0 1 2 0 1 2, preds 0 2 1 0 0 2: c = 3 (positions 0, 3, 5), s = 6,
        // t = [2, 2, 2], p = [3, 1, 2]; t·p = 12, p·p = 14, t·t = 12.
        // (3·6 − 12) / sqrt((36 − 14)(36 − 12)) = 6 / sqrt(528).
        let m = matthews_corrcoef(&[0, 1, 2, 0, 1, 2], &[0, 2, 1, 0, 0, 2]);
        close(m, 6.0 / 528f64.sqrt());
        // Class ids need not be dense: c = 2, s = 3, t = [1, 2], p = [2, 1];
        // (2·3 − 4) / sqrt((9 − 5)(9 − 5)) = 0.5.
        close(matthews_corrcoef(&[0, 7, 7], &[0, 7, 0]), 0.5);
    }

    #[test]
    fn mcc_degenerate_is_zero() {
        // One predicted class: s² − p·p = 16 − 16 = 0.
        assert_eq!(matthews_corrcoef(&[0, 1, 1, 0], &[1, 1, 1, 1]), 0.0);
        // One true class.
        assert_eq!(matthews_corrcoef(&[1, 1, 1], &[1, 0, 1]), 0.0);
        assert_eq!(matthews_corrcoef(&[], &[]), 0.0);
    }

    #[test]
    fn accuracy_and_f1() {
        close(accuracy(&[0, 1, 1, 0], &[0, 1, 0, 0]), 0.75);
        // tp = 2, fp = 1, fn = 1: P = R = 2/3, F1 = 2/3.
        close(
            f1_binary(&[1, 1, 1, 0, 0, 0], &[1, 1, 0, 0, 0, 1]),
            2.0 / 3.0,
        );
        // tp = 1, fp = 0, fn = 1: P = 1, R = 1/2, F1 = 2·(1/2) / (3/2) = 2/3.
        close(f1_binary(&[1, 1, 0], &[1, 0, 0]), 2.0 / 3.0);
        // tp = 3, fp = 1, fn = 0: P = 3/4, R = 1, F1 = (3/2) / (7/4) = 6/7.
        close(f1_binary(&[1, 1, 1, 0], &[1, 1, 1, 1]), 6.0 / 7.0);
        // No positive predicted (P = 0/0 -> 0, R = 0): 0. No positives anywhere: 0.
        assert_eq!(f1_binary(&[1, 1, 0], &[0, 0, 0]), 0.0);
        assert_eq!(f1_binary(&[0, 0], &[0, 0]), 0.0);
        // Positives predicted, none true (P = 0, R = 0/0 -> 0): 0.
        assert_eq!(f1_binary(&[0, 0], &[1, 0]), 0.0);
        close(f1_binary(&[1, 0], &[1, 0]), 1.0);
    }

    #[test]
    fn pearson_and_spearman_with_ties() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [2.0, 4.0, 5.0, 4.0, 5.0];
        // Deviations dx = [-2, -1, 0, 1, 2], dy = [-2, 0, 1, 0, 1]: Σdxdy = 6, Σdx² = 10,
        // Σdy² = 6, r = 6 / sqrt(60).
        close(pearson(&x, &y), 6.0 / 60f64.sqrt());
        // Ranks of y with ties averaged: 2 -> 1, the 4s -> (2 + 3)/2, the 5s -> (4 + 5)/2.
        assert_eq!(average_ranks(&y), [1.0, 2.5, 4.5, 2.5, 4.5]);
        assert_eq!(
            average_ranks(&[3.0, 1.0, 3.0, 2.0, 3.0]),
            [4.0, 1.0, 4.0, 2.0, 4.0]
        );
        // Pearson of [1..5] and those ranks: dy = [-2, -0.5, 1.5, -0.5, 1.5], Σdxdy = 7,
        // Σdy² = 9: rho = 7 / sqrt(90) = 0.7378647873726218.
        close(spearman(&x, &y), 7.0 / 90f64.sqrt());
        close(spearman(&x, &y), 0.737_864_787_372_621_8);
        // Monotone but not linear: Spearman 1, Pearson below 1.
        let cube: Vec<f64> = x.iter().map(|v| v * v * v).collect();
        close(spearman(&x, &cube), 1.0);
        assert!(pearson(&x, &cube) < 0.99);
        assert!(pearson(&x, &[1.0; 5]).is_nan());
        assert!(spearman(&x, &[1.0; 5]).is_nan());
        assert!(spearman(&x, &[1.0, f64::NAN, 2.0, 3.0, 4.0]).is_nan());
    }

    #[test]
    fn glue_metrics_keys_and_checks() {
        use GlueLabel::{Class, Score};
        let c = |v: &[usize]| v.iter().map(|&x| Class(x)).collect::<Vec<_>>();
        let m = glue_metrics(GlueTask::Cola, &c(&[1, 1, 1, 0]), &c(&[1, 0, 1, 1])).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["matthews_correlation"]);
        close(m["matthews_correlation"], -1.0 / 3.0);
        let m = glue_metrics(GlueTask::Qqp, &c(&[1, 1, 0]), &c(&[1, 0, 0])).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["accuracy", "f1"]);
        close(m["accuracy"], 2.0 / 3.0);
        close(m["f1"], 2.0 / 3.0);
        let m = glue_metrics(GlueTask::Mnli, &c(&[0, 1, 2, 2]), &c(&[0, 1, 2, 0])).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["accuracy"]);
        close(m["accuracy"], 0.75);
        let s = |v: &[f32]| v.iter().map(|&x| Score(x)).collect::<Vec<_>>();
        let m = glue_metrics(
            GlueTask::Stsb,
            &s(&[2.0, 4.0, 5.0, 4.0, 5.0]),
            &s(&[1.0, 2.0, 3.0, 4.0, 5.0]),
        )
        .unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["pearson", "spearmanr"]);
        close(m["pearson"], 6.0 / 60f64.sqrt());
        close(m["spearmanr"], 7.0 / 90f64.sqrt());
        for t in GlueTask::ALL {
            let labels = if t.is_regression() {
                s(&[1.0, 2.0])
            } else {
                c(&[0, 1])
            };
            let m = glue_metrics(t, &labels, &labels).unwrap();
            assert!(m.contains_key(t.main_metric()), "{t}");
        }

        let e = glue_metrics(GlueTask::Rte, &c(&[0, 1]), &c(&[0, 2])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rte metrics: prediction 1 is Class(2), expected a class id below 2"
        );
        let e = glue_metrics(GlueTask::Stsb, &s(&[1.0]), &c(&[1])).unwrap_err();
        assert!(e
            .to_string()
            .contains("prediction 0 is Class(1), expected a score"));
        assert!(glue_metrics(GlueTask::Sst2, &c(&[0, 1]), &c(&[0])).is_err());
        assert!(glue_metrics(GlueTask::Sst2, &[], &[]).is_err());
    }
}
