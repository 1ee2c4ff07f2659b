//! ODE solvers for dx/ds = u(x, s) from s = 0 (noise) to s = 1 (data). Each counts network
//! evaluations per network and reports every step to an observer that may stop the solve.
//!
//! A sampler is a parsed plan with a canonical text form: `Sampler::parse(&s.canonical()) == s`.
//! The text is `family` or `family:key=value,key=value` (e.g. `dopri5:rtol=1e-4,atol=1e-4,max_nfe=500`).
//! A new sampler is one file here plus one entry in `FAMILIES` and the match arms of `Sampler`.

mod dopri5;
mod fixed;
mod flowturbo;
mod fra;
pub(crate) mod fused;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;
use std::str::FromStr;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::velocity::FeatureMemo;

pub use dopri5::Dopri5Options;
pub use flowturbo::{FlowTurboPlan, RefinerCondition, REFINER_NETWORK};
pub use fra::FRN_NETWORK;

/// Name under which the main velocity network's evaluations are counted.
pub const MAIN_NETWORK: &str = "velocity";

/// A velocity field in the engine frame. `s` holds one time per batch row.
pub trait VelocityField {
    fn velocity(&self, x: &Tensor, s: &[f64]) -> Result<Tensor>;

    /// u for some rows of the batch only: `x` and `s` hold rows `rows` of the full batch, in
    /// order (adaptive solvers drop finished rows). Fields conditioned per row (labels)
    /// override this; the default suits fields that are the same for every row.
    fn velocity_of_rows(&self, x: &Tensor, s: &[f64], rows: &[usize]) -> Result<Tensor> {
        let _ = rows;
        self.velocity(x, s)
    }

    /// The velocity at `x`, and the unconditional guidance pass's own path where it differs:
    /// with guidance on only some channels, the doubled batch of the reference code keeps the
    /// unconditional output in the others (FlowTurbo's release conditions its refiner's
    /// unconditional pass on that, at `x_uncond`). None when the paths agree, as for unguided fields.
    fn velocity_paths(&self, x: &Tensor, x_uncond: Option<&Tensor>, s: &[f64]) -> Result<(Tensor, Option<Tensor>)> {
        let _ = x_uncond;
        Ok((self.velocity(x, s)?, None))
    }

    /// The velocity, letting the network reuse what it kept in `memo` from earlier evaluations
    /// of this solve (blockwise FRA); fields that keep nothing evaluate in full.
    fn velocity_with_memo(&self, x: &Tensor, s: &[f64], memo: &mut FeatureMemo) -> Result<Tensor> {
        let _ = memo;
        self.velocity(x, s)
    }

    /// Whether `velocity_with_memo` can reuse anything.
    fn reuses_features(&self) -> bool {
        false
    }
}

impl<F: Fn(&Tensor, &[f64]) -> Result<Tensor>> VelocityField for F {
    fn velocity(&self, x: &Tensor, s: &[f64]) -> Result<Tensor> {
        self(x, s)
    }
}

/// The fields one solve may call: the main network's, and auxiliary networks' by name (a
/// refiner's takes the state and its conditioning velocity side by side in channels).
pub struct Fields<'a> {
    pub main: &'a dyn VelocityField,
    auxiliary: Vec<(&'a str, &'a dyn VelocityField)>,
}

impl<'a> Fields<'a> {
    pub fn main(main: &'a dyn VelocityField) -> Self {
        Fields { main, auxiliary: Vec::new() }
    }

    /// These fields and the auxiliary network `name`.
    pub fn with(mut self, name: &'a str, field: &'a dyn VelocityField) -> Self {
        self.auxiliary.push((name, field));
        self
    }

    /// The auxiliary network `name`, or an error naming what is missing.
    pub fn network(&self, name: &str) -> Result<&'a dyn VelocityField> {
        self.auxiliary.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).ok_or_else(|| {
            Error::invalid("sampler", format!("this sampler needs the network {name:?}, which the solve was not given"))
        })
    }
}

