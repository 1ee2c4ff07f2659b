//! Exact math on tiny tensors: order of convergence on ODEs with known solutions.

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use flowgen_engine::samplers::{Dopri5Options, Sampler, StepReport, Unobserved, VelocityField};
use flowgen_engine::{Error, Result, Schedule};

/// dx/ds = c_i x cos(s): x(1) = x0 exp(c_i sin 1), with a per-row rate c_i.
struct Growth {
    rates: Vec<f64>,
}

impl VelocityField for Growth {
    fn velocity(&self, x: &Tensor, s: &[f64]) -> Result<Tensor> {
        let rows: Vec<usize> = (0..s.len()).collect();
        self.velocity_of_rows(x, s, &rows)
    }

    fn velocity_of_rows(&self, x: &Tensor, s: &[f64], rows: &[usize]) -> Result<Tensor> {
        let coef: Vec<f64> = s.iter().zip(rows).map(|(&si, &r)| self.rates[r] * si.cos()).collect();
        let coef = Tensor::from_vec(coef, (s.len(), 1), x.device())?;
        Ok(x.broadcast_mul(&coef)?)
    }
}

/// dx/ds = -2 s x^2: x(1) = x0 / (1 + x0), nonlinear.
fn riccati(x: &Tensor, s: &[f64]) -> Result<Tensor> {
    Ok((x.sqr()? * (-2.0 * s[0]))?)
}

fn x0() -> Tensor {
    Tensor::from_vec(vec![0.5f64, 1.0, 2.0], (1, 3), &Device::Cpu).unwrap()
}

fn error_of(sampler: &Sampler, field: &dyn VelocityField, exact: &Tensor, steps: usize) -> (f64, usize) {
    let (x1, stats) = sampler.solve(field, x0(), &Schedule::uniform(steps).unwrap(), &mut Unobserved).unwrap();
    let err =
        (x1 - exact).unwrap().abs().unwrap().max_keepdim(1).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
            [0];
    (err, stats.nfe())
}

/// Least-squares slope of log(error) against log(step size).
fn observed_order(sampler: &Sampler, field: &dyn VelocityField, exact: &Tensor, steps: &[usize]) -> f64 {
    let points: Vec<(f64, f64)> =
        steps.iter().map(|&k| ((1.0 / k as f64).ln(), error_of(sampler, field, exact, k).0.ln())).collect();
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    cov / var
}

fn growth_exact() -> Tensor {
    (x0() * 1f64.sin().exp()).unwrap()
}

fn riccati_exact() -> Tensor {
    Tensor::from_vec(vec![0.5 / 1.5, 1.0 / 2.0, 2.0 / 3.0], (1, 3), &Device::Cpu).unwrap()
}

#[test]
fn fixed_step_solvers_show_their_order() {
    let growth = Growth { rates: vec![1.0] };
    let cases = [
        (Sampler::Euler, 1.0, &[16usize, 32, 64, 128][..]),
        (Sampler::Midpoint, 2.0, &[8, 16, 32, 64][..]),
        (Sampler::Heun, 2.0, &[8, 16, 32, 64][..]),
        (Sampler::PseudoCorrector, 2.0, &[8, 16, 32, 64][..]),
        (Sampler::Rk4, 4.0, &[4, 8, 16, 32][..]),
    ];
    for (sampler, expected, steps) in cases {
        for (name, field, exact) in [
            ("growth", &growth as &dyn VelocityField, growth_exact()),
            ("riccati", &riccati as &dyn VelocityField, riccati_exact()),
        ] {
            let order = observed_order(&sampler, field, &exact, steps);
            eprintln!("{} on {name}: observed order {order:.3}", sampler.name());
            assert!(
                (order - expected).abs() < 0.2,
                "{} on {name}: order {order:.3}, expected {expected}",
                sampler.name()
            );
        }
    }
}

#[test]
fn fixed_step_nfe_counts() {
    let field = Growth { rates: vec![1.0] };
    for (sampler, expected) in [
        (Sampler::Euler, 8),
        (Sampler::Midpoint, 16),
        (Sampler::Heun, 16),
        (Sampler::Rk4, 32),
        (Sampler::PseudoCorrector, 9),
    ] {
        let (_, nfe) = error_of(&sampler, &field, &growth_exact(), 8);
        assert_eq!(nfe, expected, "{}", sampler.name());
        assert_eq!(sampler.nfe_for(8), Some(expected));
    }
}

