//! `flowgen bench samplers`: every fixed-step sampler family at equal network-evaluation budgets,
//! on uniform, shifted and stored (BOSS) schedules, all from one noise set, against a tight
//! Dormand-Prince reference: quality (FD ratio, accuracy, RMSE to the reference), cost (NFE,
//! network GFLOPs) and speed (ms per image alone and in batches).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use flowgen_engine::{Guidance, Sampler, ScheduleSpec};
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::evaluate::EvalResult;
use crate::plot::{line_plot, PlotSpec, Series};

/// The network-evaluation budgets compared by default.
pub const DEFAULT_BUDGETS: [usize; 7] = [1, 2, 4, 6, 8, 16, 32];

/// How a fixed-step run places its steps.
#[derive(Debug, Clone, PartialEq)]
pub enum ScheduleChoice {
    Uniform,
    Shift(f64),
    /// The model's stored schedule `PREFIX-K` for a run of K steps (BOSS: `boss`); runs whose
    /// step count has none are left out.
    Stored(String),
}

impl ScheduleChoice {
    /// How tables and plots name the choice.
    pub fn label(&self) -> String {
        match self {
            ScheduleChoice::Uniform => "uniform".into(),
            ScheduleChoice::Shift(x) => ScheduleSpec::Shift(*x).canonical(),
            ScheduleChoice::Stored(prefix) => prefix.clone(),
        }
    }

    /// "uniform", "shift:X", or the prefix of stored schedules ("boss").
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("uniform") {
            return Ok(ScheduleChoice::Uniform);
        }
        if text.starts_with("shift:") {
            return match ScheduleSpec::parse_inline(text)? {
                ScheduleSpec::Shift(x) => Ok(ScheduleChoice::Shift(x)),
                _ => Err(TrainError::invalid("schedules", format!("{text:?} is not shift:X"))),
            };
        }
        if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Ok(ScheduleChoice::Stored(text.to_string()));
        }
        Err(TrainError::invalid(
            "schedules",
            format!("{text:?} is not uniform, shift:X or the prefix of stored schedules (e.g. boss)"),
        ))
    }

    fn spec(&self, steps: usize, stored: &BTreeMap<String, Vec<f64>>) -> Option<ScheduleSpec> {
        match self {
            ScheduleChoice::Uniform => Some(ScheduleSpec::Uniform),
            ScheduleChoice::Shift(x) => Some(ScheduleSpec::Shift(*x)),
            ScheduleChoice::Stored(prefix) => {
                let name = format!("{prefix}-{steps}");
                let points = stored.get(&name)?;
                (points.len() == steps + 1).then(|| ScheduleSpec::Named { name, points: points.clone() })
            }
        }
    }
}

/// One sampler run of the benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRun {
    pub sampler: Sampler,
    /// 0 for the adaptive reference.
    pub steps: usize,
    pub schedule: ScheduleSpec,
    /// The schedule choice it came from ("uniform", "shift:2", "boss"), for grouping.
    pub group: String,
    /// Network evaluations per image the run is meant to cost (None for the adaptive reference).
    pub budget: Option<usize>,
}

/// Every (fixed-step sampler, schedule, budget) whose step count spends exactly the budget, in
/// that order, then the adaptive samplers (Dormand-Prince) once each: the reference.
pub fn plan_runs(
    budgets: &[usize],
    samplers: &[Sampler],
    schedules: &[ScheduleChoice],
    stored: &BTreeMap<String, Vec<f64>>,
) -> Vec<BenchRun> {
    let mut runs = Vec::new();
    for sampler in samplers.iter().filter(|s| !s.is_adaptive()) {
        for choice in schedules {
            // A plan that fixes its own steps (FlowTurbo) runs once, at its own cost.
            if let Some(steps) = sampler.own_steps() {
                if let Some(schedule) = choice.spec(steps, stored) {
                    let (group, budget) = (choice.label(), sampler.nfe_for(steps));
                    runs.push(BenchRun { sampler: sampler.clone(), steps, schedule, group, budget });
                }
                continue;
            }
            for &budget in budgets {
                let Some(steps) = (1..=budget).find(|&k| sampler.nfe_for(k) == Some(budget)) else { continue };
                if let Some(schedule) = choice.spec(steps, stored) {
                    let group = choice.label();
                    runs.push(BenchRun { sampler: sampler.clone(), steps, schedule, group, budget: Some(budget) });
                }
            }
        }
    }
    for sampler in samplers.iter().filter(|s| s.is_adaptive()) {
        let group = "adaptive".to_string();
        runs.push(BenchRun {
            sampler: sampler.clone(),
            steps: 0,
            schedule: ScheduleSpec::Uniform,
            group,
            budget: None,
        });
    }
    runs
}

