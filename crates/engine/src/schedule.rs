//! Time grids in the engine frame: s_0 = 0 (noise) < s_1 < ... < s_K = 1 (data).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, Result};

/// How to build the grid; `Explicit` holds a stored list such as a BOSS schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum ScheduleSpec {
    Uniform,
    /// The SD3/Flux time shift: noise level sigma = 1 - s is mapped to shift*sigma / (1 + (shift-1)*sigma).
    Shift(f64),
    Explicit(Vec<f64>),
    /// A schedule stored in the model directory, referred to by its name.
    Named {
        name: String,
        points: Vec<f64>,
    },
}

/// Where a schedule's text may come from besides "uniform", "shift:X" and inline lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleAccess {
    /// Names of the model's stored schedules (what untrusted clients get).
    Named,
    /// Names, and files on this machine (the CLI).
    NamedAndFiles,
}

impl ScheduleSpec {
    /// "uniform", "shift:3.0", or a path to a file listing the s values (JSON array or whitespace/comma separated).
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("uniform") {
            return Ok(ScheduleSpec::Uniform);
        }
        if let Some(value) = text.strip_prefix("shift:") {
            let shift: f64 = value
                .trim()
                .parse()
                .map_err(|_| Error::invalid("schedule", format!("shift {value:?} is not a number")))?;
            if !(shift.is_finite() && shift > 0.0) {
                return Err(Error::invalid("schedule", format!("shift must be a positive number, got {shift}")));
            }
            return Ok(ScheduleSpec::Shift(shift));
        }
        let path = Path::new(text);
        if path.is_file() {
            return Ok(ScheduleSpec::Explicit(Self::read_file(path)?));
        }
        Err(Error::invalid(
            "schedule",
            format!("{text:?} is not \"uniform\", \"shift:X\" or an existing file of s values"),
        ))
    }

    /// Resolve `text`: "uniform", "shift:X", an inline list "0,0.3,1", the name of one of
    /// `stored` (the model's schedules), or with `NamedAndFiles` a file of s values.
    pub fn resolve(text: &str, stored: &BTreeMap<String, Vec<f64>>, access: ScheduleAccess) -> Result<Self> {
        let text = text.trim();
        if let Some(points) = stored.get(text) {
            return Ok(ScheduleSpec::Named { name: text.to_string(), points: points.clone() });
        }
        if access == ScheduleAccess::NamedAndFiles && Path::new(text).is_file() {
            return Ok(ScheduleSpec::Explicit(Self::read_file(Path::new(text))?));
        }
        let number_first = text.starts_with(|c: char| c == '[' || c.is_ascii_digit())
            || text.strip_prefix('.').is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
        if text.eq_ignore_ascii_case("uniform") || text.starts_with("shift:") || number_first {
            return Self::parse_inline(text);
        }
        let names = if stored.is_empty() {
            "this model stores no schedules".to_string()
        } else {
            format!("this model stores {}", stored.keys().cloned().collect::<Vec<_>>().join(", "))
        };
        let files = if access == ScheduleAccess::NamedAndFiles { ", an existing file" } else { "" };
        Err(Error::invalid(
            "schedule",
            format!("{text:?} is not \"uniform\", \"shift:X\", a list like \"0,0.5,1\"{files} or a stored schedule ({names})"),
        ))
    }

    /// The validated s values of a schedule file (JSON array, or whitespace/comma separated).
    pub fn read_file(path: &Path) -> Result<Vec<f64>> {
        let content = std::fs::read_to_string(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
        let values = parse_list(&content)?;
        validate_explicit(&values)?;
        Ok(values)
    }

    /// Steps this schedule fixes by itself (explicit and stored lists).
    pub fn own_steps(&self) -> Option<usize> {
        match self {
            ScheduleSpec::Explicit(points) | ScheduleSpec::Named { points, .. } => Some(points.len() - 1),
            ScheduleSpec::Uniform | ScheduleSpec::Shift(_) => None,
        }
    }

    /// Like `parse`, but never reads a file: "uniform", "shift:X" or an inline list "0,0.3,1" /
    /// "[0, 0.3, 1]". For text from untrusted clients.
    pub fn parse_inline(text: &str) -> Result<Self> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("uniform") || text.starts_with("shift:") {
            return Self::parse(text);
        }
        if text.starts_with(|c: char| c == '[' || c.is_ascii_digit() || c == '.') {
            let values = parse_list(text)?;
            validate_explicit(&values)?;
            return Ok(ScheduleSpec::Explicit(values));
        }
        Err(Error::invalid("schedule", format!("{text:?} is not \"uniform\", \"shift:X\" or a list like \"0,0.5,1\"")))
    }

    /// Text that `resolve` (with the same model's schedules) turns back into this schedule.
    pub fn canonical(&self) -> String {
        match self {
            ScheduleSpec::Explicit(values) => values.iter().map(f64::to_string).collect::<Vec<_>>().join(","),
            ScheduleSpec::Named { name, .. } => name.clone(),
            other => other.to_string(),
        }
    }

    /// The grid for `steps` steps (K + 1 points). An explicit list fixes its own step count.
    pub fn build(&self, steps: usize) -> Result<Schedule> {
        match self {
            ScheduleSpec::Uniform | ScheduleSpec::Shift(_) if steps == 0 => {
                Err(Error::invalid("steps", "must be at least 1"))
            }
            ScheduleSpec::Uniform => Ok(Schedule(uniform(steps))),
            ScheduleSpec::Shift(shift) => {
                let s = uniform(steps)
                    .into_iter()
                    .map(|s| {
                        let sigma = 1.0 - s;
                        1.0 - shift * sigma / (1.0 + (shift - 1.0) * sigma)
                    })
                    .collect();
                Schedule::explicit(s)
            }
            ScheduleSpec::Explicit(values) | ScheduleSpec::Named { points: values, .. } => {
                if steps != 0 && steps != values.len() - 1 {
                    return Err(Error::invalid(
                        "steps",
                        format!("the explicit schedule has {} steps, but {steps} were requested", values.len() - 1),
                    ));
                }
                Schedule::explicit(values.clone())
            }
        }
    }
}