#[test]
fn dopri5_meets_tolerance_with_fewer_nfe_than_rk4() {
    // The Riccati field is zero at s = 0, so the Hairer initial-step heuristic starts at 1e-6 and
    // ramps up by 10x per step; that start-up cost is only amortised at tight tolerance.
    let growth = Growth { rates: vec![1.0] };
    for (field, exact, tol) in [
        (&riccati as &dyn VelocityField, riccati_exact(), 1e-8),
        (&growth as &dyn VelocityField, growth_exact(), 1e-6),
        (&growth as &dyn VelocityField, growth_exact(), 1e-8),
    ] {
        let sampler = Sampler::Dopri5(Dopri5Options { rtol: tol, atol: tol, max_nfe: 10_000 });
        let (x1, stats) = sampler.solve(field, x0(), &Schedule::uniform(1).unwrap(), &mut Unobserved).unwrap();
        let err =
            (x1 - &exact).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        // Global error stays within a small multiple of the local tolerance on this smooth problem.
        assert!(err < 10.0 * tol, "tol {tol}: error {err:e}");
        // The cheapest RK4 grid reaching the same error.
        let rk4_nfe = (1..10_000)
            .find_map(|k| {
                let (e, nfe) = error_of(&Sampler::Rk4, field, &exact, k);
                (e <= err).then_some(nfe)
            })
            .unwrap();
        eprintln!("tol {tol:e}: dopri5 {} NFE, rk4 {rk4_nfe} NFE at error {err:.2e}", stats.nfe());
        assert!(stats.nfe() < rk4_nfe, "tol {tol}: dopri5 {} NFE vs rk4 {rk4_nfe} NFE at error {err:e}", stats.nfe());
        assert_eq!(stats.per_sample_nfe, vec![stats.nfe()]);
    }
}

#[test]
fn dopri5_rows_follow_their_own_steps() {
    let rates = vec![0.5, 4.0, 1.0];
    let sampler = Sampler::Dopri5(Dopri5Options { rtol: 1e-7, atol: 1e-7, max_nfe: 10_000 });
    let xs = Tensor::from_vec(vec![1.0f64, 1.0, 1.0], (3, 1), &Device::Cpu).unwrap();
    let grid = Schedule::uniform(1).unwrap();
    let (batched, stats) = sampler.solve(&Growth { rates: rates.clone() }, xs.clone(), &grid, &mut Unobserved).unwrap();
    let batched: Vec<f64> = batched.flatten_all().unwrap().to_vec1().unwrap();
    for (i, &rate) in rates.iter().enumerate() {
        let one = xs.narrow(0, i, 1).unwrap();
        let (alone, alone_stats) = sampler.solve(&Growth { rates: vec![rate] }, one, &grid, &mut Unobserved).unwrap();
        let alone = alone.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        assert_eq!(batched[i].to_bits(), alone.to_bits(), "row {i} differs from its solo solve");
        assert_eq!(stats.per_sample_nfe[i], alone_stats.nfe(), "row {i}");
    }
    // The stiffer row needs more evaluations than the gentle one.
    assert!(stats.per_sample_nfe[1] > stats.per_sample_nfe[0], "{:?}", stats.per_sample_nfe);
    assert_eq!(stats.nfe(), *stats.per_sample_nfe.iter().max().unwrap());
}

#[test]
fn dopri5_nfe_cap_fails_clearly() {
    let sampler = Sampler::Dopri5(Dopri5Options { rtol: 1e-12, atol: 1e-12, max_nfe: 20 });
    let (_, stats) = sampler.solve(&riccati, x0(), &Schedule::uniform(1).unwrap(), &mut Unobserved).unwrap();
    let err = stats.require_all().unwrap_err();
    assert!(matches!(err, Error::Solver(_)), "{err}");
    assert!(err.to_string().contains("image 0") && err.to_string().contains("20 evaluations"), "{err}");
}

/// Counts the rows each evaluation computes, to see what a batch really costs.
struct CountingRows<'a> {
    inner: &'a Growth,
    rows_evaluated: std::cell::Cell<usize>,
}

impl VelocityField for CountingRows<'_> {
    fn velocity(&self, x: &Tensor, s: &[f64]) -> Result<Tensor> {
        let rows: Vec<usize> = (0..s.len()).collect();
        self.velocity_of_rows(x, s, &rows)
    }

    fn velocity_of_rows(&self, x: &Tensor, s: &[f64], rows: &[usize]) -> Result<Tensor> {
        self.rows_evaluated.set(self.rows_evaluated.get() + rows.len());
        self.inner.velocity_of_rows(x, s, rows)
    }
}