/// Network FLOPs per image of a solve that spent `nfe` evaluations: a guided evaluation runs the
/// network twice (conditional and unconditional), and counts as two forwards whenever guidance is
/// on; with a guidance interval narrower than [0, 1] that is an upper bound.
pub fn gflops_per_image(forward_flops: f64, nfe: f64, guidance: &Guidance) -> f64 {
    let forwards = if guidance.scale != 1.0 { 2.0 } else { 1.0 };
    forward_flops * nfe * forwards / 1e9
}

/// Which points are on the Pareto front of (cost, loss), both lower-is-better: no other point
/// is at least as good in both and better in one.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<bool> {
    points
        .iter()
        .map(|&(c, l)| {
            c.is_finite() && l.is_finite() && !points.iter().any(|&(c2, l2)| c2 <= c && l2 <= l && (c2 < c || l2 < l))
        })
        .collect()
}

/// Measured f32 matrix-multiply throughput of `device` in GFLOP/s (1024 x 1024 x 1024, best of
/// five after a warm-up), recorded with the results so timings from two machines compare.
pub fn gemm_gflops(device: &Device) -> Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    a.matmul(&b)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        // Reading one number back waits for the device to finish.
        a.matmul(&b)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// One row of the benchmark's table.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    #[serde(flatten)]
    pub eval: EvalResult,
    /// The schedule choice of the run ("uniform", "shift:2", "boss"; "adaptive" for the reference).
    pub group: String,
    pub budget: Option<usize>,
    /// Evaluations per image of auxiliary networks (FlowTurbo's refiner), by name.
    pub auxiliary_evaluations: BTreeMap<String, f64>,
    pub gflops_per_image: f64,
    /// Solving one image at a time.
    pub ms_per_image_alone: f64,
    /// Solving `batch` images at a time (the quality run's full batches after the first).
    pub ms_per_image_batched: f64,
    /// On the Pareto front of (ms per image batched, FD ratio).
    pub pareto: bool,
}

/// What the tables say about how the numbers were taken.
#[derive(Debug, Clone, Serialize)]
pub struct BenchSetup {
    pub model: String,
    pub n: usize,
    pub seed: u64,
    pub batch: usize,
    pub alone_images: usize,
    pub guidance: f64,
    pub guidance_interval: (f64, f64),
    pub fd_floor: f64,
    pub fd_autoencoder_floor: Option<f64>,
    pub gemm_gflops: f64,
    pub forward_gflops: f64,
    pub device: String,
}

/// Mark the Pareto front of (ms per image batched, FD ratio) among `rows`.
pub fn mark_pareto(rows: &mut [BenchRow]) {
    let points: Vec<(f64, f64)> = rows.iter().map(|r| (r.ms_per_image_batched, r.eval.fd_ratio)).collect();
    for (row, on) in rows.iter_mut().zip(pareto_front(&points)) {
        row.pareto = on;
    }
}

fn steps_text(row: &BenchRow) -> String {
    if row.eval.steps == 0 {
        "adaptive".into()
    } else {
        row.eval.steps.to_string()
    }
}

pub fn to_markdown(setup: &BenchSetup, rows: &[BenchRow]) -> String {
    let mut md = format!(
        "{} images per run (labels 0-9 in turn, seeds {}..), one noise set for every sampler; guidance {} on s in [{}, {}].\n\
         FD floor (real train vs val digits, n = {}): {:.3}{}. Timings exclude a warm-up; batched = {} images per solve.\n\
         Device {}: measured f32 GEMM {:.1} GFLOP/s; one network forward {:.4} GFLOPs per image.\n\n",
        setup.n,
        setup.seed,
        setup.guidance,
        setup.guidance_interval.0,
        setup.guidance_interval.1,
        setup.n,
        setup.fd_floor,
        setup.fd_autoencoder_floor.map_or(String::new(), |f| format!(" (through the autoencoder: {f:.3})")),
        setup.batch,
        setup.device,
        setup.gemm_gflops,
        setup.forward_gflops,
    );
    md.push_str(
        "| sampler | schedule | steps | NFE | other evaluations | GFLOPs/image | FD ratio | accuracy | RMSE vs ref | ms/image alone | ms/image batched | Pareto |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {:.3} | {:.2} | {:.1}% | {} | {:.2} | {:.2} | {} |\n",
            r.eval.sampler,
            r.eval.schedule,
            steps_text(r),
            r.eval.nfe_per_image,
            other_evaluations(r),
            r.gflops_per_image,
            r.eval.fd_ratio,
            100.0 * r.eval.accuracy,
            r.eval.rmse_vs_reference.map_or("-".into(), |e| format!("{e:.4}")),
            r.ms_per_image_alone,
            r.ms_per_image_batched,
            if r.pareto { "*" } else { "" }
        ));
    }
    md
}