impl FromStr for ScheduleSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ScheduleSpec::parse(s)
    }
}

impl fmt::Display for ScheduleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleSpec::Uniform => write!(f, "uniform"),
            ScheduleSpec::Shift(x) => write!(f, "shift:{x}"),
            ScheduleSpec::Explicit(v) => write!(f, "explicit:{}", v.len().saturating_sub(1)),
            ScheduleSpec::Named { name, .. } => f.write_str(name),
        }
    }
}

fn uniform(steps: usize) -> Vec<f64> {
    (0..=steps).map(|i| i as f64 / steps as f64).collect()
}

fn parse_list(content: &str) -> Result<Vec<f64>> {
    let trimmed = content.trim();
    if trimmed.starts_with('[') {
        return serde_json::from_str::<Vec<f64>>(trimmed)
            .map_err(|e| Error::invalid("schedule", format!("not a JSON array of numbers: {e}")));
    }
    trimmed
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<f64>().map_err(|_| Error::invalid("schedule", format!("{t:?} is not a number"))))
        .collect()
}

fn validate_explicit(values: &[f64]) -> Result<()> {
    if values.len() < 2 {
        return Err(Error::invalid("schedule", format!("needs at least 2 points (0 and 1), got {}", values.len())));
    }
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(Error::invalid("schedule", format!("{v} is not a finite number")));
    }
    const TOL: f64 = 1e-9;
    if values[0].abs() > TOL {
        return Err(Error::invalid("schedule", format!("must start at 0 (noise), starts at {}", values[0])));
    }
    let last = values[values.len() - 1];
    if (last - 1.0).abs() > TOL {
        return Err(Error::invalid("schedule", format!("must end at 1 (data), ends at {last}")));
    }
    if let Some(i) = values.windows(2).position(|w| w[1] <= w[0]) {
        return Err(Error::invalid(
            "schedule",
            format!(
                "must be strictly increasing: s[{}] = {} is not above s[{i}] = {}",
                i + 1,
                values[i + 1],
                values[i]
            ),
        ));
    }
    Ok(())
}

/// A validated grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule(Vec<f64>);

impl Schedule {
    pub fn explicit(values: Vec<f64>) -> Result<Self> {
        validate_explicit(&values)?;
        let mut values = values;
        // Pin the ends exactly so solvers land on s = 1.
        values[0] = 0.0;
        let n = values.len();
        values[n - 1] = 1.0;
        Ok(Schedule(values))
    }

    pub fn uniform(steps: usize) -> Result<Self> {
        ScheduleSpec::Uniform.build(steps)
    }

    pub fn points(&self) -> &[f64] {
        &self.0
    }

    pub fn steps(&self) -> usize {
        self.0.len() - 1
    }

