//! Reader for the GLUE tasks' original TSV files, reading them as the Hugging Face `glue`
//! dataset script does (`delimiter="\t"`, `quoting=csv.QUOTE_NONE`): fields are split on tabs
//! only, a `"` is text, CoLA's train and dev files have no header, QQP rows with missing
//! fields are dropped. Stricter than that script, the header must be exactly one of the task's
//! layouts, so a file of another task is refused at line 1 rather than misread.

use std::path::Path;

use super::layout::{describe, layouts};
use super::{GlueFile, GlueLabel, GlueRow, GlueTask};
use crate::error::{Error, IoContext, Result};

/// Reads `path` as a file of `task` (train, dev or test layout, found from the header).
///
/// Errors name the file and line: a header that is none of the task's layouts, a row with
/// the wrong number of fields, a label outside the task's set, an STS-B score that is not a
/// number in 0–5, a file without data rows. QQP rows with the wrong number of fields are
/// skipped and counted in [`GlueFile::skipped`], unless they are most of the file.
pub fn read_glue_tsv(task: GlueTask, path: &Path) -> Result<GlueFile> {
    let bytes = std::fs::read(path).at(path)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
        Error::format(path, format!("line {line}: not valid UTF-8"))
    })?;
    parse_glue_tsv(task, path, &text)
}

/// [`read_glue_tsv`] on the file's text; `path` only names it in errors.
pub(crate) fn parse_glue_tsv(task: GlueTask, path: &Path, text: &str) -> Result<GlueFile> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let Some(first) = lines.first() else {
        return Err(Error::format(path, "file is empty"));
    };
    let err = |line: usize, msg: String| Error::format(path, format!("line {line}: {msg}"));

    let header: Vec<&str> = first.split('\t').map(str::trim).collect();
    let all = layouts(task);
    let layout = all
        .iter()
        .find(|l| {
            l.header_row
                && header.len() == l.columns.len()
                && header
                    .iter()
                    .zip(l.columns)
                    .all(|(h, c)| h.eq_ignore_ascii_case(c))
        })
        .or_else(|| all.iter().find(|l| !l.header_row));
    let Some(layout) = layout else {
        let mut shown = header.join(", ");
        if let Some((cut, _)) = shown.char_indices().nth(80) {
            shown.truncate(cut);
            shown.push('…');
        }
        return Err(err(
            1,
            format!(
                "header `{shown}` is not a {task} file's: expected {}",
                describe(all)
            ),
        ));
    };

    let first_data = usize::from(layout.header_row);
    let mut rows = Vec::with_capacity(lines.len());
    let mut skipped = 0;
    for (index, raw) in lines[first_data..].iter().enumerate() {
        let line = first_data + index + 1;
        let fields: Vec<&str> = raw.split('\t').collect();
        if fields.len() != layout.columns.len() {
            if task == GlueTask::Qqp {
                skipped += 1;
                continue;
            }
            return Err(err(
                line,
                format!(
                    "expected {} tab-separated fields ({task} {}: {}), found {}",
                    layout.columns.len(),
                    layout.kind,
                    layout.columns.join(", "),
                    fields.len()
                ),
            ));
        }
        let label = match layout.label {
            Some(c) => Some(parse_label(task, fields[c].trim()).map_err(|m| err(line, m))?),
            None => None,
        };
        rows.push(GlueRow {
            index,
            line,
            text_a: fields[layout.text_a].to_string(),
            text_b: layout.text_b.map(|c| fields[c].to_string()),
            label,
        });
    }
    let total = rows.len() + skipped;
    if skipped * 2 > total {
        return Err(Error::format(
            path,
            format!(
                "{skipped} of {total} rows are malformed (not {} tab-separated fields: {}); \
                 is this a {task} file?",
                layout.columns.len(),
                layout.columns.join(", ")
            ),
        ));
    }
    if rows.is_empty() {
        return Err(Error::format(path, "no data rows"));
    }
    Ok(GlueFile { rows, skipped })
}

