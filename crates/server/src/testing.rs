//! A deterministic fake engine for handler tests and the HTTP benchmark's dry runs: images depend
//! only on (seed, label), steps take a set time, and it can pause, fail or panic on demand.
//! Compiled only for tests (the `testing` feature), never into a production build.

use std::ops::ControlFlow;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use flowgen_engine::handle::Progress;
use flowgen_engine::image::Image;
use flowgen_engine::random_model::tiny_latent_config;
use flowgen_engine::{Error, GenerationRequest, ModelConfig, SolveStats, StepReport};

use crate::engine::{Engine, EngineOutput};

pub struct FakeEngine {
    config: ModelConfig,
    step_delay: Duration,
    paused: Mutex<bool>,
    resume: Condvar,
    /// Seeds of every batch run, in order.
    batches: Mutex<Vec<Vec<u64>>>,
    /// The last step any batch completed.
    current_step: std::sync::atomic::AtomicUsize,
    /// The step at which each cancelled batch stopped.
    stopped_at: Mutex<Vec<usize>>,
    /// A batch containing this label fails (returns an engine error).
    pub fail_label: Option<u32>,
    /// A batch containing this label panics.
    pub panic_label: Option<u32>,
}

impl FakeEngine {
    pub fn new(name: &str, step_delay: Duration) -> Self {
        FakeEngine {
            config: tiny_latent_config(name),
            step_delay,
            paused: Mutex::new(false),
            resume: Condvar::new(),
            batches: Mutex::new(Vec::new()),
            stopped_at: Mutex::new(Vec::new()),
            current_step: std::sync::atomic::AtomicUsize::new(0),
            fail_label: None,
            panic_label: None,
        }
    }

    /// The model config the fake serves (to give it presets or stored schedules).
    pub fn config_mut(&mut self) -> &mut ModelConfig {
        &mut self.config
    }

    /// Hold every batch before its next step until `resume`.
    pub fn pause(&self) {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    pub fn resume(&self) {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.resume.notify_all();
    }

    pub fn batches(&self) -> Vec<Vec<u64>> {
        self.batches.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn current_step(&self) -> usize {
        self.current_step.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn stopped_at(&self) -> Vec<usize> {
        self.stopped_at.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn clear_batches(&self) {
        self.batches.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The image `generate` makes for one (seed, label), whatever the batch.
    pub fn image_for(&self, seed: u64, label: u32) -> Image {
        let (channels, height, width) = self.config.image_shape();
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(label as u64 * 1442695040888963407 + 1);
        let pixels = (0..channels * height * width)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        Image { width, height, channels, pixels }
    }
}

impl Engine for FakeEngine {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn generate(&self, request: GenerationRequest, mut progress: Progress) -> flowgen_engine::Result<EngineOutput> {
        let GenerationRequest { settings, inputs } = request;
        self.batches.lock().unwrap_or_else(|p| p.into_inner()).push(inputs.seeds.clone());
        if self.panic_label.is_some_and(|l| inputs.labels.contains(&l)) {
            panic!("fake engine panics on label {:?}", self.panic_label);
        }
        if self.fail_label.is_some_and(|l| inputs.labels.contains(&l)) {
            return Err(Error::invalid("label", "the fake engine fails on this label"));
        }
        let steps = if settings.sampler.is_adaptive() { 5 } else { settings.steps.max(1) };
        let total = (!settings.sampler.is_adaptive()).then_some(steps);
        for step in 1..=steps {
            let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
            while *paused {
                paused = self.resume.wait(paused).unwrap_or_else(|p| p.into_inner());
            }
            drop(paused);
            std::thread::sleep(self.step_delay);
            self.current_step.store(step, std::sync::atomic::Ordering::SeqCst);
            let report = StepReport { step, total, s: step as f64 / steps as f64, nfe: step };
            if let ControlFlow::Break(()) = progress(&report) {
                self.stopped_at.lock().unwrap_or_else(|p| p.into_inner()).push(step);
                return Err(Error::Cancelled);
            }
        }
        let images = inputs.seeds.iter().zip(&inputs.labels).map(|(&s, &l)| self.image_for(s, l)).collect();
        let n = inputs.len();
        Ok(EngineOutput { images, stats: SolveStats::main_only(steps, steps, steps, 0, vec![steps; n]) })
    }
}