    pub fn intervals(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.0.windows(2).map(|w| (w[0], w[1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_and_shift_grids() {
        assert_eq!(Schedule::uniform(4).unwrap().points(), &[0.0, 0.25, 0.5, 0.75, 1.0]);
        let shifted = ScheduleSpec::Shift(3.0).build(4).unwrap();
        let p = shifted.points();
        assert_eq!((p[0], p[4]), (0.0, 1.0));
        // shift > 1 spends more steps at high noise: the first step is smaller than uniform.
        assert!(p[1] < 0.25, "{p:?}");
        // sigma = 0.5 -> 3*0.5/(1+2*0.5) = 0.75 -> s = 0.25
        assert!((p[2] - 0.25).abs() < 1e-12);
        assert_eq!(ScheduleSpec::Shift(1.0).build(4).unwrap(), Schedule::uniform(4).unwrap());
    }

    #[test]
    fn invalid_schedules_are_rejected_with_reason() {
        let msg = |v: Vec<f64>| Schedule::explicit(v).unwrap_err().to_string();
        assert!(msg(vec![0.1, 0.5, 1.0]).contains("start at 0"));
        assert!(msg(vec![0.0, 0.5, 0.9]).contains("end at 1"));
        assert!(msg(vec![0.0, 0.6, 0.5, 1.0]).contains("strictly increasing"));
        assert!(msg(vec![0.0, 0.5, 0.5, 1.0]).contains("strictly increasing"));
        assert!(msg(vec![0.0]).contains("at least 2"));
        assert!(msg(vec![0.0, f64::NAN, 1.0]).contains("finite"));
        assert!(ScheduleSpec::parse("shift:-1").unwrap_err().to_string().contains("positive"));
        assert!(ScheduleSpec::parse("cosine").unwrap_err().to_string().contains("schedule"));
        assert!(ScheduleSpec::Uniform.build(0).unwrap_err().to_string().contains("steps"));
    }

    #[test]
    fn stored_schedules_resolve_by_name_and_files_only_when_allowed() {
        let stored = BTreeMap::from([("boss-2".to_string(), vec![0.0, 0.3, 1.0])]);
        let named = ScheduleSpec::resolve("boss-2", &stored, ScheduleAccess::Named).unwrap();
        assert_eq!(named, ScheduleSpec::Named { name: "boss-2".into(), points: vec![0.0, 0.3, 1.0] });
        assert_eq!(named.canonical(), "boss-2");
        assert_eq!(ScheduleSpec::resolve(&named.canonical(), &stored, ScheduleAccess::Named).unwrap(), named);
        assert_eq!(named.build(0).unwrap().points(), &[0.0, 0.3, 1.0]);
        assert_eq!(named.own_steps(), Some(2));
        for text in ["uniform", "shift:3", "0,0.25,1"] {
            let spec = ScheduleSpec::resolve(text, &stored, ScheduleAccess::Named).unwrap();
            assert_eq!(ScheduleSpec::resolve(&spec.canonical(), &stored, ScheduleAccess::Named).unwrap(), spec);
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.json");
        std::fs::write(&file, "[0, 0.5, 1]").unwrap();
        let path = file.to_str().unwrap();
        let err = ScheduleSpec::resolve(path, &stored, ScheduleAccess::Named).unwrap_err().to_string();
        assert!(err.contains("boss-2") && err.contains("schedule"), "{err}");
        let from_file = ScheduleSpec::resolve(path, &stored, ScheduleAccess::NamedAndFiles).unwrap();
        assert_eq!(from_file, ScheduleSpec::Explicit(vec![0.0, 0.5, 1.0]));
        assert!(ScheduleSpec::resolve("../etc/passwd", &stored, ScheduleAccess::Named).is_err());
    }

    #[test]
    fn explicit_schedule_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("boss8.json");
        std::fs::write(&json, "[0.0, 0.02, 0.07, 0.18, 0.35, 0.56, 0.76, 0.92, 1.0]").unwrap();
        let spec = ScheduleSpec::parse(json.to_str().unwrap()).unwrap();
        assert_eq!(spec.build(0).unwrap().steps(), 8);
        assert_eq!(spec.build(8).unwrap().steps(), 8);
        assert!(spec.build(4).is_err());
        let txt = dir.path().join("s.txt");
        std::fs::write(&txt, "0 0.5\n1").unwrap();
        assert_eq!(ScheduleSpec::parse(txt.to_str().unwrap()).unwrap().build(0).unwrap().points(), &[0.0, 0.5, 1.0]);
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "0 0.7 0.3 1").unwrap();
        assert!(ScheduleSpec::parse(bad.to_str().unwrap()).is_err());
    }
}