/// The label of one row in GLUE's numbering.
fn parse_label(task: GlueTask, field: &str) -> std::result::Result<GlueLabel, String> {
    match task {
        GlueTask::Stsb => {
            let score: f32 = field
                .parse()
                .ok()
                .filter(|s: &f32| s.is_finite())
                .ok_or_else(|| format!("score `{field}` is not a number"))?;
            if !(0.0..=5.0).contains(&score) {
                return Err(format!("score `{field}` is outside 0–5"));
            }
            Ok(GlueLabel::Score(score))
        }
        GlueTask::Cola | GlueTask::Sst2 | GlueTask::Mrpc | GlueTask::Qqp => match field {
            "0" => Ok(GlueLabel::Class(0)),
            "1" => Ok(GlueLabel::Class(1)),
            _ => Err(format!("label `{field}` is not 0 or 1")),
        },
        GlueTask::Mnli | GlueTask::Qnli | GlueTask::Rte => {
            let names = task.label_names();
            names
                .iter()
                .position(|n| *n == field)
                .map(GlueLabel::Class)
                .ok_or_else(|| {
                    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
                    format!("label `{field}` is not one of {}", quoted.join(", "))
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{MNLI_TRAIN_COLUMNS, STSB_COLUMNS};
    use super::*;

    fn parse(task: GlueTask, text: &str) -> Result<GlueFile> {
        parse_glue_tsv(task, Path::new("f.tsv"), text)
    }

    fn err(task: GlueTask, text: &str) -> String {
        parse(task, text).unwrap_err().to_string()
    }

    #[test]
    fn layouts_name_the_right_columns() {
        for task in GlueTask::ALL {
            for l in layouts(task) {
                let a = l.columns[l.text_a];
                assert!(a.contains("sentence") || a.contains("question") || a == "#1 String");
                assert_eq!(l.text_b.is_some(), task.is_pair(), "{task} {}", l.kind);
                if let Some(b) = l.text_b {
                    assert!(b > l.text_a);
                }
                if let Some(c) = l.label {
                    let name = l.columns[c];
                    assert!(
                        ["label", "Quality", "is_duplicate", "score", "gold_label"].contains(&name)
                    );
                }
            }
        }
    }

    #[test]
    fn crlf_bom_quotes_and_trailing_empty_lines() {
        let text = "\u{feff}index\tsentence1\tsentence2\tlabel\r\n\
                    0\tHe said \"no.\tA \"quoted\" one\"\tentailment\r\n\
                    1\tx\ty\tnot_entailment\r\n\r\n\r\n";
        let f = parse(GlueTask::Rte, text).unwrap();
        assert_eq!(f.skipped, 0);
        assert_eq!(f.rows.len(), 2);
        let r = &f.rows[0];
        assert_eq!((r.index, r.line), (0, 2));
        assert_eq!(r.text_a, "He said \"no.");
        assert_eq!(r.text_b.as_deref(), Some("A \"quoted\" one\""));
        assert_eq!(r.label, Some(GlueLabel::Class(0)));
        assert_eq!(f.rows[1].label, Some(GlueLabel::Class(1)));
        assert_eq!(f.rows[1].line, 3);
    }

    #[test]
    fn cola_with_and_without_header() {
        let f = parse(GlueTask::Cola, "gj04\t1\t\tOk.\ngj04\t0\t*\tBad it.\n").unwrap();
        assert_eq!(f.rows[1].text_a, "Bad it.");
        assert_eq!(f.rows[1].label, Some(GlueLabel::Class(0)));
        assert_eq!((f.rows[1].index, f.rows[1].line), (1, 2));
        let f = parse(GlueTask::Cola, "index\tsentence\n0\tOk.\n").unwrap();
        assert_eq!(f.rows[0].label, None);
        assert_eq!((f.rows[0].index, f.rows[0].line), (0, 2));
    }

    #[test]
    fn labels_in_glue_numbering() {
        let mnli = MNLI_TRAIN_COLUMNS.join("\t");
        let row = |l: &str| format!("0\t1\t2\tg\t(a)\t(b)\t(A)\t(B)\ta\tb\t{l}\t{l}");
        let text = [
            mnli,
            row("entailment"),
            row("neutral"),
            row("contradiction"),
        ]
        .join("\n");
        let labels: Vec<_> = parse(GlueTask::Mnli, &text)
            .unwrap()
            .rows
            .iter()
            .map(|r| r.label)
            .collect();
        assert_eq!(labels, [0, 1, 2].map(|c| Some(GlueLabel::Class(c))));
        let stsb = STSB_COLUMNS.join("\t") + "\n0\tg\tf\t2012\t1\tnone\tnone\ta\tb\t3.800\n";
        let f = parse(GlueTask::Stsb, &stsb).unwrap();
        assert_eq!(f.rows[0].label, Some(GlueLabel::Score(3.8)));
        assert_eq!(f.rows[0].text_b.as_deref(), Some("b"));
    }

    #[test]
    fn bad_labels_name_the_line() {
        let e = err(GlueTask::Sst2, "sentence\tlabel\na\t1\nb\t2\n");
        assert_eq!(e, "f.tsv: line 3: label `2` is not 0 or 1");
        let e = err(
            GlueTask::Qnli,
            "index\tquestion\tsentence\tlabel\n0\tq\ts\tneutral\n",
        );
        assert!(
            e.starts_with("f.tsv: line 2: label `neutral` is not one of `entailment`"),
            "{e}"
        );
        let head = STSB_COLUMNS.join("\t");
        for (score, why) in [
            ("high", "is not a number"),
            ("5.5", "is outside 0–5"),
            ("nan", "is not"),
        ] {
            let e = err(
                GlueTask::Stsb,
                &format!("{head}\n0\tg\tf\ty\t1\ts\ts\ta\tb\t{score}"),
            );
            assert!(
                e.starts_with(&format!("f.tsv: line 2: score `{score}` {why}")),
                "{e}"
            );
        }
    }

    #[test]
    fn wrong_layouts_are_refused_at_their_line() {
        // An SST-2 file given as RTE, a CoLA file given as MRPC: the header is refused.
        let e = err(GlueTask::Rte, "sentence\tlabel\nit 's fine\t1\n");
        assert!(
            e.starts_with("f.tsv: line 1: header `sentence, label` is not a rte file's"),
            "{e}"
        );
        assert!(
            e.contains("`index, sentence1, sentence2, label` (train/dev)"),
            "{e}"
        );
        let e = err(GlueTask::Mrpc, "gj04\t1\t\tOk.\n");
        assert!(
            e.starts_with("f.tsv: line 1: header `gj04, 1, , Ok.` is not a mrpc"),
            "{e}"
        );
        // An RTE file given as CoLA has no header CoLA knows, so its first line is data.
        let e = err(
            GlueTask::Cola,
            "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n",
        );
        assert_eq!(e, "f.tsv: line 1: label `sentence1` is not 0 or 1");
        let e = err(GlueTask::Cola, "sentence\tlabel\na\t1\n");
        assert!(
            e.starts_with(
                "f.tsv: line 1: expected 4 tab-separated fields (cola train/dev, no header: source"
            ),
            "{e}"
        );
        // A row with a missing field in a task other than QQP.
        let e = err(
            GlueTask::Rte,
            "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta b\tentailment\n",
        );
        assert!(
            e.starts_with("f.tsv: line 3: expected 4 tab-separated fields"),
            "{e}"
        );
        assert!(e.ends_with("found 3"), "{e}");
        assert_eq!(err(GlueTask::Rte, "\r\n\n"), "f.tsv: file is empty");
        assert_eq!(
            err(GlueTask::Rte, "index\tsentence1\tsentence2\tlabel\n"),
            "f.tsv: no data rows"
        );
    }

    #[test]
    fn qqp_skips_malformed_rows_unless_most_are() {
        let head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate";
        let good = "7\t1\t2\tWhy?\tHow?\t1";
        // A question with a line break splits one record into two malformed lines.
        let text = format!("{head}\n{good}\n8\t3\t4\tWhat is\nit?\t0\n{good}\n{good}\n{good}\n");
        let f = parse(GlueTask::Qqp, &text).unwrap();
        assert_eq!(f.skipped, 2);
        assert_eq!(
            f.rows.iter().map(|r| r.index).collect::<Vec<_>>(),
            [0, 3, 4, 5]
        );
        assert_eq!(f.rows[1].line, 5);
        let text = format!("{head}\n{good}\n1\t2\n3\n");
        let e = err(GlueTask::Qqp, &text);
        assert!(e.starts_with("f.tsv: 2 of 3 rows are malformed"), "{e}");
    }

    #[test]
    fn invalid_utf8_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.tsv");
        std::fs::write(&path, b"sentence\tlabel\nok\t1\nb\xff\t0\n").unwrap();
        let e = read_glue_tsv(GlueTask::Sst2, &path)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("bad.tsv: line 3: not valid UTF-8"), "{e}");
    }
}