/// Progress after a completed step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Steps completed so far (accepted steps for adaptive solvers).
    pub step: usize,
    /// Total steps when known in advance (fixed-step solvers).
    pub total: Option<usize>,
    /// Time reached; for an adaptive batch, the least advanced sample.
    pub s: f64,
    /// Batched evaluations of the main network so far.
    pub nfe: usize,
}

/// Called between steps; `ControlFlow::Break` stops the solve with `Error::Cancelled`.
pub trait StepObserver {
    fn on_step(&mut self, report: &StepReport) -> ControlFlow<()>;
}

impl<F: FnMut(&StepReport) -> ControlFlow<()>> StepObserver for F {
    fn on_step(&mut self, report: &StepReport) -> ControlFlow<()> {
        self(report)
    }
}

/// An observer that never stops the solve.
pub struct Unobserved;

impl StepObserver for Unobserved {
    fn on_step(&mut self, _: &StepReport) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// What a solve cost and how it went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SolveStats {
    /// Batched evaluations of each network the solve ran, by network name (`MAIN_NETWORK` first
    /// in importance; auxiliary networks such as a refiner under their own names).
    pub evaluations: BTreeMap<String, usize>,
    /// Steps taken (accepted steps of the slowest sample for adaptive solvers).
    pub steps: usize,
    pub accepted: usize,
    pub rejected: usize,
    /// Main-network evaluations each sample needed; equal to `nfe()` except for adaptive solvers.
    pub per_sample_nfe: Vec<usize>,
    /// Samples the solver gave up on (index in the batch, why); the others are solved. Their rows
    /// of the returned state are where they stopped and must not be delivered.
    pub failures: BTreeMap<usize, String>,
}

impl SolveStats {
    /// Stats of a solve that ran only the main network.
    pub fn main_only(nfe: usize, steps: usize, accepted: usize, rejected: usize, per_sample_nfe: Vec<usize>) -> Self {
        let evaluations = BTreeMap::from([(MAIN_NETWORK.to_string(), nfe)]);
        SolveStats { evaluations, steps, accepted, rejected, per_sample_nfe, failures: BTreeMap::new() }
    }

    /// Batched evaluations of the main network.
    pub fn nfe(&self) -> usize {
        self.evaluations.get(MAIN_NETWORK).copied().unwrap_or(0)
    }

    /// Main-network evaluations of sample `i`.
    pub fn sample_nfe(&self, i: usize) -> usize {
        self.per_sample_nfe.get(i).copied().unwrap_or_else(|| self.nfe())
    }

    /// Err naming every sample the solver gave up on.
    pub fn require_all(&self) -> Result<()> {
        if self.failures.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = self.failures.iter().map(|(i, why)| format!("image {i}: {why}")).collect();
        Err(Error::Solver(list.join("; ")))
    }