#[test]
fn dopri5_drops_finished_rows_and_fails_images_one_by_one() {
    let sampler = Sampler::Dopri5(Dopri5Options { rtol: 1e-6, atol: 1e-6, max_nfe: 300 });
    let grid = Schedule::uniform(1).unwrap();
    // Row 1 blows up (x grows like exp(400 sin s)) and runs into the cap; rows 0 and 2 are gentle.
    let growth = Growth { rates: vec![0.5, 400.0, 1.0] };
    let field = CountingRows { inner: &growth, rows_evaluated: Default::default() };
    let xs = Tensor::from_vec(vec![1.0f64, 1.0, 1.0], (3, 1), &Device::Cpu).unwrap();
    let (x1, stats) = sampler.solve(&field, xs.clone(), &grid, &mut Unobserved).unwrap();
    assert_eq!(stats.failures.keys().copied().collect::<Vec<_>>(), vec![1], "{:?}", stats.failures);
    let x1: Vec<f64> = x1.flatten_all().unwrap().to_vec1().unwrap();
    for i in [0usize, 2] {
        let alone = Growth { rates: vec![growth.rates[i]] };
        let (one, one_stats) = sampler.solve(&alone, xs.narrow(0, i, 1).unwrap(), &grid, &mut Unobserved).unwrap();
        assert_eq!(x1[i].to_bits(), one.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0].to_bits(), "row {i}");
        assert_eq!(stats.per_sample_nfe[i], one_stats.nfe());
    }
    // Rows that finished early were not evaluated again: the rows computed are the sum of what
    // each row needed, far below batch size times the slowest row's evaluations.
    assert_eq!(field.rows_evaluated.get(), stats.per_sample_nfe.iter().sum::<usize>());
    assert!(field.rows_evaluated.get() < 3 * stats.nfe());
}