/// "refiner 4" for the auxiliary networks a run called, "-" when none.
fn other_evaluations(row: &BenchRow) -> String {
    if row.auxiliary_evaluations.is_empty() {
        return "-".into();
    }
    row.auxiliary_evaluations.iter().map(|(name, n)| format!("{name} {n}")).collect::<Vec<_>>().join(", ")
}

fn csv_field(text: &str) -> String {
    if text.contains(',') || text.contains('"') {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

pub fn to_csv(rows: &[BenchRow]) -> String {
    let mut csv = String::from(
        "sampler,schedule,steps,budget,nfe_per_image,other_evaluations,gflops_per_image,fd,fd_floor,fd_ratio,accuracy,rmse_vs_reference,ms_per_image_alone,ms_per_image_batched,pareto\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            csv_field(&r.eval.sampler),
            csv_field(&r.eval.schedule),
            r.eval.steps,
            r.budget.map_or(String::new(), |b| b.to_string()),
            r.eval.nfe_per_image,
            csv_field(&other_evaluations(r)),
            r.gflops_per_image,
            r.eval.fd,
            r.eval.fd_floor,
            r.eval.fd_ratio,
            r.eval.accuracy,
            r.eval.rmse_vs_reference.map_or(String::new(), |e| e.to_string()),
            r.ms_per_image_alone,
            r.ms_per_image_batched,
            r.pareto
        ));
    }
    csv
}

/// A file-name-safe form of a schedule group ("shift:2" -> "shift-2").
fn file_part(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect()
}

fn family(row: &BenchRow) -> &str {
    row.eval.sampler.split(':').next().unwrap_or(&row.eval.sampler)
}