    /// The part of a batch's stats that belongs to samples `range`.
    pub fn for_samples(&self, range: std::ops::Range<usize>) -> SolveStats {
        let per_sample_nfe = self.per_sample_nfe.get(range.clone()).map(<[usize]>::to_vec).unwrap_or_default();
        let failures = self
            .failures
            .iter()
            .filter(|(i, _)| range.contains(i))
            .map(|(i, why)| (i - range.start, why.clone()))
            .collect();
        SolveStats { per_sample_nfe, failures, ..self.clone() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Sampler {
    Euler,
    Midpoint,
    Heun,
    Rk4,
    /// FlowTurbo's pseudo-corrector: Heun reusing the previous step's end velocity (1 NFE/step).
    PseudoCorrector,
    /// FlowTurbo's Heun / pseudo-corrector / refiner plan (needs the `refiner` network when R > 0).
    FlowTurbo(FlowTurboPlan),
    /// Blockwise Flow Matching's feature residual approximation: Euler, with the trunk run only
    /// at each segment's first step and its FRN approximation after (needs a blockwise model
    /// with an FRN).
    Fra,
    Dopri5(Dopri5Options),
}

/// One sampler family: its canonical name, accepted aliases and its parameters' syntax.
pub struct SamplerFamily {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    /// `key=value` parameters it takes, for help texts and `/v1/models` ("" when none).
    pub parameters: &'static str,
    parse: fn(&mut Parameters) -> Result<Sampler>,
}

/// Every sampler family, in the order help texts list them.
pub const FAMILIES: &[SamplerFamily] = &[
    SamplerFamily { name: "euler", aliases: &[], parameters: "", parse: |_| Ok(Sampler::Euler) },
    SamplerFamily { name: "midpoint", aliases: &[], parameters: "", parse: |_| Ok(Sampler::Midpoint) },
    SamplerFamily { name: "heun", aliases: &["heun2"], parameters: "", parse: |_| Ok(Sampler::Heun) },
    SamplerFamily { name: "rk4", aliases: &[], parameters: "", parse: |_| Ok(Sampler::Rk4) },
    SamplerFamily {
        name: "pseudo-corrector",
        aliases: &["pc", "flowturbo-p"],
        parameters: "",
        parse: |_| Ok(Sampler::PseudoCorrector),
    },
    SamplerFamily {
        name: "flowturbo",
        aliases: &[],
        parameters: "H<a>P<b>R<c>,condition=cached|refined",
        parse: FlowTurboPlan::from_parameters,
    },
    SamplerFamily { name: "fra", aliases: &["bfm-fra", "blockwise-fra"], parameters: "", parse: |_| Ok(Sampler::Fra) },
    SamplerFamily {
        name: "dopri5",
        aliases: &["dopri", "dormand-prince"],
        parameters: "rtol=R,atol=A,max_nfe=M",
        parse: Dopri5Options::from_parameters,
    },
];

/// Family names accepted by `Sampler::parse`, for help texts and API listings.
pub fn sampler_names() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.name).collect()
}

/// `name` or `name:params` for every family, e.g. "dopri5[:rtol=R,atol=A,max_nfe=M]".
pub fn sampler_syntax() -> Vec<String> {
    FAMILIES
        .iter()
        .map(|f| if f.parameters.is_empty() { f.name.to_string() } else { format!("{}[:{}]", f.name, f.parameters) })
        .collect()
}

/// The `key=value` list after a sampler's name; every key must be used by the family's parser.
/// The first entry may be a bare word (a plan such as FlowTurbo's `H2P4R2`) for families that take one.
pub struct Parameters {
    family: &'static str,
    positional: Option<String>,
    values: BTreeMap<String, String>,
}

impl Parameters {
    fn parse(family: &'static str, text: &str) -> Result<Self> {
        let mut values = BTreeMap::new();
        let mut positional = None;
        for (i, part) in text.split(',').map(str::trim).filter(|p| !p.is_empty()).enumerate() {
            let Some((key, value)) = part.split_once('=') else {
                if i == 0 {
                    positional = Some(part.to_string());
                    continue;
                }
                return Err(Error::invalid("sampler", format!("{family}: parameter {part:?} is not key=value")));
            };
            let key = key.trim().to_ascii_lowercase();
            if values.insert(key.clone(), value.trim().to_string()).is_some() {
                return Err(Error::invalid("sampler", format!("{family}: parameter {key:?} is given twice")));
            }
        }
        Ok(Parameters { family, positional, values })
    }

    /// The bare word before the `key=value` list, if any.
    pub fn take_positional(&mut self) -> Option<String> {
        self.positional.take()
    }

