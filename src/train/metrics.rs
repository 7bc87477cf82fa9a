//! The training metrics log: one JSON object per line (`metrics.jsonl`), written and flushed
//! record by record so a crash loses at most the line being written. On resume the log is cut
//! back to the checkpoint's step, so replayed steps are not logged twice.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, IoContext, Result};

/// One line of the log. `loss` is the mean training loss over the logged steps; fields the
/// trainer adds beyond these (e.g. `epoch`) are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MetricRecord {
    pub step: usize,
    /// JSON has no NaN: a non-finite loss is written as `null` and read back as NaN.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// An open, append-only metrics file.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Starts a new log, replacing any file at `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path).at(path)?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Reopens the log of a resumed run: keeps the lines with `step <= resume_step` (verbatim),
    /// drops a torn last line, and appends after them. A missing file starts a new log.
    pub fn resume(path: &Path, resume_step: usize) -> Result<Self> {
        if !path.exists() {
            return Self::create(path);
        }
        let text = std::fs::read_to_string(path).at(path)?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut kept = String::new();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<MetricRecord>(line) {
                Ok(r) if r.step <= resume_step => {
                    kept.push_str(line);
                    kept.push('\n');
                }
                Ok(_) => {}
                // Only the final line can be cut short by an interrupted write.
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
                Err(e) => return Err(line_err(path, i, e)),
            }
        }
        crate::io::atomic::write_file(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .at(path)?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a single write and flushes it to the OS.
    pub fn append(&mut self, rec: &MetricRecord) -> Result<()> {
        let mut line = serde_json::to_string(rec)?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).at(&self.path)?;
        self.file.flush().at(&self.path)
    }
}

/// Every record of a metrics file, in order.
pub fn read_records(path: &Path) -> Result<Vec<MetricRecord>> {
    let text = std::fs::read_to_string(path).at(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| line_err(path, i, e)))
        .collect()
}

fn line_err(path: &Path, index: usize, e: serde_json::Error) -> Error {
    Error::Record {
        path: path.to_path_buf(),
        index,
        msg: format!("invalid metrics line: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: usize, loss: f64) -> MetricRecord {
        MetricRecord {
            step,
            loss,
            lr: 1e-4,
            tokens_per_s: 1000.0,
            ..Default::default()
        }
    }

    #[test]
    fn append_read_and_resume_truncates() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&p).unwrap();
        for s in 1..=6 {
            let mut r = rec(s * 10, 3.0 / s as f64);
            if s % 2 == 0 {
                r.val_loss = Some(2.0);
                r.extra.insert("epoch".into(), Value::from(0.5 * s as f64));
            }
            log.append(&r).unwrap();
            // Flushed every record: the file already holds it.
            assert_eq!(read_records(&p).unwrap().len(), s);
        }
        drop(log);
        let all = read_records(&p).unwrap();
        assert_eq!(all[1].val_loss, Some(2.0));
        assert_eq!(all[1].extra.get("epoch"), Some(&Value::from(1.0)));
        assert_eq!(all[0].grad_norm, None);

        // Torn last line from a crash, then resume at step 30.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"step\":70,\"lo")
            .unwrap();
        let mut log = MetricsLog::resume(&p, 30).unwrap();
        log.append(&rec(40, f64::NAN)).unwrap();
        let after = read_records(&p).unwrap();
        let steps: Vec<usize> = after.iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![10, 20, 30, 40]);
        assert_eq!(after[1], all[1], "kept records are unchanged");
        assert!(after[3].loss.is_nan());

        // A corrupt line in the middle is an error naming the line.
        std::fs::write(&p, "{\"step\":1,\"loss\":1,\"lr\":0,\"tokens_per_s\":0}\nnot json\n{\"step\":2,\"loss\":1,\"lr\":0,\"tokens_per_s\":0}\n").unwrap();
        assert!(matches!(
            MetricsLog::resume(&p, 5),
            Err(Error::Record { index: 1, .. })
        ));
        // Resuming without a file starts one.
        let q = d.path().join("new.jsonl");
        MetricsLog::resume(&q, 3).unwrap();
        assert!(read_records(&q).unwrap().is_empty());
    }
}