/// `samplers_fd_vs_nfe_GROUP.png` for each schedule group (one line per sampler family, the
/// reference as a point), and `samplers_fd_vs_ms.png` (every run against its batched time, one
/// colour per family, the Pareto front drawn through its points). Returns the files written.
pub fn plot(rows: &[BenchRow], dir: &Path) -> Result<Vec<String>> {
    let mut families: Vec<&str> = Vec::new();
    let mut groups: Vec<&str> = Vec::new();
    for r in rows {
        if !families.contains(&family(r)) {
            families.push(family(r));
        }
        if r.budget.is_some() && !groups.contains(&r.group.as_str()) {
            groups.push(&r.group);
        }
    }
    let reference: Vec<&BenchRow> = rows.iter().filter(|r| r.budget.is_none()).collect();
    let mut written = Vec::new();
    for group in &groups {
        let mut series: Vec<Series> = families
            .iter()
            .filter(|f| reference.iter().all(|r| family(r) != **f))
            .map(|f| {
                let mut points: Vec<(f64, f64)> = rows
                    .iter()
                    .filter(|r| family(r) == *f && r.group == *group)
                    .map(|r| (r.eval.nfe_per_image, r.eval.fd_ratio))
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series::line(*f, points)
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        for r in &reference {
            series.push(Series::scatter(
                format!("{} (reference)", family(r)),
                vec![(r.eval.nfe_per_image, r.eval.fd_ratio)],
            ));
        }
        let file = format!("samplers_fd_vs_nfe_{}.png", file_part(group));
        let title = format!("FD / real-data floor vs network evaluations, {group} schedules");
        let spec = PlotSpec { title: &title, x_label: "NFE per image", y_label: "FD ratio", log_x: true, log_y: true };
        line_plot(&dir.join(&file), &spec, &series)?;
        written.push(file);
    }
    let mut front: Vec<(f64, f64)> =
        rows.iter().filter(|r| r.pareto).map(|r| (r.ms_per_image_batched, r.eval.fd_ratio)).collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut by_time = vec![Series::line("Pareto front", front)];
    for f in &families {
        let points =
            rows.iter().filter(|r| family(r) == *f).map(|r| (r.ms_per_image_batched, r.eval.fd_ratio)).collect();
        by_time.push(Series::scatter(*f, points));
    }
    let spec = PlotSpec {
        title: "FD / real-data floor vs time per image (batched), every run",
        x_label: "ms per image",
        y_label: "FD ratio",
        log_x: true,
        log_y: true,
    };
    line_plot(&dir.join("samplers_fd_vs_ms.png"), &spec, &by_time)?;
    written.push("samplers_fd_vs_ms.png".into());
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> BTreeMap<String, Vec<f64>> {
        BTreeMap::from([
            ("boss-2".to_string(), vec![0.0, 0.4, 1.0]),
            ("boss-4".to_string(), vec![0.0, 0.2, 0.5, 0.8, 1.0]),
            // A list whose length does not match its name is not used.
            ("boss-3".to_string(), vec![0.0, 1.0]),
        ])
    }

    #[test]
    fn runs_spend_exactly_their_budget_and_stored_schedules_match_their_steps() {
        let samplers = [Sampler::Euler, Sampler::Heun, Sampler::Rk4, Sampler::PseudoCorrector];
        let schedules = [ScheduleChoice::Uniform, ScheduleChoice::Stored("boss".into())];
        let runs = plan_runs(&[1, 2, 4, 6], &samplers, &schedules, &stored());
        for run in &runs {
            assert_eq!(run.sampler.nfe_for(run.steps), run.budget, "{run:?}");
        }
        let listed: Vec<(String, usize, String)> =
            runs.iter().map(|r| (r.sampler.name().to_string(), r.steps, r.schedule.canonical())).collect();
        let expected = [
            ("euler", 1, "uniform"),
            ("euler", 2, "uniform"),
            ("euler", 4, "uniform"),
            ("euler", 6, "uniform"),
            ("euler", 2, "boss-2"),
            ("euler", 4, "boss-4"),
            ("heun", 1, "uniform"),
            ("heun", 2, "uniform"),
            ("heun", 3, "uniform"),
            ("heun", 2, "boss-2"),
            ("rk4", 1, "uniform"),
            ("pseudo-corrector", 1, "uniform"),
            ("pseudo-corrector", 3, "uniform"),
            ("pseudo-corrector", 5, "uniform"),
        ];
        let expected: Vec<(String, usize, String)> =
            expected.iter().map(|(a, b, c)| (a.to_string(), *b, c.to_string())).collect();
        assert_eq!(listed, expected);
        let reference = Sampler::parse("dopri5").unwrap();
        let with_reference = plan_runs(&[2], &[reference.clone(), Sampler::Euler], &schedules, &stored());
        assert_eq!(with_reference.last().map(|r| (&r.sampler, r.budget)), Some((&reference, None)));
    }

    #[test]
    fn schedule_choices_parse_and_refuse_paths() {
        assert_eq!(ScheduleChoice::parse("uniform").unwrap(), ScheduleChoice::Uniform);
        assert_eq!(ScheduleChoice::parse("shift:2.5").unwrap(), ScheduleChoice::Shift(2.5));
        assert_eq!(ScheduleChoice::parse("boss").unwrap(), ScheduleChoice::Stored("boss".into()));
        for bad in ["shift:-1", "../etc/passwd", "", "a b"] {
            assert!(ScheduleChoice::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pareto_front_keeps_points_nothing_beats_in_both() {
        let points = [(1.0, 5.0), (2.0, 3.0), (3.0, 3.0), (4.0, 1.0), (2.5, 4.0), (1.0, 6.0), (f64::NAN, 0.0)];
        assert_eq!(pareto_front(&points), vec![true, true, false, true, false, false, false]);
        // Equal points are both on the front.
        assert_eq!(pareto_front(&[(1.0, 1.0), (1.0, 1.0)]), vec![true, true]);
    }

    #[test]
    fn guided_evaluations_count_two_forwards() {
        let guided = Guidance { scale: 1.5, null_label: Some(10), channels: None, interval: (0.0, 1.0) };
        assert_eq!(gflops_per_image(1e9, 8.0, &guided), 16.0);
        assert_eq!(gflops_per_image(1e9, 8.0, &Guidance::none()), 8.0);
    }
}
