//! Evaluation results: per-task accuracy, the `results.json` summary, the printed table and
//! the `predictions.jsonl` file.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, IoContext, Result};
use crate::eval::{Mode, Prediction, Task};
use crate::io::atomic;

pub const RESULTS_FILE: &str = "results.json";
pub const PREDICTIONS_FILE: &str = "predictions.jsonl";

/// Key of the macro average in `results.json`; no task may use it as its name.
pub const AVERAGE_KEY: &str = "average";

#[derive(Debug, Clone)]
pub struct TaskReport {
    pub task: String,
    pub mode: Mode,
    pub correct: usize,
    pub total: usize,
    pub seconds: f64,
    pub predictions: Vec<Prediction>,
}

impl TaskReport {
    pub fn new(task: &Task, mode: Mode, predictions: Vec<Prediction>, seconds: f64) -> Self {
        TaskReport {
            task: task.name.clone(),
            mode,
            correct: predictions.iter().filter(|p| p.correct).count(),
            total: predictions.len(),
            seconds,
            predictions,
        }
    }

    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    pub fn examples_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.total as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Unweighted mean of the task accuracies (how the LoRA-Dash paper averages its tasks).
pub fn average(reports: &[TaskReport]) -> f64 {
    if reports.is_empty() {
        return 0.0;
    }
    reports.iter().map(TaskReport::accuracy).sum::<f64>() / reports.len() as f64
}

/// `{task: {accuracy, correct, total, mode, examples_per_s}, ..., "average": mean accuracy}`.
pub fn results_json(reports: &[TaskReport]) -> Value {
    let mut m = Map::new();
    for r in reports {
        m.insert(
            r.task.clone(),
            json!({
                "accuracy": r.accuracy(),
                "correct": r.correct,
                "total": r.total,
                "mode": r.mode.name(),
                "examples_per_s": r.examples_per_s(),
            }),
        );
    }
    m.insert(AVERAGE_KEY.into(), json!(average(reports)));
    Value::Object(m)
}

/// The human-readable summary: one row per task, then the average.
pub fn table(reports: &[TaskReport]) -> String {
    let w = reports
        .iter()
        .map(|r| r.task.len())
        .chain([AVERAGE_KEY.len(), 4])
        .max()
        .unwrap_or(8);
    let mut s = format!(
        "{:<w$}  {:<10}  {:>7}  {:>6}  {:>8}  {:>7}\n",
        "task", "mode", "correct", "total", "accuracy", "ex/s"
    );
    for r in reports {
        s += &format!(
            "{:<w$}  {:<10}  {:>7}  {:>6}  {:>7.2}%  {:>7.2}\n",
            r.task,
            r.mode.name(),
            r.correct,
            r.total,
            100.0 * r.accuracy(),
            r.examples_per_s()
        );
    }
    s += &format!(
        "{:<w$}  {:<10}  {:>7}  {:>6}  {:>7.2}%\n",
        AVERAGE_KEY,
        "",
        "",
        "",
        100.0 * average(reports)
    );
    s
}

/// Writes `predictions.jsonl` (one object per record, with its `task`) and `results.json`.
pub fn write_outputs(dir: &Path, reports: &[TaskReport]) -> Result<()> {
    let path = dir.join(PREDICTIONS_FILE);
    atomic::write_with(&path, |tmp| {
        let f = std::fs::File::create(tmp).at(tmp)?;
        let mut w = std::io::BufWriter::new(f);
        for p in reports.iter().flat_map(|r| &r.predictions) {
            serde_json::to_writer(&mut w, p)?;
            w.write_all(b"\n").at(tmp)?;
        }
        w.flush().at(tmp)
    })?;
    let json = serde_json::to_string_pretty(&results_json(reports))?;
    atomic::write_file(&dir.join(RESULTS_FILE), json.as_bytes())
}

/// Task names must be distinct and must not collide with the average's key.
pub fn check_names<'a>(names: impl IntoIterator<Item = (&'a str, &'a Path)>) -> Result<()> {
    let mut seen: Vec<(&str, &Path)> = Vec::new();
    for (n, p) in names {
        if n == AVERAGE_KEY {
            return Err(Error::format(
                p,
                format!("task name `{n}` is reserved for the average; rename the file"),
            ));
        }
        if let Some((_, q)) = seen.iter().find(|(m, _)| *m == n) {
            return Err(Error::format(
                p,
                format!(
                    "task name `{n}` is also the name of {}; give the files distinct names",
                    q.display()
                ),
            ));
        }
        seen.push((n, p));
    }
    Ok(())
}