    /// Take a text parameter.
    pub fn text(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// Take a numeric parameter, or `default` when absent.
    pub fn number<T: FromStr>(&mut self, key: &str, default: T) -> Result<T> {
        match self.values.remove(key) {
            None => Ok(default),
            Some(text) => text.parse().map_err(|_| {
                Error::invalid("sampler", format!("{}: {key} = {text:?} is not a valid number", self.family))
            }),
        }
    }

    /// Fail on parameters no one took.
    pub fn finish(self) -> Result<()> {
        if let Some(part) = &self.positional {
            return Err(Error::invalid("sampler", format!("{}: parameter {part:?} is not key=value", self.family)));
        }
        match self.values.keys().next() {
            None => Ok(()),
            Some(key) => {
                let known = FAMILIES.iter().find(|f| f.name == self.family).map(|f| f.parameters).unwrap_or("");
                let known = if known.is_empty() { "none".to_string() } else { known.to_string() };
                Err(Error::invalid(
                    "sampler",
                    format!("{}: unknown parameter {key:?} (parameters: {known})", self.family),
                ))
            }
        }
    }
}

impl Sampler {
    /// "euler", "heun", "dopri5", "dopri5:rtol=1e-4,atol=1e-4,max_nfe=500", ... (case-insensitive).
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        let (name, params) = match text.split_once(':') {
            Some((name, params)) => (name.trim(), params),
            None => (text, ""),
        };
        let name = name.to_ascii_lowercase();
        let family =
            FAMILIES.iter().find(|f| f.name == name || f.aliases.contains(&name.as_str())).ok_or_else(|| {
                Error::invalid(
                    "sampler",
                    format!("unknown sampler {name:?}; choose one of {}", sampler_syntax().join(", ")),
                )
            })?;
        let mut params = Parameters::parse(family.name, params)?;
        let sampler = (family.parse)(&mut params)?;
        params.finish()?;
        Ok(sampler)
    }

    /// The family name ("dopri5"), without parameters.
    pub fn name(&self) -> &'static str {
        match self {
            Sampler::Euler => "euler",
            Sampler::Midpoint => "midpoint",
            Sampler::Heun => "heun",
            Sampler::Rk4 => "rk4",
            Sampler::PseudoCorrector => "pseudo-corrector",
            Sampler::FlowTurbo(_) => "flowturbo",
            Sampler::Fra => "fra",
            Sampler::Dopri5(_) => "dopri5",
        }
    }

    /// Text that `parse` turns back into this sampler, with every parameter spelled out.
    pub fn canonical(&self) -> String {
        match self {
            Sampler::Dopri5(opts) => format!("dopri5:{}", opts.canonical_parameters()),
            Sampler::FlowTurbo(plan) => format!("flowturbo:{plan}"),
            fixed => fixed.name().to_string(),
        }
    }

    pub fn is_adaptive(&self) -> bool {
        matches!(self, Sampler::Dopri5(_))
    }

    /// Main-network NFE a fixed-step solve of `steps` steps costs (None for adaptive solvers).
    pub fn nfe_for(&self, steps: usize) -> Option<usize> {
        match self {
            Sampler::Euler | Sampler::Fra => Some(steps),
            Sampler::Midpoint | Sampler::Heun => Some(2 * steps),
            Sampler::Rk4 => Some(4 * steps),
            Sampler::PseudoCorrector => Some(steps + 1),
            Sampler::FlowTurbo(plan) => Some(plan.velocity_evaluations()),
            Sampler::Dopri5(_) => None,
        }
    }

    /// Steps the sampler fixes itself (a FlowTurbo plan); None when the caller chooses.
    pub fn own_steps(&self) -> Option<usize> {
        match self {
            Sampler::FlowTurbo(plan) => Some(plan.steps()),
            _ => None,
        }
    }

    /// Auxiliary networks (`[networks.NAME]`) a solve with this sampler calls, with their
    /// batched evaluations per solve.
    pub fn networks(&self) -> Vec<(&'static str, usize)> {
        match self {
            Sampler::FlowTurbo(plan) if plan.refine > 0 => vec![(REFINER_NETWORK, plan.refiner_evaluations())],
            _ => Vec::new(),
        }
    }

