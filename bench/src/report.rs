//! The benchmark report: named figures, each with its unit and, where the project set one,
//! its target and verdict; printed as a table and written as JSON.
//!
//! In: [`Figure`]s from the benchmarks. Out: a table on stdout and `report.json`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// How a figure is compared with its target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cmp {
    AtLeast,
    AtMost,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Target {
    pub cmp: Cmp,
    pub bound: f64,
}

impl Target {
    pub fn at_least(bound: f64) -> Target {
        Target {
            cmp: Cmp::AtLeast,
            bound,
        }
    }
    pub fn at_most(bound: f64) -> Target {
        Target {
            cmp: Cmp::AtMost,
            bound,
        }
    }
    pub fn met_by(&self, value: f64) -> bool {
        match self.cmp {
            Cmp::AtLeast => value >= self.bound,
            Cmp::AtMost => value <= self.bound,
        }
    }
    fn describe(&self, unit: &str) -> String {
        let op = match self.cmp {
            Cmp::AtLeast => "≥",
            Cmp::AtMost => "≤",
        };
        format!("{op} {}{}", number(self.bound), unit_suffix(unit))
    }
}

/// Met, not met, or not measured (with the reason in the figure's note).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    NotMet,
    NotMeasured,
    /// A figure without a target.
    Info,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub bench: String,
    pub name: String,
    pub value: Option<f64>,
    pub unit: String,
    pub target: Option<Target>,
    pub verdict: Verdict,
    /// Why a figure is missing, or what qualifies it.
    pub note: String,
}

impl Figure {
    pub fn new(bench: &str, name: &str, value: Option<f64>, unit: &str) -> Figure {
        Figure {
            bench: bench.into(),
            name: name.into(),
            value,
            unit: unit.into(),
            target: None,
            verdict: Verdict::Info,
            note: String::new(),
        }
    }

    pub fn target(mut self, target: Target) -> Figure {
        self.target = Some(target);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        let note = note.into();
        if !note.is_empty() {
            if !self.note.is_empty() {
                self.note.push_str("; ");
            }
            self.note.push_str(&note);
        }
        self
    }

    /// Sets the verdict from the value and the target.
    fn judged(mut self) -> Figure {
        self.verdict = match (self.value, self.target) {
            (None, _) => Verdict::NotMeasured,
            (Some(_), None) => Verdict::Info,
            (Some(v), Some(t)) if t.met_by(v) => Verdict::Met,
            (Some(_), Some(_)) => Verdict::NotMet,
        };
        self
    }
}

/// Everything one invocation measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub started_unix_seconds: u64,
    pub command: String,
    pub machine: Machine,
    pub figures: Vec<Figure>,
    /// Benchmarks that could not run at all, with the reason.
    pub skipped: Vec<(String, String)>,
}

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
}

impl Report {
    pub fn add(&mut self, figure: Figure) {
        self.figures.push(figure.judged());
    }

    pub fn skip(&mut self, bench: &str, reason: impl Into<String>) {
        self.skipped.push((bench.into(), reason.into()));
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The table: one row per figure, then the skipped benchmarks.
    pub fn table(&self) -> String {
        let rows: Vec<[String; 5]> = self
            .figures
            .iter()
            .map(|f| {
                [
                    f.bench.clone(),
                    f.name.clone(),
                    match f.value {
                        Some(v) => format!("{}{}", number(v), unit_suffix(&f.unit)),
                        None => "—".into(),
                    },
                    f.target.map(|t| t.describe(&f.unit)).unwrap_or_default(),
                    match f.verdict {
                        Verdict::Met => "met".into(),
                        Verdict::NotMet => "NOT MET".into(),
                        Verdict::NotMeasured => "not measured".into(),
                        Verdict::Info => String::new(),
                    },
                ]
            })
            .collect();
        let header = ["bench", "figure", "value", "target", "verdict"];
        let mut widths = header.map(|h| h.chars().count());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String], note: &str| {
            for (c, w) in cells.iter().zip(widths) {
                let pad = w - c.chars().count();
                let _ = write!(out, "{c}{}  ", " ".repeat(pad));
            }
            let _ = writeln!(out, "{note}");
        };
        line(&mut out, &header.map(String::from), "note");
        for (r, f) in rows.iter().zip(&self.figures) {
            line(&mut out, r, &f.note);
        }
        for (bench, reason) in &self.skipped {
            let _ = writeln!(out, "{bench}: not run: {reason}");
        }
        out
    }
}

fn unit_suffix(unit: &str) -> String {
    match unit {
        "" => String::new(),
        "%" => "%".into(),
        u => format!(" {u}"),
    }
}

/// Human-readable numbers: thousands separated, few decimals.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let a = v.abs();
    let decimals = if a >= 1000.0 || v.fract() == 0.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 0.1 {
        3
    } else {
        4
    };
    let s = format!("{v:.decimals$}");
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_owned(), Some(f.to_owned())),
        None => (s, None),
    };
    let (sign, digits) = match int.strip_prefix('-') {
        Some(d) => ("-", d.to_owned()),
        None => ("", int),
    };
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_value_and_target() {
        let mut r = Report::default();
        r.add(Figure::new("b", "ratio", Some(0.98), "").target(Target::at_least(0.97)));
        r.add(Figure::new("b", "rss", Some(70.0), "MB").target(Target::at_most(64.0)));
        r.add(Figure::new("b", "drops", None, "").target(Target::at_most(0.0)));
        r.add(Figure::new("b", "rps", Some(1.0), "req/s"));
        r.add(Figure::new("b", "edge", Some(64.0), "MB").target(Target::at_most(64.0)));
        let v: Vec<Verdict> = r.figures.iter().map(|f| f.verdict).collect();
        assert_eq!(
            v,
            [
                Verdict::Met,
                Verdict::NotMet,
                Verdict::NotMeasured,
                Verdict::Info,
                Verdict::Met
            ]
        );
    }

    #[test]
    fn table_shows_value_target_verdict_and_note() {
        let mut r = Report::default();
        r.add(
            Figure::new("stitch", "exchanges/s", Some(312_345.6), "/s")
                .target(Target::at_least(300_000.0))
                .note("3-hop chains"),
        );
        r.skip("overhead", "h2load missing");
        let t = r.table();
        assert!(t.contains("312,346 /s"), "{t}");
        assert!(t.contains("≥ 300,000 /s"), "{t}");
        let row = t.lines().find(|l| l.starts_with("stitch")).unwrap();
        assert!(
            row.contains(" met ") && row.ends_with("3-hop chains"),
            "{t}"
        );
        assert!(t.contains("overhead: not run: h2load missing"), "{t}");
    }

    #[test]
    fn numbers_are_grouped_and_rounded() {
        assert_eq!(number(1234567.0), "1,234,567");
        assert_eq!(number(-1234.4), "-1,234");
        assert_eq!(number(0.9712), "0.971");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(0.01234), "0.0123");
        assert_eq!(number(100.0), "100");
    }

    #[test]
    fn json_round_trips_through_a_file() {
        let mut r = Report::default();
        r.add(Figure::new("x", "y", Some(1.5), "ms").target(Target::at_most(2.0)));
        let dir = std::env::temp_dir().join(format!("weft-bench-test-{}", std::process::id()));
        let path = dir.join("report.json");
        r.write_json(&path).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(v["figures"][0]["verdict"], "met");
        assert_eq!(v["figures"][0]["target"]["cmp"], "at_most");
        assert_eq!(v["figures"][0]["value"], 1.5);
    }
}