#[test]
fn observer_sees_every_step_and_can_stop() {
    let field = Growth { rates: vec![1.0] };
    let mut seen: Vec<StepReport> = Vec::new();
    let mut record = |r: &StepReport| {
        seen.push(r.clone());
        ControlFlow::Continue(())
    };
    Sampler::Heun.solve(&field, x0(), &Schedule::uniform(4).unwrap(), &mut record).unwrap();
    assert_eq!(seen.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(seen.iter().map(|r| r.nfe).collect::<Vec<_>>(), vec![2, 4, 6, 8]);
    assert_eq!(seen[3].s, 1.0);
    assert_eq!(seen[0].total, Some(4));

    let mut calls = 0;
    let mut stop_after_two = |_: &StepReport| {
        calls += 1;
        if calls == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let err = Sampler::Rk4.solve(&field, x0(), &Schedule::uniform(10).unwrap(), &mut stop_after_two).unwrap_err();
    assert!(matches!(err, Error::Cancelled));
    assert_eq!(calls, 2);

    let mut stop_now = |_: &StepReport| ControlFlow::Break(());
    let dopri = Sampler::Dopri5(Dopri5Options::default());
    assert!(matches!(dopri.solve(&field, x0(), &Schedule::uniform(1).unwrap(), &mut stop_now), Err(Error::Cancelled)));
}

#[test]
fn explicit_schedules_drive_fixed_step_solvers() {
    // A non-uniform grid (BOSS-like: small steps at both ends) still converges to the solution.
    let grid = Schedule::explicit(vec![0.0, 0.02, 0.07, 0.18, 0.35, 0.56, 0.76, 0.92, 1.0]).unwrap();
    let (x1, stats) = Sampler::Heun.solve(&riccati, x0(), &grid, &mut Unobserved).unwrap();
    let max_err = |x: Tensor| {
        (x - riccati_exact()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    };
    let (uniform, _) = Sampler::Heun.solve(&riccati, x0(), &Schedule::uniform(8).unwrap(), &mut Unobserved).unwrap();
    assert_ne!(max_err(x1.clone()), max_err(uniform), "the explicit grid was not used");
    assert!(max_err(x1) < 2e-2);
    assert_eq!(stats.nfe(), 16);
}

#[test]
fn sampler_names_parse_and_unknown_is_rejected() {
    for name in flowgen_engine::samplers::sampler_names() {
        // flowturbo needs its plan (or a model that recommends one).
        let text = if name == "flowturbo" { "flowturbo:H2P4R2".to_string() } else { name.to_string() };
        assert_eq!(Sampler::parse(&text).unwrap().name(), name);
    }
    let err = Sampler::parse("ddim").unwrap_err().to_string();
    assert!(err.contains("unknown sampler") && err.contains("dopri5"), "{err}");
}

fn flowturbo(plan: &str) -> Sampler {
    Sampler::parse(&format!("flowturbo:{plan}")).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn flowturbo_without_refiner_steps_is_heun_or_the_pseudo_corrector() {
    let growth = Growth { rates: vec![1.3] };
    let grid = Schedule::uniform(5).unwrap();
    let solve = |s: &Sampler| s.solve(&growth, x0(), &grid, &mut Unobserved).unwrap();
    let (heun, heun_stats) = solve(&Sampler::Heun);
    let (h5, h5_stats) = solve(&flowturbo("H5"));
    assert_eq!(max_diff(&heun, &h5), 0.0);
    assert_eq!(h5_stats.nfe(), heun_stats.nfe());
    let (pc, pc_stats) = solve(&Sampler::PseudoCorrector);
    let (p5, p5_stats) = solve(&flowturbo("P5"));
    assert_eq!(max_diff(&pc, &p5), 0.0);
    assert_eq!((p5_stats.nfe(), pc_stats.nfe()), (6, 6));
}

#[test]
fn flowturbo_with_a_zero_refiner_steps_on_with_the_cached_velocity() {
    use flowgen_engine::samplers::{Fields, REFINER_NETWORK};
    // A refiner whose offset is 0 everywhere: it takes (x, v) side by side and returns C channels.
    let zero = |xv: &Tensor, _s: &[f64]| -> Result<Tensor> {
        let c = xv.dim(1)? / 2;
        Ok(xv.narrow(1, 0, c)?.zeros_like()?)
    };
    let fields = Fields::main(&riccati).with(REFINER_NETWORK, &zero);
    let (x4, stats) =
        flowturbo("H1P1R2").solve_with(&fields, x0(), &Schedule::uniform(4).unwrap(), &mut Unobserved).unwrap();
    // By hand: a Heun step, a pseudo-corrector step, then two Euler steps on the cache it left.
    let h = 0.25;
    let u = |x: &Tensor, s: f64| riccati(x, &[s]).unwrap();
    let x = x0();
    let d0 = u(&x, 0.0);
    let d1 = u(&(&x + (&d0 * h).unwrap()).unwrap(), 0.25);
    let x1 = (&x + ((&d0 + &d1).unwrap() * (h / 2.0)).unwrap()).unwrap();
    let d2 = u(&(&x1 + (&d1 * h).unwrap()).unwrap(), 0.5);
    let x2 = (&x1 + ((&d1 + &d2).unwrap() * (h / 2.0)).unwrap()).unwrap();
    let expected = (&x2 + (&d2 * (2.0 * h)).unwrap()).unwrap();
    assert!(max_diff(&x4, &expected) < 1e-12, "{}", max_diff(&x4, &expected));
    assert_eq!(stats.nfe(), 3);
    assert_eq!(stats.evaluations[REFINER_NETWORK], 4);
}

#[test]
fn flowturbo_refiner_steps_condition_on_the_cached_or_the_refined_velocity() {
    use flowgen_engine::samplers::{Fields, REFINER_NETWORK};
    // Offset = 0.1 * (conditioning velocity): the two variants differ only in the second call.
    let scaled = |xv: &Tensor, _s: &[f64]| -> Result<Tensor> {
        let c = xv.dim(1)? / 2;
        Ok((xv.narrow(1, c, c)? * 0.1)?)
    };
    let fields = Fields::main(&riccati).with(REFINER_NETWORK, &scaled);
    let grid = Schedule::uniform(2).unwrap();
    let (cached, _) = flowturbo("H1R1").solve_with(&fields, x0(), &grid, &mut Unobserved).unwrap();
    let (refined, _) = flowturbo("H1R1,condition=refined").solve_with(&fields, x0(), &grid, &mut Unobserved).unwrap();
    let u = |x: &Tensor, s: f64| riccati(x, &[s]).unwrap();
    let h = 0.5;
    let x = x0();
    let d0 = u(&x, 0.0);
    let v = u(&(&x + (&d0 * h).unwrap()).unwrap(), 0.5);
    let x1 = (&x + ((&d0 + &v).unwrap() * (h / 2.0)).unwrap()).unwrap();
    let r0 = (&v * 1.1).unwrap();
    let end = |second: &Tensor| (&x1 + ((&r0 + second).unwrap() * (h / 2.0)).unwrap()).unwrap();
    assert!(max_diff(&cached, &end(&(&r0 + (&v * 0.1).unwrap()).unwrap())) < 1e-12);
    assert!(max_diff(&refined, &end(&(&r0 + (&r0 * 0.1).unwrap()).unwrap())) < 1e-12);
}

#[test]
fn flowturbo_asks_for_its_refiner_and_its_own_step_count() {
    let grid = Schedule::uniform(3).unwrap();
    let err = flowturbo("H1P1R1").solve(&riccati, x0(), &grid, &mut Unobserved).unwrap_err().to_string();
    assert!(err.contains("\"refiner\""), "{err}");
    let err = flowturbo("H1P1").solve(&riccati, x0(), &grid, &mut Unobserved).unwrap_err().to_string();
    assert!(err.contains("runs 2 steps, the grid has 3"), "{err}");
}