    /// The most main-network evaluations one image may cost; adaptive solvers stop at their cap.
    pub fn max_nfe_for(&self, steps: usize) -> usize {
        match self {
            Sampler::Dopri5(opts) => opts.max_nfe,
            fixed => fixed.nfe_for(steps).unwrap_or(0),
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Sampler::Dopri5(opts) => opts.validate(),
            _ => Ok(()),
        }
    }

    /// Integrate from `x0` (noise, s = 0) to s = 1 with the main network only. Adaptive solvers
    /// ignore the grid.
    pub fn solve(
        &self,
        field: &dyn VelocityField,
        x0: Tensor,
        schedule: &Schedule,
        observer: &mut dyn StepObserver,
    ) -> Result<(Tensor, SolveStats)> {
        self.solve_with(&Fields::main(field), x0, schedule, observer)
    }

    /// Like `solve`, with the auxiliary networks `self.networks()` names.
    pub fn solve_with(
        &self,
        fields: &Fields,
        x0: Tensor,
        schedule: &Schedule,
        observer: &mut dyn StepObserver,
    ) -> Result<(Tensor, SolveStats)> {
        match self {
            Sampler::Dopri5(opts) => dopri5::solve(opts, fields.main, x0, observer),
            Sampler::FlowTurbo(plan) => flowturbo::solve(plan, fields, x0, schedule, observer),
            Sampler::Fra => fra::solve(fields.main, x0, schedule, observer),
            fixed_step => fixed::solve(fixed_step, fields.main, x0, schedule, observer),
        }
    }
}

impl FromStr for Sampler {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Sampler::parse(s)
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sampler_round_trips_through_its_canonical_text() {
        // Every family but flowturbo parses from its bare name; flowturbo needs a plan.
        let mut samplers: Vec<Sampler> =
            FAMILIES.iter().filter(|f| f.name != "flowturbo").map(|f| Sampler::parse(f.name).unwrap()).collect();
        for plan in ["H2P4R2", "h1p5r3", "H8", "P5R3", "R2", "H0P0R1", "H3P3R2,condition=refined"] {
            samplers.push(Sampler::parse(&format!("flowturbo:{plan}")).unwrap());
        }
        samplers.push(Sampler::Dopri5(Dopri5Options { rtol: 1e-4, atol: 3.5e-6, max_nfe: 500 }));
        samplers.push(Sampler::Dopri5(Dopri5Options { rtol: 0.1, atol: 0.0, max_nfe: 8 }));
        for sampler in samplers {
            let text = sampler.canonical();
            assert_eq!(Sampler::parse(&text).unwrap(), sampler, "{text}");
            assert_eq!(Sampler::parse(&text).unwrap().canonical(), text);
            assert_eq!(sampler.to_string(), text);
        }
    }

    #[test]
    fn parameters_parse_with_defaults_and_aliases() {
        let s = Sampler::parse(" Dormand-Prince:rtol=1e-4, max_nfe=500 ").unwrap();
        assert_eq!(s, Sampler::Dopri5(Dopri5Options { rtol: 1e-4, atol: 1e-5, max_nfe: 500 }));
        assert_eq!(s.canonical(), "dopri5:rtol=1e-4,atol=1e-5,max_nfe=500");
        assert_eq!(Sampler::parse("dopri5").unwrap().canonical(), "dopri5:rtol=1e-5,atol=1e-5,max_nfe=2000");
        assert_eq!(Sampler::parse("PC").unwrap(), Sampler::PseudoCorrector);
        assert_eq!(Sampler::parse("heun2").unwrap().canonical(), "heun");
    }

    #[test]
    fn flowturbo_plans_parse_to_their_blocks_and_canonical_text() {
        let plan = |text: &str| match Sampler::parse(text).unwrap() {
            Sampler::FlowTurbo(p) => p,
            other => panic!("{text} parsed as {other:?}"),
        };
        let p = plan("FlowTurbo: h2p4r2 ");
        assert_eq!((p.heun, p.pseudo, p.refine, p.condition), (2, 4, 2, RefinerCondition::Cached));
        assert_eq!(Sampler::FlowTurbo(p).canonical(), "flowturbo:H2P4R2");
        let p = plan("flowturbo:P5R3");
        assert_eq!((p.heun, p.pseudo, p.refine), (0, 5, 3));
        assert_eq!(Sampler::FlowTurbo(p).canonical(), "flowturbo:H0P5R3");
        let p = plan("flowturbo:H3R2,condition=refined");
        assert_eq!((p.heun, p.pseudo, p.refine, p.condition), (3, 0, 2, RefinerCondition::Refined));
        assert_eq!(Sampler::FlowTurbo(p).canonical(), "flowturbo:H3P0R2,condition=refined");
        assert_eq!(Sampler::FlowTurbo(p).own_steps(), Some(5));
        assert_eq!(plan("flowturbo:H2P4R2,condition=cached"), plan("flowturbo:H2P4R2"));
    }

    #[test]
    fn flowturbo_costs_follow_the_block_counts() {
        for h in 0..4 {
            for p in 0..4 {
                for r in 0..4 {
                    if h + p + r == 0 {
                        continue;
                    }
                    let plan = FlowTurboPlan { heun: h, pseudo: p, refine: r, condition: RefinerCondition::Cached };
                    // The first P or R step needs a velocity that only a Heun step would have cached.
                    assert_eq!(plan.velocity_evaluations(), 2 * h + p + usize::from(h == 0), "{plan}");
                    assert_eq!(plan.refiner_evaluations(), 2 * r, "{plan}");
                    let networks = Sampler::FlowTurbo(plan).networks();
                    assert_eq!(networks, if r > 0 { vec![(REFINER_NETWORK, 2 * r)] } else { vec![] });
                }
            }
        }
    }

    #[test]
    fn bad_flowturbo_plans_name_the_problem() {
        let msg = |t: &str| Sampler::parse(t).unwrap_err().to_string();
        assert!(msg("flowturbo").contains("needs a plan"), "{}", msg("flowturbo"));
        assert!(msg("flowturbo:H0P0R0").contains("no steps"), "{}", msg("flowturbo:H0P0R0"));
        assert!(msg("flowturbo:R2H3").contains("H, then P, then R"), "{}", msg("flowturbo:R2H3"));
        assert!(msg("flowturbo:H2H2").contains("H, then P, then R"));
        assert!(msg("flowturbo:H2X4").contains("not H, P or R"));
        assert!(msg("flowturbo:HP4").contains("no count"));
        assert!(msg("flowturbo:H99999").contains("limit"));
        assert!(msg("flowturbo:H2P4R2,condition=x").contains("condition"));
        assert!(msg("flowturbo:H2P4R2,steps=3").contains("unknown parameter \"steps\""));
        assert!(msg("flowturbo:H2,P4").contains("not key=value"));
        assert!(msg("euler:H2").contains("not key=value"), "{}", msg("euler:H2"));
    }

    #[test]
    fn bad_sampler_text_names_the_problem() {
        let msg = |t: &str| Sampler::parse(t).unwrap_err().to_string();
        assert!(msg("ddim").contains("unknown sampler \"ddim\""), "{}", msg("ddim"));
        assert!(msg("euler:steps=4").contains("unknown parameter \"steps\""), "{}", msg("euler:steps=4"));
        assert!(msg("dopri5:rtol").contains("not key=value"));
        assert!(msg("dopri5:rtol=abc").contains("rtol"));
        assert!(msg("dopri5:rtol=1e-3,rtol=1e-4").contains("twice"));
        assert!(msg("dopri5:rtol=-1").contains("rtol"));
        assert!(msg("dopri5:max_nfe=3").contains("max_nfe"));
    }
}
